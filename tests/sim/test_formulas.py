"""The paper's Appendix A formulas and the step-time model on hand-computed cases."""

import math

import numpy as np
import pytest

from helix_ext.sim import (DEEPSEEK_R1, GB200_NVL72, H200_HGX, LLAMA_405B, ModelingOptions, appendix_a_kv_time,
                           appendix_a_weight_time, evaluate, make_configs)
from helix_ext.sim.costs import (all_gather_time, all_reduce_time, all_to_all_time, expected_distinct_experts,
                                 hopb_exchange_time, kernel_time)

HBM = 8e12  # GB200, the paper's constant
FP4 = 0.5


def test_kv_time_llama_hand_computed():
    # B * 2 * ceil(8/8) * 128 * 1e6 * 0.5 bytes = 128 MB, over KVP=8 GPUs' 8 TB/s: 2 us.
    assert appendix_a_kv_time(LLAMA_405B, 1, 1e6, 8, 8, FP4, HBM) == pytest.approx(2.0e-6, rel=1e-12)
    # TPA beyond K duplicates: ceil(8/16) = 1 KV head, the same bytes as TPA = 8.
    assert appendix_a_kv_time(LLAMA_405B, 1, 1e6, 16, 8, FP4, HBM) == appendix_a_kv_time(LLAMA_405B, 1, 1e6, 8, 8,
                                                                                            FP4, HBM)
    # Linear in batch and context, inverse in KVP.
    assert appendix_a_kv_time(LLAMA_405B, 4, 5e5, 8, 2, FP4, HBM) == pytest.approx(4 * 0.5 * 4 * 2.0e-6)


def test_kv_time_mla_hand_computed():
    # One latent head of 512 + 64 = 576 elements per token: 288 MB at 1M tokens, over 64 GPUs' 8 TB/s.
    assert appendix_a_kv_time(DEEPSEEK_R1, 1, 1e6, 1, 64, FP4, HBM) == pytest.approx(288e6 / (64 * 8e12))


def test_weight_time_llama_hand_computed():
    h, q, hsz, f = 16384, 128, 128, 53248
    params = 2 * h * (q / 8) * hsz + 2 * h * 1 * hsz + 3 * h * f / 64  # = 112,197,632
    assert params == 112_197_632
    assert appendix_a_weight_time(LLAMA_405B, 8, 64, FP4, HBM) == pytest.approx(params * 0.5 / 8e12, rel=1e-12)
    assert appendix_a_weight_time(LLAMA_405B, 8, 64, FP4, HBM) == pytest.approx(7.012352e-6, rel=1e-9)


def test_weight_time_refuses_mla():
    with pytest.raises(ValueError, match="dense GQA"):
        appendix_a_weight_time(DEEPSEEK_R1, 1, 64, FP4, HBM)


@pytest.mark.parametrize("tp", [1, 2, 4, 8, 16, 32, 64])
def test_tp_step_model_reads_exactly_the_appendix_a_bytes(tp):
    """Under plain TP (TPA = TPF = N) the step model's per-layer weight and KV bytes are Appendix A's."""
    configs = make_configs("TP", LLAMA_405B, 64)
    i = int(np.nonzero(configs.gpus == tp)[0][0])
    batch, context = 3, 123_456
    step = evaluate(LLAMA_405B, GB200_NVL72, configs, [batch], context)
    layers = LLAMA_405B.num_layers
    weights = appendix_a_weight_time(LLAMA_405B, tp, tp, FP4, HBM) * HBM
    kv = appendix_a_kv_time(LLAMA_405B, batch, context, tp, 1, FP4, HBM) * HBM
    assert step.weight_bytes_per_gpu[i, 0] / layers == pytest.approx(weights, rel=1e-12)
    assert step.kv_bytes_per_gpu[i, 0] / layers == pytest.approx(kv, rel=1e-12)


def test_helix_llama_step_hand_computed():
    """Helix KVP=8 x TPA=8, TPF=64, B=1, 1M context, 7 us per collective, every term by hand."""
    hw = GB200_NVL72.with_latency_us(7)
    lat, link = 7e-6, 900e9
    proj = (16384 * 16 * 128 + 2 * 16384 * 128) * 0.5 / HBM         # Q of 16 heads, K and V of one head
    attention = 128e6 / (8 * HBM)                                     # 1/8 of one head's 1M-token K and V
    exchange = lat + 1 * 16 * (128 * 2 + 4) * (7 / 8) / link          # partials (bf16) + LSE (fp32), 7/8 leave
    o_proj = 128 * 128 * 16384 / 64 * 0.5 / HBM
    all_reduce = lat + 2 * 63 / 64 * 16384 * 2 / link
    ffn = 3 * 16384 * 53248 / 64 * 0.5 / HBM
    layer = proj + attention + exchange + o_proj + all_reduce + ffn + all_reduce
    configs = make_configs("Helix", LLAMA_405B, 64)
    i = int(np.nonzero((configs.kvp == 8) & (configs.tpa == 8))[0][0])
    ttl = evaluate(LLAMA_405B, hw, configs, [1], 1e6).ttl_s[i, 0]
    assert ttl == pytest.approx(126 * layer, rel=1e-12)
    assert 1 / ttl == pytest.approx(280.2, abs=0.1)


