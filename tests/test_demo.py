"""The embedded default and the same-host fast path."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess

import pytest
import torch
import transformers

from tsqp import api
from tsqp.bench import BREAKDOWN_KEYS, ModeResult, Run, measure, plot

from conftest import REPO, reference_logits, relative_error, run_cli

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def test_demo_runs_end_to_end_and_checks_itself(tmp_path):
    result = run_cli("demo", "--tokens", "48", env={"TSQP_CACHE": str(tmp_path / "cache")}, timeout=300)
    assert result.returncode == 0, result.stderr
    for expected in ("GPU server started", "Prefill time:", "Throughput:", "Logits shape: torch.Size([1, 1, 512])",
                     "Check against transformers' LlamaForCausalLM", "(OK)", "server stopped", "Token length: 48\n"):
        assert expected in result.stdout, result.stdout
    prompt = next(line for line in result.stdout.splitlines() if line.startswith("Prompt: "))
    assert "(the tokenizer added BOS <s> in front); fitted to 48 by repeating its" in prompt  # said, not silent
    assert (tmp_path / "cache" / "tiny-seed0" / "config.json").is_file()  # made once, cached


def test_ipc_endpoint_gives_the_same_logits(tiny_dir, references, tmp_path):
    endpoint = f"ipc://{tmp_path}/tsqp.sock"
    with api.start_server(tiny_dir, device="cpu", endpoint=endpoint):
        runner = api.connect(endpoint, tiny_dir)
        ids = torch.randint(0, 512, (1, 33), generator=torch.Generator().manual_seed(12))
        logits = runner.prefill(ids, all_positions=True).logits
        runner.client.close()
    assert relative_error(logits, reference_logits(references["gqa"], ids)) <= 1e-4


def test_bench_reports_every_mode_in_a_stable_shape(tiny_dir, tmp_path):
    # The plot is drawn where matplotlib (an optional extra) is installed; the rest runs everywhere.
    plot = ("--plot", str(tmp_path / "bench.png")) if HAVE_MATPLOTLIB else ()
    result = run_cli("bench", "--model", str(tiny_dir), "--tokens", "8,16", "--repeat", "2", "--json", "-", *plot,
                     "--protection", "private", "--verify", "--decode", "3", timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # `--json -`: stdout is the JSON, the table goes to stderr
    assert report.keys() == {"device", "model", "dtype", "wire_dtype", "batch", "repeat", "transport", "host",
                             "results", "wire_accuracy"}
    assert {"device", "model", "results"} <= report.keys()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert report["host"]["tsqp"] == str(REPO / "tsqp") and report["host"]["commit"] == (head or None)  # which code ran
    assert report["host"]["transformers"] == transformers.__version__  # `whole`'s code
    modes = {r["mode"] for r in report["results"]}
    assert modes == {"split", "split-seed", "whole", "tee-only", "split-private", "split-verify",
                     "split-private+verify"}
    assert {r["phase"] for r in report["results"]} == {"prefill", "decode"}
    for r in report["results"]:
        assert {"mode", "tokens", "median_s", "runs_s", "round_trips", "bytes_sent", "bytes_received",
                "breakdown_s", "phase"} <= r.keys()
        assert len(r["runs_s"]) == 2 and r["median_s"] > 0
        if r["mode"].startswith("split"):  # (split - whole) / round trips, prefill and decode
            whole = next(w for w in report["results"] if (w["mode"], w["tokens"], w["phase"]) ==
                         ("whole", r["tokens"], r["phase"]))
            unit = (r["median_s"], whole["median_s"], r["round_trips"]) if r["phase"] == "prefill" else \
                (r["ms_per_token"] / 1e3, whole["ms_per_token"] / 1e3, r["round_trips_per_token"])
            assert r["overhead_per_round_trip_s"] == pytest.approx((unit[0] - unit[1]) / unit[2])
        if r["phase"] == "decode":
            assert r["new_tokens"] == 3 and r["ms_per_token"] > 0 and r["bytes_per_token"] >= 0
            # lean: AttnGate and DownScores (DownHead) per layer, and layer 0's QKVScores
            per_token = {"split": 2 * 2 + 1, "split-seed": 9 * 2 + 2, "whole": 0, "tee-only": 0}
            assert r["round_trips_per_token"] == per_token.get(r["mode"], 4 * 2 + 1)
            if r["mode"] in ("split-private", "split-verify", "split-private+verify"):
                assert r["offline_s_per_token"] > 0
            continue
        if r["mode"] == "split":
            assert r["round_trips"] == 2 * 2 + 3  # Embedding, ..., Release
        if r["mode"] == "split-seed":
            assert r["round_trips"] == 9 * 2 + 2
        if r["mode"].startswith("split-p") or r["mode"] == "split-verify":
            assert r["offline_s"] > 0 and r["round_trips"] == 4 * 2 + 1
    assert not plot or (tmp_path / "bench.png").stat().st_size > 10_000
    assert "| split |" in result.stderr and "| ms/token |" in result.stderr
    assert "split-private decode, 8 tokens: " in result.stderr and " ms offline = " in result.stderr
    for row in report["results"]:  # the round-by-round ratios are the runs' own
        if row["mode"] == "split-verify" and row["tokens"] == 16 and row["phase"] == "prefill":
            split = next(r for r in report["results"] if (r["mode"], r["tokens"], r["phase"]) == ("split", 16, "prefill"))
            ratios = sorted(a / b for a, b in zip(row["runs_s"], split["runs_s"]))
            assert (f"split-verify, 16 tokens: {sum(ratios) / 2:.3f} × split round by round "
                    f"({ratios[0]:.3f}–{ratios[1]:.3f})") in result.stderr


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib (the bench extra) is not installed")
def test_bench_plot_colours_mean_one_thing_and_bars_show_seconds(tmp_path, monkeypatch):
    import matplotlib.figure
    from matplotlib.colors import to_hex

    rng = random.Random(5)
    modes = ["split", "split-seed", "whole", "tee-only", "split-private", "split-verify", "split-private+verify"]
    results = []
    for n in (128, 512):
        for mode in modes:
            parts = {key: rng.uniform(0.01, 2.0) for key in BREAKDOWN_KEYS}
            results.append(ModeResult(mode, n, sum(parts.values()), [1.0], 1, 1, 1, parts))
    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    plot(results, tmp_path / "p.png", "test")
    line, *bars = drawn[0].axes
    mode_colours = {l.get_label(): to_hex(l.get_color()) for l in line.get_lines()}
    assert set(mode_colours) == set(modes) and len(set(mode_colours.values())) == len(modes)
    for ax, n in zip(bars, (128, 512)):
        outlines = [p for p in ax.patches if not p.get_fill()]
        parts = {to_hex(p.get_facecolor()) for p in ax.patches if p.get_fill()}
        # a mode has the same colour in both panels, and a part never looks like a mode
        assert [to_hex(p.get_edgecolor()) for p in outlines] == [mode_colours[m] for m in modes]
        assert not parts & set(mode_colours.values()) and len(parts) == len(BREAKDOWN_KEYS)
        cells = [r for r in results if r.tokens == n]
        assert [p.get_height() for p in outlines] == pytest.approx([r.median_s for r in cells])  # in seconds
        assert [t.get_text() for t in ax.texts] == [f"{r.median_s:.3g} s" for r in cells]


def test_bench_plot_without_matplotlib_fails_before_measuring(tiny_dir, tmp_path):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "matplotlib.py").write_text("raise ImportError('no matplotlib here')\n")
    result = run_cli("bench", "--model", str(tiny_dir), "--tokens", "8", "--plot", str(tmp_path / "p.png"),
                     env={"PYTHONPATH": f"{blocked}{os.pathsep}{REPO}"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --plot needs matplotlib")
    assert "Benchmarking" not in result.stderr  # refused before any server started


def test_bench_rounds_rotate_the_mode_order_and_keep_runs_paired():
    calls: list[str] = []

    def runner(mode: str):
        def run(ids: torch.Tensor) -> Run:
            calls.append(mode)
            return Run(seconds=len(calls), breakdown_s={"tee_compute": 0.0})
        return run

    modes = ["split", "whole", "split-verify"]
    results = measure({m: runner(m) for m in modes}, [4], batch=1, repeat=3, vocab_size=10, progress=False)
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert rounds == [modes, modes[1:] + modes[:1], modes[2:] + modes[:2], modes]
    for r in results:  # run i of every mode comes from round i + 1 (round 0 is the warm-up)
        assert [int(s) for s in r.runs_s] == [calls.index(r.mode, 3 * i) + 1 for i in (1, 2, 3)]
