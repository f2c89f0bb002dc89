"""The entry points as a user runs them: the seed's scripts, `tsqp`, and every bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import tsqp
from tsqp import api, cli
from tsqp.cli import build_parser
from tsqp.models import make_model
from tsqp.report import print_report, result_json

from conftest import REPO, reference_logits, relative_error, run_cli


def wait_for_line(process: subprocess.Popen, needle: str, timeout: float = 120) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"never printed {needle!r}: {''.join(lines)}")


def one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    assert "Traceback" not in result.stderr


def test_seed_entry_points_with_environment_variables_only(tiny_dir, references):
    endpoint = api.free_endpoint()
    port = endpoint.rsplit(":", 1)[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLAMA_MODEL_PATH": str(tiny_dir), "LLAMA_GPU_PORT": port,
           "LLAMA_GPU_DEVICE": "cpu", "LLAMA_DTYPE": "float32", "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "server.py"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        startup = "".join(wait_for_line(server, "ZeroMQ server started"))
        assert f"Loading model from: {tiny_dir}" in startup
        assert "Device: cpu, Dtype: torch.float32" in startup
        assert "✓ Model loaded: 2 layers, hidden_size=64" in startup
        assert f"✓ ZeroMQ server started on port {port}" in startup
        runner_env = {"LLAMA_GPU_ENDPOINT": f"localhost:{port}", "LLAMA_MODEL_PATH": str(tiny_dir),
                      "PREFILL_TOKEN_LENGTH": "32"}
        result = run_cli(env=runner_env, script="tee_runner.py")
        assert result.returncode == 0, result.stderr
        for expected in (f"✓ Connected to GPU server at localhost:{port}", "✓ TEE model initialized: 2 layers",
                         "Token length: 32", "Prefill time:", "Throughput:", "Logits shape: torch.Size([1, 1, 512])"):
            assert expected in result.stdout
        # The flags a guarded Gramine manifest bakes into tee_runner.py's command line.
        guarded = run_cli("--protection", "private", "--verify", env=runner_env, script="tee_runner.py")
        assert guarded.returncode == 0, guarded.stderr
        assert "Protocol: lean (wire float64)" in guarded.stdout
        assert "Protection: private (one-time masks); verify: on (Freivalds checks on every product)" in guarded.stdout
        assert "Logits shape: torch.Size([1, 1, 512])" in guarded.stdout
        # Without the variable, the seed's knob (PREFILL_TOKEN_LENGTH = 128 in tee_runner.py) sets the length.
        default = run_cli(env={**runner_env, "PREFILL_TOKEN_LENGTH": ""}, script="tee_runner.py")
        assert default.returncode == 0, default.stderr
        assert "Token length: 128\n" in default.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(20) == 0  # graceful shutdown


def test_prefill_cli_saves_exact_logits_for_given_ids(servers, model_dirs, references, tmp_path):
    variant = "attention-bias"
    ids = torch.randint(0, 512, (2, 21), generator=torch.Generator().manual_seed(4))
    np.save(tmp_path / "ids.npy", ids.numpy())
    result = run_cli("prefill", "--endpoint", servers[variant].endpoint, "--model", str(model_dirs[variant]),
                     "--input-ids", str(tmp_path / "ids.npy"), "--save-logits", str(tmp_path / "logits.npy"),
                     "--all-positions", "--json", str(tmp_path / "run.json"), "--protocol", "seed")
    assert result.returncode == 0, result.stderr
    logits = torch.from_numpy(np.load(tmp_path / "logits.npy"))
    assert logits.dtype == torch.float32 and logits.shape == (2, 21, 512)
    assert relative_error(logits, reference_logits(references[variant], ids)) <= 1e-4
    figures = json.loads((tmp_path / "run.json").read_text())
    assert figures["round_trips"] == 9 * 2 + 2 and figures["tokens"] == 21 and figures["batch"] == 2


def test_prompt_runs_as_tokenized_unless_tokens_is_given(servers, tiny_dir, references, tmp_path):
    text = "The river keeps the secret of the old king."
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir), local_files_only=True)  # an independent encoder
    tokenized = tokenizer(text)["input_ids"]
    assert tokenized[0] == tokenizer.bos_token_id and 5 < len(tokenized) < 40
    body = tokenized[1:]
    prefill = ("prefill", "--endpoint", servers["gqa"].endpoint, "--model", str(tiny_dir), "--prompt", text,
               "--all-positions", "--save-logits", str(tmp_path / "l.npy"), "--json", "-")
    # $PREFILL_TOKEN_LENGTH (which tee_runner.py always sets) is the random ids' length: not a fit
    cases = {(): tokenized, ("--tokens", "40", "--batch", "2"): (tokenized[:1] + body * 40)[:40],
             ("--tokens", "3"): tokenized[:3]}
    for extra, expected in cases.items():
        result = run_cli(*prefill, *extra, env={"PREFILL_TOKEN_LENGTH": "32"})
        assert result.returncode == 0, result.stderr
        batch = 2 if "--batch" in extra else 1
        assert json.loads(result.stdout)["tokens"] == len(expected)
        announced = f"Prompt: {len(tokenized)} tokens as tokenized (the tokenizer added BOS <s> in front)"
        line = next(line for line in result.stderr.splitlines() if line.startswith("Prompt:"))
        assert line == announced + {(): "", ("--tokens", "3"): "; fitted to 3 by keeping its first 3"}.get(
            extra, f"; fitted to 40 by repeating its {len(body)} text tokens after <s>")
        ids = torch.tensor([expected] * batch)
        logits = torch.from_numpy(np.load(tmp_path / "l.npy"))  # the ids announced are the ids that ran
        assert relative_error(logits, reference_logits(references["gqa"], ids)) <= 1e-4


def test_options_the_ids_source_does_not_use_are_refused(tiny_dir, tmp_path):
    np.save(tmp_path / "ids.npy", np.ones((1, 5), dtype=np.int64))
    base = ("prefill", "--endpoint", api.free_endpoint(), "--model", str(tiny_dir))
    for extra, fragments in (
            (("--input-ids", str(tmp_path / "ids.npy"), "--tokens", "5"),
             ("--tokens cannot be used with --input-ids",)),
            (("--input-ids", str(tmp_path / "ids.npy"), "--batch", "2", "--seed", "3"), ("--batch and --seed",)),
            (("--prompt", "hello", "--seed", "3"), ("--seed cannot be used with --prompt",)),
            (("--tokens", "0",), ("--tokens must be positive",))):
        one_error_line(run_cli(*base, *extra), *fragments)


def test_bad_environment_values_fail_only_the_command_that_reads_them(tiny_dir, tmp_path):
    bad = {"PREFILL_TOKEN_LENGTH": "abc", "LLAMA_DTYPE": "float8", "TSQP_LOG_LEVEL": "LOUD"}
    for args in (("--help",), ("prefill", "--help")):
        assert run_cli(*args, env=bad).returncode == 0, args
    no_server = ("prefill", "--endpoint", api.free_endpoint(), "--model", str(tiny_dir), "--connect-timeout", "1")
    one_error_line(run_cli(*no_server, env=bad), "$PREFILL_TOKEN_LENGTH='abc' is not an integer")
    one_error_line(run_cli(*no_server, env={"PREFILL_TOKEN_LENGTH": "0"}),
                   "$PREFILL_TOKEN_LENGTH='0' must be at least 1")
    one_error_line(run_cli("serve", "--model", str(tiny_dir), "--device", "cpu", env=bad),
                   "$LLAMA_DTYPE='float8' is not one of float32, float16, bfloat16")
    one_error_line(run_cli("serve", "--model", str(tiny_dir), "--device", "cpu", "--dtype", "float32", env=bad),
                   "$TSQP_LOG_LEVEL='LOUD'")  # a flag overrides its variable; the other one is still checked
    one_error_line(run_cli("prefill", "--model", str(tiny_dir), env={"LLAMA_GPU_ENDPOINT": "nowhere"}),
                   "bad endpoint 'nowhere'", "(from $LLAMA_GPU_ENDPOINT)")
    flag_wins = run_cli("prefill", "--endpoint", "nowhere", "--model", str(tiny_dir),
                        env={"LLAMA_GPU_ENDPOINT": "nowhere-else"})
    one_error_line(flag_wins, "bad endpoint 'nowhere'")
    assert "$LLAMA_GPU_ENDPOINT" not in flag_wins.stderr
    one_error_line(run_cli("prefill", env={"LLAMA_MODEL_PATH": str(tmp_path / "nope")}),
                   "model directory not found", "(from $LLAMA_MODEL_PATH)")


def test_blame_names_a_variable_only_for_a_value_the_message_quotes():
    from tsqp.environment import blame

    taken = {"LLAMA_GPU_PORT": "abc", "LLAMA_MODEL_PATH": "/m/x"}
    assert blame("bad endpoint 'abc'", taken) == "bad endpoint 'abc' (from $LLAMA_GPU_PORT)"
    assert blame("not found: /m/x", taken) == "not found: /m/x (from $LLAMA_MODEL_PATH)"
    for unrelated in ("bad endpoint 'abcd'", "not found: /m/x/y", "no such file /m/x.json", "$LLAMA_GPU_PORT='abc'"):
        assert blame(unrelated, taken) == unrelated


def test_json_dash_is_stdout_and_the_report_goes_to_stderr(servers, tiny_dir, tmp_path):
    result = run_cli("prefill", "--endpoint", servers["gqa"].endpoint, "--model", str(tiny_dir), "--tokens", "9",
                     "--json", "-")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)  # stdout is the JSON and nothing else
    assert figures["tokens"] == 9 and figures["protocol"] == "lean" and figures["protection"] == "none"
    assert "Prefill time:" in result.stderr and "Protocol: lean" in result.stderr
    assert not (REPO / "-").exists()


def test_report_prints_protocol_and_protection_as_two_settings(servers, tiny_dir):
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(2))
    expected = {("lean", "none", False): ("Protocol: lean (wire float32)", "Protection: none (", "verify: off"),
                ("seed", "none", False): ("Protocol: seed (wire float32)", "Protection: none (", "verify: off"),
                ("lean", "private", False): ("Protocol: lean (wire float64)", "Protection: private (one-time masks)",
                                             "verify: off"),
                ("lean", "none", True): ("Protocol: lean (wire float32)", "Protection: none (", "verify: on")}
    for (protocol, protection, verify), fragments in expected.items():
        runner = api.connect(servers["gqa"].endpoint, tiny_dir, protocol, protection=protection, verify=verify)
        result = runner.prefill(ids)
        runner.client.close()
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):  # the report follows stdout wherever it is now
            print_report(result, runner)
        lines = captured.getvalue().splitlines()
        protocol_line = next(line for line in lines if line.startswith("Protocol:"))
        protection_line = next(line for line in lines if line.startswith("Protection:"))
        assert protocol_line.startswith(fragments[0]) and "round trips" in protocol_line
        assert protection_line.startswith(fragments[1]) and protection_line.endswith(
            fragments[2] + (" (Freivalds checks on every product)" if verify else ""))
        figures = result_json(result, runner)
        assert (figures["protocol"], figures["protection"], figures["verify"]) == (protocol, protection, verify)
    one_error_line(run_cli("prefill", "--endpoint", servers["gqa"].endpoint, "--model", str(tiny_dir), "--tokens", "8",
                           "--protocol", "seed", "--verify"), "--protocol seed cannot be combined")


def test_missing_model_directory(servers, tmp_path):
    one_error_line(run_cli("prefill", "--endpoint", servers["gqa"].endpoint, "--model", str(tmp_path / "nope")),
                   "model directory not found")
    one_error_line(run_cli("serve", "--model", str(tmp_path / "nope"), "--device", "cpu", "--port", "1"),
                   "model directory not found")


def test_invalid_model_directory(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    one_error_line(run_cli("serve", "--model", str(tmp_path), "--device", "cpu"), "cannot read", "config.json")


def test_non_llama_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    one_error_line(run_cli("serve", "--model", str(tmp_path), "--device", "cpu"), "unsupported architecture", "gpt2")


def test_unknown_preset(tmp_path):
    one_error_line(run_cli("make-model", "--preset", "llama-9000", "--out", str(tmp_path / "m")), "unknown preset")


def test_more_tokens_than_the_model_supports(servers, tiny_dir):
    one_error_line(run_cli("prefill", "--endpoint", servers["gqa"].endpoint, "--model", str(tiny_dir),
                           "--tokens", "100000"), "max_position_embeddings")


def test_unreachable_server_fails_within_a_timeout(tiny_dir):
    start = time.monotonic()
    result = run_cli("prefill", "--endpoint", api.free_endpoint(), "--model", str(tiny_dir), timeout=60)
    one_error_line(result, "no reply from GPU server")
    assert time.monotonic() - start < 30


def test_bad_endpoint_and_bad_ids_file(tiny_dir, tmp_path):
    one_error_line(run_cli("prefill", "--endpoint", "nowhere", "--model", str(tiny_dir)), "bad endpoint")
    np.save(tmp_path / "f.npy", np.zeros((2, 3), dtype=np.float32))
    one_error_line(run_cli("prefill", "--endpoint", api.free_endpoint(), "--model", str(tiny_dir),
                           "--input-ids", str(tmp_path / "f.npy")), "int64")
    (tmp_path / "ids.txt").write_text("1 2 3\n")
    np.savez(tmp_path / "ids.npz", ids=np.ones((1, 3), dtype=np.int64))
    for name in ("ids.txt", "ids.npz"):
        result = run_cli("prefill", "--endpoint", api.free_endpoint(), "--model", str(tiny_dir),
                         "--input-ids", str(tmp_path / name))
        one_error_line(result, f"{tmp_path / name} is not a .npy file", "int64 [batch, seq]", "numpy.save")
        assert "pickle" not in result.stderr


def test_a_file_given_as_the_model_directory(servers):
    readme = str(REPO / "README.md")
    for result in (run_cli("prefill", "--endpoint", servers["gqa"].endpoint, "--model", readme),
                   run_cli("serve", "--model", readme, "--device", "cpu")):
        one_error_line(result, "not a model directory (a file, not a directory)", readme)
        assert "not found" not in result.stderr


def test_make_model_keeps_an_existing_model_without_force(tmp_path):
    """Refused before it says it is making anything; made, with its own progress lines only."""
    out = make_model("tiny", tmp_path / "m")
    config = (out / "config.json").read_text()
    refused = run_cli("make-model", "--preset", "tiny", "--out", str(out), "--seed", "1")
    one_error_line(refused, "already holds a tsqp model", "--force")
    assert "Making" not in refused.stdout
    assert (out / "config.json").read_text() == config
    assert json.loads((out / "tsqp-model.json").read_text())["seed"] == 0
    forced = run_cli("make-model", "--preset", "tiny", "--out", str(out), "--seed", "1", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "Making preset 'tiny'" in forced.stdout and "shards" not in forced.stderr, forced.stderr
    assert json.loads((out / "tsqp-model.json").read_text())["seed"] == 1


@pytest.mark.parametrize("argv, fragment", [
    ([], "COMMAND"), (["generate", "--model", "m", "--prompt", "hi"], "--max-new-tokens"),
    (["bench", "--repeat", "x"], "--repeat"), (["prefill", "--protocol", "fast"], "--protocol")])
def test_a_usage_error_is_one_line_that_points_to_the_commands_help(argv, fragment, capsys):
    """As every other error is: argparse's usage text would come first otherwise."""
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert f"(see tsqp{' ' + argv[0] if argv else ''} --help)" in err[0], err


