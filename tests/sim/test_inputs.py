"""Hardware specs (and their override by a benchmark JSON), model specs from config.json, Pareto sets."""

import json

import numpy as np
import pytest

from helix_ext.sim import (DEEPSEEK_R1, GB200_NVL72, H200_HGX, LLAMA_405B, from_hf_config, get_hardware, get_model,
                           make_configs, evaluate, pareto)
from helix_ext.sim.sweep import Points, gains, interactivity_at_throughput, interactivity_loss


def write_bench(path, gpu="NVIDIA H200", copy_gbs=4000.0, results=None):
    report = {"gpu": gpu, "driver": "570.00", "torch": "2.11.0", "cuda": "13.0", "commit": "abc", "date": "2026-01-01",
              "copy_bandwidth_gbs": copy_gbs,
              "results": results if results is not None else [
                  {"op": "flash_decode", "shape": "G1", "median_us": 10.0, "achieved_gbs": 3200.0,
                   "fraction_of_copy_bw": 0.8},
                  {"op": "flash_decode", "shape": "G2", "median_us": 10.0, "achieved_gbs": 3600.0,
                   "fraction_of_copy_bw": 0.9},
                  {"op": "flash_decode", "shape": "M1", "median_us": 10.0, "achieved_gbs": 3400.0,
                   "fraction_of_copy_bw": 0.85},
                  {"op": "fp4_grouped_gemm", "shape": "F1", "median_us": 10.0, "achieved_gbs": 2400.0,
                   "fraction_of_copy_bw": 0.6},
                  {"op": "merge_states", "shape": "P=8", "median_us": 1.0, "achieved_gbs": 100.0,
                   "fraction_of_copy_bw": 0.02},
              ]}
    path.write_text(json.dumps(report))
    return path


def test_benchmark_json_overrides_bandwidth_and_efficiencies(tmp_path):
    measured = H200_HGX.with_benchmark(write_bench(tmp_path / "h200.json"))
    assert measured.hbm_bandwidth_bps == pytest.approx(4000e9)
    assert measured.attention_efficiency == pytest.approx(0.85)  # median of the flash_decode shapes
    assert measured.gemm_efficiency == pytest.approx(0.6)
    assert "NVIDIA H200" in measured.name
    # What the benchmark does not measure stays at the datasheet figure.
    assert measured.hbm_capacity_bytes == H200_HGX.hbm_capacity_bytes
    assert measured.fp8_flops == H200_HGX.fp8_flops and measured.nvlink_bandwidth_bps == H200_HGX.nvlink_bandwidth_bps
    # Slower measured kernels give a slower step than the datasheet.
    configs = make_configs("Helix", LLAMA_405B, 8)
    fast = evaluate(LLAMA_405B, H200_HGX, configs, [4], 128_000).ttl_s
    slow = evaluate(LLAMA_405B, measured, configs, [4], 128_000).ttl_s
    assert np.all(slow > fast)


def test_benchmark_json_without_some_ops_keeps_their_efficiency(tmp_path):
    path = write_bench(tmp_path / "b.json", results=[{"op": "merge_states", "fraction_of_copy_bw": 0.1}])
    measured = GB200_NVL72.with_benchmark(path)
    assert measured.attention_efficiency == 1.0 and measured.gemm_efficiency == 1.0


def test_benchmark_json_errors(tmp_path):
    with pytest.raises(ValueError, match="CPU"):
        GB200_NVL72.with_benchmark(write_bench(tmp_path / "cpu.json", gpu=None))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gpu": "x"}))
    with pytest.raises(ValueError, match="copy_bandwidth_gbs"):
        GB200_NVL72.with_benchmark(bad)
    with pytest.raises(ValueError, match="positive"):
        GB200_NVL72.with_benchmark(write_bench(tmp_path / "zero.json", copy_gbs=0))


def test_hardware_lookup_and_latency():
    assert get_hardware("GB200-NVL72") is GB200_NVL72
    assert GB200_NVL72.with_latency_us(3).collective_latency_s == pytest.approx(3e-6)
    with pytest.raises(ValueError, match="hardware"):
        get_hardware("tpu")
    with pytest.raises(ValueError, match="latency"):
        GB200_NVL72.with_latency_us(-1)


