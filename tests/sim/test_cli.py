"""python -m helix_ext.sim reproduce / plan."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helix_ext.sim.__main__ import main, parse_tokens

from .test_inputs import LLAMA_CONFIG, write_bench

ROOT = Path(__file__).resolve().parents[2]


def test_reproduce_json_has_exactly_the_issue_shape(capsys):
    assert main(["reproduce", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"deepseek-r1", "llama-405b", "hopb_ablation"}
    assert set(out["deepseek-r1"]) == set(out["llama-405b"]) == {"throughput_gain", "interactivity_gain"}
    assert set(out["hopb_ablation"]) == {"deepseek-r1", "llama-405b"}


def test_reproduce_tables(capsys):
    assert main(["reproduce", "--latency-us", "5"]) == 0
    text = capsys.readouterr().out
    assert "collective latency 5 us" in text and "DeepSeek-R1" in text and "Llama-3.1-405B" in text
    for latency in ("1us", "3us", "5us", "7us", "10us", "15us", "20us"):
        assert latency in text
    assert "<- headline" in text


def test_reproduce_plots(tmp_path):
    pytest.importorskip("matplotlib")
    assert main(["reproduce", "--json", "--plot", str(tmp_path)]) == 0
    for name in ("deepseek-r1.png", "llama-405b.png", "latency-sensitivity.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_plan(capsys):
    assert main(["plan", "--model", "deepseek-r1", "--context", "1M", "--gpus", "64", "--ttl-ms", "30"]) == 0
    text = capsys.readouterr().out
    assert "Helix" in text and "best baseline" in text and "recommendation" in text
    assert main(["plan", "--model", "llama-405b", "--context", "1M", "--gpus", "64", "--ttl-ms", "10",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["best"]["ttl_ms"] <= 10 and plan["best"]["memory_gb_per_gpu"] <= 186
    assert plan["best_helix"]["strategy"] == "Helix"


def test_plan_on_hgx_stays_in_the_nvlink_domain(capsys):
    assert main(["plan", "--model", "llama-405b", "--context", "128K", "--gpus", "16", "--ttl-ms", "50",
                 "--hardware", "b200-hgx", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["best"]["gpus"] <= 8 and plan["best"]["replicas"] == 16 // plan["best"]["gpus"]


def test_plan_impossible_budget(capsys):
    assert main(["plan", "--model", "llama-405b", "--context", "1M", "--gpus", "8", "--ttl-ms", "0.1"]) == 0
    assert "no sharding meets the budget" in capsys.readouterr().out


def test_plan_with_a_benchmark_and_a_config_json(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA_CONFIG))
    bench = write_bench(tmp_path / "h200.json")
    assert main(["plan", "--model", str(config), "--context", "64K", "--gpus", "8", "--ttl-ms", "40",
                 "--hardware", "h200-hgx", "--bench", str(bench)]) == 0
    assert "measured on NVIDIA H200" in capsys.readouterr().out


def test_cli_errors(capsys):
    assert main(["plan", "--model", "nope", "--context", "1M", "--gpus", "8", "--ttl-ms", "30"]) == 2
    assert "model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--model", "llama-405b", "--context", "lots", "--gpus", "8", "--ttl-ms", "30"])


def test_parse_tokens():
    assert parse_tokens("1M") == 1_000_000 and parse_tokens("128k") == 128_000 and parse_tokens("4096") == 4096
    assert parse_tokens("1.5M") == 1_500_000


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "helix_ext.sim", "reproduce", "--json"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)) == {"deepseek-r1", "llama-405b", "hopb_ablation"}


def test_simulator_imports_nothing_compiled():
    """helix_ext.sim runs on NumPy alone: loaded under a bare parent package, it pulls in neither torch
    nor the native library."""
    code = ("import sys, types; parent = types.ModuleType('helix_ext'); parent.__path__ = ['helix_ext']; "
            "sys.modules['helix_ext'] = parent; import helix_ext.sim, helix_ext.sim.__main__; "
            "assert 'torch' not in sys.modules and 'helix_ext._C' not in sys.modules, 'compiled parts imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