def test_collectives_ring_factors():
    hw = GB200_NVL72.with_latency_us(5)
    m = 9e8  # 1 ms of NVLink 5 in one direction (900 GB/s)
    assert all_reduce_time(hw, 4, m) == pytest.approx(5e-6 + 2 * 3 / 4 * 1e-3)
    assert all_gather_time(hw, 4, m) == pytest.approx(5e-6 + 3 / 4 * 1e-3)
    assert all_to_all_time(hw, 4, m) == pytest.approx(5e-6 + 1e-3)
    assert all_reduce_time(hw, 1, m) == 0.0 and all_gather_time(hw, 1, m) == 0.0 and all_to_all_time(hw, 1, m) == 0.0


def test_kernel_time_max_or_sum():
    # 8 MB at 8 TB/s = 1 us; 5 GFLOP at 10 PFLOP/s = 0.5 us.
    assert kernel_time(8e6, 5e9, 8e12, 1e16, "max") == pytest.approx(1e-6)
    assert kernel_time(8e6, 5e9, 8e12, 1e16, "sum") == pytest.approx(1.5e-6)


def test_mla_decode_sits_near_the_ridge():
    """Absorbed MLA decode in FP4: ~970 FLOP per KV byte against GB200's 1250 (the max/sum choice matters)."""
    intensity = DEEPSEEK_R1.num_q_heads * DEEPSEEK_R1.attention_flops_per_head_token / (576 * 0.5)
    ridge = GB200_NVL72.flops("fp4") / GB200_NVL72.hbm_bandwidth_bps
    assert 0.7 < intensity / ridge < 0.85
    configs = make_configs("TP", DEEPSEEK_R1, 1)
    fast = evaluate(DEEPSEEK_R1, GB200_NVL72, configs, [4], 1e6).ttl_s
    slow = evaluate(DEEPSEEK_R1, GB200_NVL72, configs, [4], 1e6, ModelingOptions(kernel_time="sum")).ttl_s
    assert slow[0, 0] > 1.4 * fast[0, 0]  # attention is most of the step at 1M context


def test_expected_distinct_experts():
    # One token, top-8 of 256, all experts on the GPU: exactly 8 in expectation.
    assert expected_distinct_experts(256, 256, 8, 1) == pytest.approx(8.0)
    # Many tokens: every expert.
    assert expected_distinct_experts(32, 256, 8, 10_000) == pytest.approx(32.0)
    # The busiest GPU reads at least one expert.
    assert expected_distinct_experts(4, 256, 8, 1) == 1.0
    assert expected_distinct_experts(4, 256, 8, 100) == pytest.approx(4 * (1 - (1 - 8 / 256) ** 100))


def test_hopb_exchange_time_hand_computed():
    hw = GB200_NVL72.with_latency_us(5)
    t_attn, v = 100e-6, 20e-6 * 900e9  # exchange bandwidth part 20 us
    off = hopb_exchange_time(t_attn, v, hw, 8, "off", 32)
    assert off == pytest.approx(125e-6)
    # n chunks: max(n t_c + t_m, t_c + n t_m) = max(105 + 20/n, 100/n + 5n + 20) us; n = 4: max(110, 65) = 110;
    # n = 8 (the batch caps it): max(107.5, 72.5) = 107.5, the best.
    assert hopb_exchange_time(t_attn, v, hw, 4, "on", 32) == pytest.approx(110e-6)
    assert hopb_exchange_time(t_attn, v, hw, 8, "on", 32) == pytest.approx(107.5e-6)
    # Overlap never hides the last chunk's latency: on >= attention + one latency.
    assert hopb_exchange_time(t_attn, v, hw, 10_000, "on", 32) >= t_attn + 5e-6
    # The Figure 3 reading: one latency per request.
    assert hopb_exchange_time(t_attn, v, hw, 8, "per-request", 32) == pytest.approx(100e-6 + 8 * 5e-6 + 20e-6)
    # No exchange (KVP = 1): attention alone.
    assert hopb_exchange_time(t_attn, 0.0, hw, 8, "on", 32) == t_attn


def test_hopper_multiplies_fp4_at_the_fp8_rate():
    assert H200_HGX.flops("fp4") == H200_HGX.flops("fp8") == pytest.approx(1979e12)
    assert GB200_NVL72.flops("fp4") == pytest.approx(10e15)
    with pytest.raises(ValueError, match="precision"):
        GB200_NVL72.flops("fp16")


def test_pipeline_ttl_hand_computed():
    """PP = 2 x TP = 1, B = 2: two microbatches of 1; TTL = 2 * (63 layers of one request + one hop)."""
    hw = GB200_NVL72.with_latency_us(7)
    configs = make_configs("PP", LLAMA_405B, 2)
    i = int(np.nonzero((configs.pp == 2) & (configs.tpa == 1))[0][0])
    single = evaluate(LLAMA_405B, hw, make_configs("TP", LLAMA_405B, 1), [1], 1e6).ttl_s[0, 0]  # one GPU, 126 layers
    hop = 7e-6 + 16384 * 2 / 900e9
    ttl = evaluate(LLAMA_405B, hw, configs, [2], 1e6).ttl_s[i, 0]
    assert ttl == pytest.approx(2 * (single * 63 / 126 + hop), rel=1e-12)
    assert math.isclose(ttl, single + 2 * hop, rel_tol=1e-12)