DEEPSEEK_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "intermediate_size": 18432,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "moe_intermediate_size": 2048,
    "first_k_dense_replace": 3, "vocab_size": 129280,
}
LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16384, "num_hidden_layers": 126,
    "num_attention_heads": 128, "num_key_value_heads": 8, "intermediate_size": 53248, "vocab_size": 128256,
}


@pytest.mark.parametrize("config, builtin", [(DEEPSEEK_CONFIG, DEEPSEEK_R1), (LLAMA_CONFIG, LLAMA_405B)])
def test_hf_config_matches_the_builtin(config, builtin, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    parsed = get_model(str(tmp_path / "m"))
    assert parsed.name == "m"
    for field in ("num_layers", "hidden_size", "num_q_heads", "num_kv_heads", "head_dim", "ffn_dim", "attention",
                  "kv_lora_rank", "num_experts", "top_k", "moe_ffn_dim", "num_dense_layers", "num_shared_experts"):
        assert getattr(parsed, field) == getattr(builtin, field), field
    assert parsed.total_params == builtin.total_params


def test_hf_config_mixtral_and_errors():
    mixtral = from_hf_config({"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                              "num_key_value_heads": 8, "intermediate_size": 14336, "num_local_experts": 8,
                              "num_experts_per_tok": 2}, name="mixtral")
    assert mixtral.is_moe and mixtral.num_experts == 8 and mixtral.moe_ffn_dim == 14336
    assert mixtral.num_dense_layers == 0 and mixtral.head_dim == 128
    assert 44e9 < mixtral.total_params < 47e9  # Mixtral-8x7B: 46.7B with embeddings
    with pytest.raises(ValueError, match="hidden_size"):
        from_hf_config({"num_hidden_layers": 2})
    with pytest.raises(ValueError, match="model"):
        get_model("no-such-model")


def test_builtin_parameter_counts():
    # Decoder layers only: DeepSeek-R1 671B and Llama-405B minus their embeddings and LM heads.
    assert DEEPSEEK_R1.total_params == pytest.approx(669.2e9, rel=1e-3)
    assert LLAMA_405B.total_params == pytest.approx(401.6e9, rel=1e-3)
    assert DEEPSEEK_R1.kv_elements_per_head == 576 and LLAMA_405B.kv_elements_per_head == 256


def _points(x, y):
    """Fake points with interactivity x and throughput per GPU y (one GPU, batch = y / x)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    configs = make_configs("TP", LLAMA_405B, 1)
    return Points("fake", configs, np.zeros(len(x), dtype=np.int64), y / x, 1 / x, np.zeros(len(x)))


def test_pareto_keeps_only_undominated_points():
    p = _points([1, 2, 3, 2, 1.5, 3], [10, 8, 2, 5, 9, 1])
    idx = pareto(p)
    assert list(idx) == [0, 4, 1, 2]  # (1,10) (1.5,9) (2,8) (3,2); (2,5) and (3,1) are dominated


def test_gains_and_interpolated_loss():
    base = _points([1, 2], [10, 1])
    helix = _points([1.5, 2, 3], [40, 20, 2])
    g = gains(helix, base)
    assert g.interactivity_gain == pytest.approx(1.5)
    assert g.throughput_gain == pytest.approx(20.0)     # at x = 2: 20 vs 1
    assert g.throughput_gain_at_90pct == pytest.approx(20.0)  # at x >= 1.8 both are the x = 2 points
    worse = _points([0.75, 1, 1.5], [40, 20, 2])        # half the interactivity everywhere
    loss, _ = interactivity_loss(helix, worse)
    assert loss == pytest.approx(0.5)
    fx, fy = np.array([1.0, 4.0]), np.array([100.0, 1.0])
    assert interactivity_at_throughput(fx, fy, np.array([10.0]))[0] == pytest.approx(2.0)  # log-log midpoint
    assert np.isnan(interactivity_at_throughput(fx, fy, np.array([1000.0]))[0])
