"""scripts/call_timeline.py: every segment of a served decode call, for each decode method, with
segments that add up to the call."""

from __future__ import annotations

import re

from conftest import run_cli

SEGMENTS = ["client: encode, copy into shared memory, send", "until the server's receive begins",
            "server: receive the datagram", "server: serving loop until `handle`",
            "server: `handle` (checks, work, reply framing)", "server: serving loop until the reply is sent",
            "until the client has the reply", "client: decode, copy out, checks"]


def test_timeline_gives_each_segment_per_decode_method(tmp_path):
    result = run_cli("--tokens", "8", "--new-tokens", "6", "--repeat", "1", script="scripts/call_timeline.py",
                     timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {line.split(" | ")[0].lstrip("| "): line.strip(" |").split(" | ")[1:]
            for line in result.stdout.splitlines() if line.startswith("| ")}
    methods = rows["µs, median"]
    assert methods == ["AttnGate", "DownHead", "DownScores", "QKVScores"]  # the tiny preset's 2 layers
    # 6 new tokens: 4 timed decode steps, each with an AttnGate per layer and one of each other
    assert [int(n) for n in rows["calls timed"]] == [8, 4, 4, 4]
    for segment in SEGMENTS:
        assert all(re.fullmatch(r"-?\d+", cell) for cell in rows[segment]), segment
    for column in range(len(methods)):
        parts = sum(int(rows[s][column]) for s in SEGMENTS)
        whole = int(rows["the call, in all"][column])
        assert int(rows["server: `handle` (checks, work, reply framing)"][column]) > 0
        assert abs(parts - whole) <= max(0.5 * whole, 50)  # medians of parts need not add up exactly


def test_timeline_refuses_too_few_new_tokens_in_one_line():
    result = run_cli("--new-tokens", "2", script="scripts/call_timeline.py")
    assert result.returncode != 0 and "--new-tokens must be at least 3" in result.stderr.strip().splitlines()[-1]
