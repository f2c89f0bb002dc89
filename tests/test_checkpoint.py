"""The checkpoint reader returns safetensors' own tensors, and fingerprints tell models apart."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from tsqp import checkpoint
from tsqp.checkpoint import Checkpoint
from tsqp.config import DirectoryWeights, identity_mismatch, model_identity
from tsqp.errors import ModelError
from tsqp.models import make_model


def test_every_tensor_reads_back_as_safetensors_loads_it(tmp_path):
    g = torch.Generator().manual_seed(3)
    tensors = {"a": torch.randn(7, 5, generator=g), "b": torch.randn(3, generator=g).to(torch.bfloat16),
               "c": torch.randint(-9, 9, (2, 2, 2), generator=g), "empty": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "model.safetensors")
    reader = Checkpoint(tmp_path)
    expected = load_file(tmp_path / "model.safetensors")
    assert reader.names() == sorted(expected)
    for name, tensor in expected.items():
        got = reader.read(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor)
    assert reader.read("b", torch.float32).dtype == torch.float32


def test_a_file_that_lies_about_its_bytes_is_refused(tmp_path):
    save_file({"a": torch.randn(4, 4)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])  # the last tensor ends past the file
    with pytest.raises(ModelError, match="does not fit its bytes"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(ModelError, match="header of"):
        Checkpoint(tmp_path)


def test_the_embedding_table_is_read_whole_once(tiny_dir, monkeypatch):
    weights = DirectoryWeights(tiny_dir)
    reads = []
    original = checkpoint._pread_exact
    monkeypatch.setattr(checkpoint, "_pread_exact", lambda fd, n, off, what: reads.append((what, n)) or
                        original(fd, n, off, what))
    table = load_file(next(tiny_dir.glob("*.safetensors")))["model.embed_tokens.weight"]
    for ids in (torch.tensor([[5, 9, 5]]), torch.tensor([[0, 511]])):
        torch.testing.assert_close(weights.rows("model.embed_tokens.weight", ids), table[ids].float())
    assert reads == [("model.embed_tokens.weight", table.numel() * table.element_size())]


def test_identity_names_what_differs(tmp_path, tiny_dir):
    same = make_model("tiny", tmp_path / "same", seed=1)  # tiny_dir is the gqa variant, seed 1
    other_seed = make_model("tiny", tmp_path / "seed", seed=2)
    wider = make_model("tiny", tmp_path / "wider", seed=1, overrides={"intermediate_size": 192})
    mine = model_identity(tiny_dir)
    assert identity_mismatch(mine, model_identity(same)) is None
    assert identity_mismatch(mine, model_identity(other_seed)).startswith("weights differ: ")
    assert identity_mismatch(mine, model_identity(wider)) == "config intermediate_size: 176 here, 192 on the server"
    assert identity_mismatch(mine, {"config": {}}) == "the server did not say which model it holds"


def test_the_tee_never_maps_a_weights_file(tiny_dir, monkeypatch):
    """Under Gramine a mapping of a trusted file is read and verified whole, once per open: the
    TEE's weights reader must use byte ranges only, and the config must touch no weights."""
    import mmap

    import safetensors

    from tsqp.config import load_config

    def refuse(*args, **kwargs):
        raise AssertionError("a weights file was mapped")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(mmap, "mmap", refuse)
    opened = []
    real_open = __import__("os").open
    monkeypatch.setattr("os.open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    load_config(tiny_dir)
    assert not [p for p in opened if p.endswith(".safetensors")]  # the config path reads config.json only
    weights = DirectoryWeights(tiny_dir)
    weights.input_norm(0), weights.read("model.layers.1.mlp.down_proj.weight")
    weights.rows("model.embed_tokens.weight", torch.tensor([[3, 4]]))
    assert len([p for p in opened if p.endswith(".safetensors")]) == 1  # one handle per file, for every read
