"""The roofline runner writes the JSON shape tooling reads (checked on tiny shapes)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_KEYS = {"gpu", "cpu", "threads", "driver", "torch", "cuda", "commit", "date", "copy_bandwidth_gbs", "results"}
RESULT_KEYS = {"op", "shape", "median_us", "achieved_gbs", "fraction_of_copy_bw", "peer", "peer_median_us",
               "speedup_vs_peer", "peers_us"}


def test_runner_writes_the_result_json(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--device", "cpu", "--no-save",
                          "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "copy bandwidth" in run.stdout and "merge_states" in run.stdout
    files = list(tmp_path.glob("cpu-*-smoke.json"))
    assert len(files) == 1, files
    report = json.loads(files[0].read_text())
    assert set(report) == TOP_KEYS
    assert report["gpu"] is None and report["driver"] is None and report["copy_bandwidth_gbs"] > 0
    assert report["cpu"] and report["threads"] >= 1
    ops = {entry["op"] for entry in report["results"]}
    assert {"merge_states", "flash_decode"} <= ops
    for entry in report["results"]:
        assert set(entry) == RESULT_KEYS
        assert entry["median_us"] > 0 and entry["achieved_gbs"] > 0
        # A shape no peer can run (MLA on the CPU) has no peer fields; otherwise all of them.
        if entry["peer"] is None:
            assert entry["peer_median_us"] is None and entry["speedup_vs_peer"] is None
        else:
            assert entry["peer_median_us"] > 0 and entry["speedup_vs_peer"] > 0
            assert entry["peers_us"][entry["peer"]] == entry["peer_median_us"]
    assert any(entry["peer"] for entry in report["results"] if entry["op"] == "flash_decode")
