"""The paper's headlines at the chosen collective latency, within issue 7's bounds."""

import time

import pytest

from helix_ext.sim import DEFAULT_COLLECTIVE_LATENCY_US, GB200_NVL72, LATENCY_SWEEP_US, STUDIES, headline_json, \
    reproduce, run_study

BOUNDS = {  # issue 7: (throughput gain), (interactivity gain); the paper: 32x / 1.5x and 4x / 1.13x
    "deepseek-r1": ((16.0, 48.0), (1.2, 2.0)),
    "llama-405b": ((2.5, 6.0), (1.03, 1.3)),
}


@pytest.fixture(scope="module")
def headline():
    hw = GB200_NVL72.with_latency_us(DEFAULT_COLLECTIVE_LATENCY_US)
    return {spec.key: run_study(spec, hw) for spec in STUDIES}


@pytest.mark.parametrize("key", sorted(BOUNDS))
def test_headline_within_bounds(headline, key):
    (thr_lo, thr_hi), (int_lo, int_hi) = BOUNDS[key]
    g = headline[key].gains
    assert thr_lo <= g.throughput_gain <= thr_hi, g.throughput_gain
    assert int_lo <= g.interactivity_gain <= int_hi, g.interactivity_gain


def test_hardware_constants_are_the_public_specs():
    """The bounds must be met with datasheet constants, not fitted ones."""
    hw = GB200_NVL72
    assert hw.hbm_bandwidth_bps == 8e12 and hw.hbm_capacity_bytes == 186e9
    assert (hw.fp4_flops, hw.fp8_flops, hw.bf16_flops) == (10e15, 5e15, 2.5e15)
    assert hw.nvlink_bandwidth_bps == 900e9
    assert hw.attention_efficiency == hw.gemm_efficiency == hw.compute_efficiency == hw.link_efficiency == 1.0
    assert DEFAULT_COLLECTIVE_LATENCY_US in LATENCY_SWEEP_US


def test_the_32x_lives_at_the_end_of_the_baseline_frontier(headline):
    """A little below the baseline's highest interactivity the gain is several times smaller."""
    g = headline["deepseek-r1"].gains
    assert g.throughput_gain_at_90pct < g.throughput_gain / 3
    assert g.baseline_point["batch"] == 1  # the baseline's end serves one user


def test_baseline_sets_follow_the_paper(headline):
    assert headline["deepseek-r1"].spec.baselines == ("TP", "PP", "EP")
    assert headline["deepseek-r1"].gains_with_extra is not None  # Medha, reported as an extra
    assert headline["llama-405b"].spec.baselines == ("TP", "PP", "EP", "Medha")
    # Adding a baseline can only shrink the gains.
    extra = headline["deepseek-r1"].gains_with_extra
    assert extra.interactivity_gain <= headline["deepseek-r1"].gains.interactivity_gain


def test_hopb_ablations_are_fractions(headline):
    for result in headline.values():
        assert 0.0 <= result.hopb_loss < 1.0
        assert result.hopb_loss <= result.fig3_loss < 1.0


def test_gains_shrink_as_collective_latency_grows():
    """Helix adds one collective per layer: its interactivity edge falls with the latency."""
    spec = STUDIES[1]
    gains = [run_study(spec, GB200_NVL72.with_latency_us(lat)).gains.interactivity_gain for lat in (1, 7, 20)]
    assert gains[0] > gains[1] > gains[2]


def test_whole_reproduction_is_fast_and_has_the_json_shape():
    start = time.perf_counter()
    result = reproduce()
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"the reproduction took {elapsed:.1f} s"
    assert sorted(result["by_latency"]) == sorted(LATENCY_SWEEP_US)
    out = headline_json(result["headline"])
    assert set(out) == {"deepseek-r1", "llama-405b", "hopb_ablation"}
    for key in ("deepseek-r1", "llama-405b"):
        assert set(out[key]) == {"throughput_gain", "interactivity_gain"}
        assert all(isinstance(v, float) for v in out[key].values())
    assert set(out["hopb_ablation"]) == {"deepseek-r1", "llama-405b"}