def test_keygen_never_imports_torch(tmp_path):
    result = run_cli("keygen", "--out", str(tmp_path / "k"), "--name", "tee", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "tsqp.keys" in imported and "zmq" in imported  # the profile is there...
    assert not {"torch", "numpy", "transformers"} & imported  # ...and holds none of the heavy imports


def test_version_and_help_on_every_command_and_option():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"tsqp {tsqp.__version__}"
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"]  # one version, tsqp.__version__ (setuptools reads it)
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "tsqp.__version__"}
    assert pyproject["project"]["license"] == "Apache-2.0"  # the SPDX string: no setuptools warning
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"serve", "prefill", "keygen", "make-model", "demo", "bench"} <= commands.keys()
    for name, command in commands.items():
        assert command.description, f"tsqp {name} has no description"
        for action in command._actions:
            assert action.help, f"tsqp {name} {'/'.join(action.option_strings)} has no help"


def test_shm_without_a_willing_server_and_with_audit(servers, tiny_dir, tmp_path):
    one_error_line(run_cli("prefill", "--endpoint", servers["gqa"].endpoint, "--model", str(tiny_dir), "--shm",
                           "--tokens", "8"), "--shm")
    one_error_line(run_cli("serve", "--model", str(tiny_dir), "--device", "cpu", "--shm", "--audit",
                           str(tmp_path / "audit")), "--audit")
    for command in ("prefill", "bench"):  # refused before any work
        one_error_line(run_cli(command, "--endpoint", servers["gqa"].endpoint, "--model", str(tiny_dir),
                               "--no-fastlink", "--tokens", "8"), "--no-fastlink only applies with --shm")


