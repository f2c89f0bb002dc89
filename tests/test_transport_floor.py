"""scripts/transport_floor.py: a row and a positive median for every mechanism that needs no extra package."""

from __future__ import annotations

import json

from conftest import run_cli

# Named here, not imported from the script: the test says what the table must hold.
EXPECTED = [("zmq tcp", 200), ("zmq ipc", 200), ("unix seqpacket", 200), ("pipes", 200), ("shm spin", 200),
            *((f"shm spin {n} µs, then {w}", 200) for w in ("eventfd", "unix") for n in (0, 20, 100)),
            ("shm spin", 65536), ("unix header + shm", 65536)]


def test_floor_prints_a_row_and_positive_figures_for_each_mechanism(tmp_path):
    out = tmp_path / "floor.json"
    result = run_cli("--rounds", "50", "--no-extra", "--json", str(out), script="scripts/transport_floor.py",
                     timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mechanism"], r["payload_bytes"]) for r in rows] == EXPECTED
    for r in rows:
        assert 0 < r["median_us"] <= r["p99_us"]
        assert 20 <= r["runs"][0]["rounds"] <= 50
    for name, size in EXPECTED:
        assert f"| {name} | {'64 KiB' if size == 65536 else '200 B'} |" in result.stdout
    assert "iceoryx2" not in result.stdout


def test_floor_refuses_bad_arguments_in_one_line():
    result = run_cli("--rounds", "0", script="scripts/transport_floor.py")
    assert result.returncode != 0 and "--rounds" in result.stderr.strip().splitlines()[-1]
