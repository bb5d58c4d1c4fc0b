"""Monotonicity, memory feasibility and HOP-B properties over whole sweeps."""

import numpy as np
import pytest

from helix_ext.sim import (B200_HGX, DEEPSEEK_R1, GB200_NVL72, H200_HGX, LLAMA_405B, STRATEGIES, batch_grid, evaluate,
                           make_configs, sweep)

MODELS = [DEEPSEEK_R1, LLAMA_405B]
BATCHES = batch_grid(max_batch=1024, every_integer_to=64, geometric_points=12)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_more_context_is_never_faster(model, strategy):
    configs = make_configs(strategy, model, 64)
    contexts = [1_000, 32_000, 128_000, 1_000_000, 4_000_000]
    ttls = [evaluate(model, GB200_NVL72, configs, BATCHES, s).ttl_s for s in contexts]
    for shorter, longer in zip(ttls, ttls[1:]):
        assert np.all(longer >= shorter)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_more_batch_is_never_faster(model, strategy):
    ttl = evaluate(model, GB200_NVL72, make_configs(strategy, model, 64), BATCHES, 1e6).ttl_s
    assert np.all(np.diff(ttl, axis=1) >= -1e-15)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
@pytest.mark.parametrize("strategy", ["Helix", "Medha"])
def test_more_kvp_never_more_kv_bytes_per_gpu(model, strategy):
    configs = make_configs(strategy, model, 64)
    kv = evaluate(model, GB200_NVL72, configs, BATCHES, 1e6).kv_bytes_per_gpu
    for tpa in np.unique(configs.tpa):
        same = np.nonzero(configs.tpa == tpa)[0]
        order = same[np.argsort(configs.kvp[same], kind="stable")]
        by_kvp = kv[order]
        assert np.all(np.diff(by_kvp, axis=0) <= 1e-6), f"TPA={tpa}"
        assert configs.kvp[order][-1] > configs.kvp[order][0] or len(order) == 1


def test_kvp_shards_the_cache_and_tp_beyond_k_duplicates_it():
    helix, tp = make_configs("Helix", LLAMA_405B, 64), make_configs("TP", LLAMA_405B, 64)
    kv_helix = evaluate(LLAMA_405B, GB200_NVL72, helix, [1], 1e6).kv_bytes_per_gpu[:, 0]
    kv_tp = evaluate(LLAMA_405B, GB200_NVL72, tp, [1], 1e6).kv_bytes_per_gpu[:, 0]
    one_request = 126 * 8 * 256 * 1e6 * 0.5  # every layer's K and V of every KV head, FP4
    n = helix.gpus
    assert np.allclose(kv_helix * n, one_request)                 # Helix: no duplication at any N
    assert np.allclose(kv_tp[tp.gpus >= 8], one_request / 8)      # TP > K: one whole KV head per GPU
    assert np.allclose(kv_tp * tp.gpus, one_request * np.maximum(tp.gpus / 8, 1))


@pytest.mark.parametrize("hw", [GB200_NVL72, B200_HGX, H200_HGX], ids=lambda h: h.name)
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_every_swept_point_fits_in_hbm(hw, model):
    for strategy in STRATEGIES:
        points = sweep(model, hw, strategy, 1e6, BATCHES)
        assert np.all(points.memory_bytes <= hw.usable_hbm_bytes)
        assert np.all(points.configs.gpus <= hw.nvlink_domain_gpus)


def test_memory_feasibility_hand_computed():
    """Llama-405B TP=8 at 1M context: 201.6 GB of FP4 weights / 8 + 16.9 GB of KV per request per GPU."""
    configs = make_configs("TP", LLAMA_405B, 8)
    i = int(np.nonzero(configs.gpus == 8)[0][0])
    weights = LLAMA_405B.total_params * 0.5 / 8
    kv_per_request = 126 * 256 * 1e6 * 0.5  # one KV head per GPU
    max_batch = int((GB200_NVL72.usable_hbm_bytes - weights) // kv_per_request)
    assert max_batch == 8
    step = evaluate(LLAMA_405B, GB200_NVL72, configs, np.arange(1, 20), 1e6)
    assert step.weight_bytes_per_gpu[i, 0] == pytest.approx(weights)
    assert np.nonzero(step.feasible[i])[0].max() + 1 == max_batch
    # No GPU holds all of Llama-405B's FP4 weights (201 GB > 186 GB): one GPU is never feasible.
    single = evaluate(LLAMA_405B, GB200_NVL72, make_configs("TP", LLAMA_405B, 1), [1], 1000)
    assert not single.feasible.any()


def test_weights_are_not_duplicated_by_tp_within_k():
    configs = make_configs("TP", LLAMA_405B, 8)
    step = evaluate(LLAMA_405B, GB200_NVL72, configs, [1], 1000)
    assert np.allclose(step.weight_bytes_per_gpu[:, 0] * configs.gpus, LLAMA_405B.total_params * 0.5)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
@pytest.mark.parametrize("latency_us", [0, 1, 7, 20])
def test_hopb_never_hurts(model, latency_us):
    hw = GB200_NVL72.with_latency_us(latency_us)
    configs = make_configs("Helix", model, 64)
    on, off, per_request = (evaluate(model, hw, configs, BATCHES, 1e6, hopb=mode).ttl_s
                            for mode in ("on", "off", "per-request"))
    assert np.all(on <= off * (1 + 1e-12))
    assert np.all(off <= per_request * (1 + 1e-12))
    # KVP = 1 has no exchange: all three agree.
    single = configs.kvp == 1
    assert np.array_equal(on[single], off[single]) and np.array_equal(on[single], per_request[single])


def test_hopb_hides_bandwidth_never_latency():
    """At a batch of one there is nothing to overlap: HOP-B on and off cost the same."""
    hw = GB200_NVL72.with_latency_us(7)
    configs = make_configs("Helix", LLAMA_405B, 64)
    on = evaluate(LLAMA_405B, hw, configs, [1], 1e6, hopb="on").ttl_s
    off = evaluate(LLAMA_405B, hw, configs, [1], 1e6, hopb="off").ttl_s
    assert np.array_equal(on, off)


def test_more_latency_is_never_faster():
    configs = make_configs("Helix", DEEPSEEK_R1, 64)
    ttl = [evaluate(DEEPSEEK_R1, GB200_NVL72.with_latency_us(lat), configs, BATCHES, 1e6).ttl_s for lat in (1, 7, 20)]
    assert np.all(ttl[1] >= ttl[0]) and np.all(ttl[2] >= ttl[1])


def test_configs_respect_the_model_shapes():
    helix = make_configs("Helix", DEEPSEEK_R1, 64)
    assert set(helix.tpa) == {1}  # MLA: one KV head, TPA <= K
    assert np.all(helix.kvp * helix.tpa == helix.gpus) and np.all(helix.tpf * helix.ep == helix.gpus)
    assert np.all(DEEPSEEK_R1.num_experts % helix.ep == 0)
    llama = make_configs("Helix", LLAMA_405B, 64)
    assert set(llama.tpa) == {1, 2, 4, 8} and set(llama.ep) == {1}
    assert llama.gpus.max() == 64 and len(np.unique(llama.gpus)) == 64
    ep = make_configs("EP", LLAMA_405B, 64)
    assert np.all(ep.dpa * ep.tpa == ep.gpus) and np.all(ep.tpf == ep.gpus)
    with pytest.raises(ValueError, match="strategy"):
        make_configs("DP", LLAMA_405B, 8)