def test_verify_refuses_16_bit_products(servers, tiny_dir):
    one_error_line(run_cli("prefill", "--endpoint", servers["gqa"].endpoint, "--model", str(tiny_dir), "--verify",
                           "--wire-dtype", "bfloat16", "--tokens", "8"), "--verify needs the float32 wire")
    one_error_line(run_cli("bench", "--model", str(tiny_dir), "--verify", "--dtype", "bfloat16"),
                   "--verify checks float32 products", "--dtype float32")


def test_serve_refuses_a_parent_pid_that_is_not_its_parent(tiny_dir):
    one_error_line(run_cli("serve", "--model", str(tiny_dir), "--device", "cpu", "--parent-pid", "1"),
                   "--parent-pid 1", "not this server's parent")


def test_what_a_command_will_write_and_read_is_checked_before_any_work(tiny_dir, tmp_path):
    """Nothing listens at the endpoint: each error must come before a connection is tried."""
    nowhere, model = api.free_endpoint(), str(tiny_dir)
    prefill = ("prefill", "--endpoint", nowhere, "--model", model, "--tokens", "8")
    generate = ("generate", "--endpoint", nowhere, "--model", model, "--tokens", "8", "--max-new-tokens", "2")
    cases = [
        ((*prefill, "--json", str(tmp_path / "no" / "x.json")), "--json", "no such directory"),
        ((*generate, "--save-ids", str(tmp_path)), "--save-ids", "is a directory"),
        ((*prefill, "--verify-dtype", "float64"), "--verify-dtype only applies with --verify"),
        ((*generate, "--top-p", "0.9"), "only apply when sampling"),
        (("bench", "--tokens", "8", "--plot", str(tmp_path / "no" / "x.png")), "--plot", "no such directory"),
    ]
    np.save(tmp_path / "ragged.npy", np.array([[1, 5, 6], [1, 7]], dtype=object), allow_pickle=True)
    np.save(tmp_path / "outside.npy", np.array([[1, 600, 3]]))
    for name, message in (("ragged.npy", "unequal length"), ("outside.npy", "holds token id 600")):
        cases.append((("prefill", "--endpoint", nowhere, "--model", model, "--input-ids", str(tmp_path / name)),
                      message))
    (tmp_path / "file").write_text("")
    for flags, message in ((("--audit", str(tmp_path / "file" / "audit")), "--audit"),
                           (("--session-memory-mb", "nan"), "must be a positive number"),
                           (("--endpoint", "foo:bar"), "bad endpoint")):
        cases.append((("serve", "--model", model, "--device", "cpu", *flags), message))
    for command, *fragments in cases:
        result = run_cli(*command)
        one_error_line(result, *fragments)
        assert "no reply" not in result.stderr and "Connected" not in result.stdout, command


