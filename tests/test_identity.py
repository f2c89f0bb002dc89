"""A TEE connected to a server that holds another model is refused at connect, not given wrong logits."""

from __future__ import annotations

import shutil

import pytest
import torch

from tsqp import api
from tsqp.config import model_identity
from tsqp.errors import ModelError
from tsqp.models import make_model
from tsqp.transport import Client

from conftest import reference_logits, relative_error, run_cli


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> str:
    """The tiny preset again, same shapes and config, other random weights."""
    return str(make_model("tiny", tmp_path_factory.mktemp("other") / "tiny", seed=99))


def test_ping_reports_the_model_identity(servers, tiny_dir):
    with Client(servers["gqa"].endpoint) as client:
        assert client.ping()["identity"] == model_identity(tiny_dir)


def test_other_weights_of_the_same_shapes_are_refused(servers, other_weights):
    with pytest.raises(ModelError, match="holds another model than .*: weights differ: ") as caught:
        api.connect(servers["gqa"].endpoint, other_weights)
    assert "\n" not in str(caught.value)


def test_another_config_is_refused_by_name(servers, model_dirs):
    with pytest.raises(ModelError, match="config num_kv_heads: 4 here, 2 on the server"):
        api.connect(servers["gqa"].endpoint, model_dirs["mha"])


def test_a_copy_of_the_same_weights_elsewhere_is_accepted(servers, tiny_dir, references, tmp_path):
    copy = shutil.copytree(tiny_dir, tmp_path / "copy")
    runner = api.connect(servers["gqa"].endpoint, copy)
    ids = torch.randint(0, 512, (1, 17), generator=torch.Generator().manual_seed(6))
    logits = runner.prefill(ids, all_positions=True).logits
    runner.client.close()
    assert relative_error(logits, reference_logits(references["gqa"], ids)) <= 1e-4


def test_prefill_against_another_model_is_one_error_line(servers, other_weights, tmp_path):
    result = run_cli("prefill", "--endpoint", servers["gqa"].endpoint, "--model", other_weights, "--tokens", "8",
                     "--save-logits", str(tmp_path / "logits.npy"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the GPU server at ") and "weights differ" in last
    assert not (tmp_path / "logits.npy").exists()  # no logits from the wrong model