def test_serve_says_which_products_run_with_their_operands_swapped(tiny_dir, monkeypatch, caplog):
    """The start-up lines and the start log name each weight shape the probe chose, with its row
    counts, and say nothing of it where nothing was chosen (this tiny model, unpatched)."""
    import logging
    import threading

    from tsqp.server import core, serving

    def serve_once() -> tuple[str, dict]:
        out, stop = io.StringIO(), threading.Event()
        thread = threading.Thread(target=serving.run, args=(tiny_dir, "cpu", "float32", api.free_endpoint(), stop, out))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tsqp.server"):
            thread.start()
            deadline = time.monotonic() + 60
            while "ZeroMQ server started" not in out.getvalue() and thread.is_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            stop.set()
            thread.join(30)
        start = next(r for r in caplog.records if r.getMessage() == "start")
        return out.getvalue(), start.fields

    printed, fields = serve_once()
    assert "ZeroMQ server started" in printed and "(W x^T)^T" not in printed and fields["decode_transposed"] == "-"
    gate_up = lambda weights, rows_alone: frozenset({2, 3}) if weights[0][0].shape == (352, 64) else frozenset()
    monkeypatch.setattr(core, "transposed_rows", gate_up)
    printed, fields = serve_once()
    assert "✓ Decode products as (W x^T)^T where faster at load: 352x64 at rows 2, 3\n" in printed
    assert fields["decode_transposed"] == "352x64 at rows 2, 3"
