"""The paper's two studies (reproduction), the latency sensitivity, and the planner.

Paper (arXiv 2507.07120), 1M context, GB200 NVL72, FP4, 1-64 GPUs:
  DeepSeek-R1 vs TP, PP, EP: up to 1.5x interactivity, up to 32x throughput per GPU.
  Llama-3.1-405B vs TP, PP, EP, Medha: 1.13x interactivity, 4x throughput.
  HOP-B off: up to 12% lower interactivity (Llama-405B), ~1% (DeepSeek-R1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from helix_ext.sim.costs import ModelingOptions
from helix_ext.sim.hardware import DEFAULT_COLLECTIVE_LATENCY_US, GB200_NVL72, LATENCY_SWEEP_US, HardwareSpec
from helix_ext.sim.models import DEEPSEEK_R1, LLAMA_405B, ModelSpec
from helix_ext.sim.strategies import BASELINES
from helix_ext.sim.sweep import Gains, Points, PointSet, batch_grid, gains, interactivity_loss, progress, sweep

PAPER_CONTEXT = 1_000_000


@dataclass(frozen=True)
class StudySpec:
    key: str
    model: ModelSpec
    baselines: tuple[str, ...]
    extra_baselines: tuple[str, ...]  # reported as a labelled extra, not in the headline
    paper_interactivity_gain: float
    paper_throughput_gain: float
    paper_hopb_loss: float


STUDIES = (
    # MLA has one KV head: attention TP beyond 1 duplicates the cache, and the paper leaves Medha out.
    StudySpec("deepseek-r1", DEEPSEEK_R1, ("TP", "PP", "EP"), ("Medha",), 1.5, 32.0, 0.01),
    StudySpec("llama-405b", LLAMA_405B, ("TP", "PP", "EP", "Medha"), (), 1.13, 4.0, 0.12),
)


@dataclass
class StudyResult:
    spec: StudySpec
    hardware: HardwareSpec
    context: float
    points: dict[str, Points]                 # every strategy, plus "Helix (HOP-B off)" and the Fig. 3 reading
    gains: Gains                              # Helix vs the paper's baseline set
    gains_with_extra: Gains | None            # ... with the extra baselines added
    hopb_loss: float                          # HOP-B off = one exchange after all attention
    hopb_loss_throughput: float
    fig3_loss: float                          # HOP-B off = every request's exchange on its own
    fig3_loss_throughput: float
    baseline_set: PointSet = field(repr=False)

    @property
    def latency_us(self) -> float:
        return self.hardware.collective_latency_s * 1e6

    def summary(self) -> dict:
        g = self.gains
        out = {
            "model": self.spec.model.name, "latency_us": self.latency_us, "baselines": list(self.spec.baselines),
            "interactivity_gain": g.interactivity_gain, "throughput_gain": g.throughput_gain,
            "throughput_gain_at_0.9x": g.throughput_gain_at_90pct, "hopb_ablation": self.hopb_loss,
            "hopb_ablation_fig3_reading": self.fig3_loss,
            "baseline_max_interactivity_point": g.baseline_point, "helix_max_interactivity_point": g.helix_point,
            "helix_point_at_baseline_max": g.helix_point_at_baseline_max,
            "paper": {"interactivity_gain": self.spec.paper_interactivity_gain,
                      "throughput_gain": self.spec.paper_throughput_gain, "hopb_ablation": self.spec.paper_hopb_loss},
        }
        if self.gains_with_extra is not None:
            e = self.gains_with_extra
            out["with_" + "_".join(s.lower() for s in self.spec.extra_baselines)] = {
                "interactivity_gain": e.interactivity_gain, "throughput_gain": e.throughput_gain,
                "throughput_gain_at_0.9x": e.throughput_gain_at_90pct, "baseline_point": e.baseline_point}
        return out


def run_study(spec: StudySpec, hardware: HardwareSpec = GB200_NVL72, context: float = PAPER_CONTEXT,
              options: ModelingOptions | None = None, batches=None, max_gpus: int | None = None) -> StudyResult:
    batches = batch_grid() if batches is None else batches
    run = lambda strategy, hopb="on": sweep(spec.model, hardware, strategy, context, batches,  # noqa: E731
                                            max_gpus, options, hopb)
    points = {s: run(s) for s in BASELINES + ("Helix",)}
    points["Helix (HOP-B off)"] = run("Helix", "off")
    points["Helix (Fig. 3 off)"] = run("Helix", "per-request")
    baseline_set = PointSet("best baseline", [points[s] for s in spec.baselines])
    helix = points["Helix"]
    extra = None
    if spec.extra_baselines:
        extra = gains(helix, PointSet("baselines + extra", [points[s] for s in spec.baselines + spec.extra_baselines]))
    hopb, hopb_at = interactivity_loss(helix, points["Helix (HOP-B off)"])
    fig3, fig3_at = interactivity_loss(helix, points["Helix (Fig. 3 off)"])
    return StudyResult(spec, hardware, context, points, gains(helix, baseline_set), extra, hopb, hopb_at, fig3,
                       fig3_at, baseline_set)


def reproduce(latency_us: float = DEFAULT_COLLECTIVE_LATENCY_US, latencies=LATENCY_SWEEP_US,
              hardware: HardwareSpec = GB200_NVL72, options: ModelingOptions | None = None,
              show_progress: bool | None = None) -> dict:
    """Both studies at ``latency_us`` (the headline) and at every latency of ``latencies``."""
    latencies = sorted(set(latencies) | {latency_us})
    runs = [(lat, spec) for lat in latencies for spec in STUDIES]
    results: dict[float, dict[str, StudyResult]] = {}
    for lat, spec in progress(runs, "sweeping", show_progress):
        results.setdefault(lat, {})[spec.key] = run_study(spec, hardware.with_latency_us(lat), options=options)
    return {"latency_us": latency_us, "headline": results[latency_us], "by_latency": results}


def headline_json(headline: dict[str, StudyResult]) -> dict:
    """Exactly the issue's --json shape."""
    return {
        **{key: {"throughput_gain": r.gains.throughput_gain, "interactivity_gain": r.gains.interactivity_gain}
           for key, r in headline.items()},
        "hopb_ablation": {key: (None if np.isnan(r.hopb_loss) else r.hopb_loss) for key, r in headline.items()},
    }


def _point_text(point: dict) -> str:
    return (f"{point['strategy']} {point['layout']}, B={point['batch']}: {point['interactivity']:.0f} tok/s/user, "
            f"{point['throughput_per_gpu']:.2f} tok/s/GPU")


def _row(model, baselines, interactivity, throughput, at_90, hopb, fig3) -> str:
    return (f"{model:<16} {baselines:<18} {interactivity:>14} {throughput:>13} {at_90:>8} {hopb:>13} "
            f"{fig3:>9}").rstrip()


def headline_table(reproduction: dict) -> str:
    lat = reproduction["latency_us"]
    lines = [f"Helix vs the best baseline: 1M context, GB200 NVL72, FP4, 1-64 GPUs, collective latency {lat:g} us",
             "(paper's number in brackets; throughput gain at the baseline's highest interactivity, and at 0.9x it)",
             "",
             _row("model", "baselines", "interactivity", "throughput", "at 0.9x", "HOP-B off", "Fig.3 off")]
    for r in reproduction["headline"].values():
        g, p = r.gains, r.spec
        lines.append(_row(p.model.name, ", ".join(p.baselines),
                          f"{g.interactivity_gain:.2f}x ({p.paper_interactivity_gain:g}x)",
                          f"{g.throughput_gain:.1f}x ({p.paper_throughput_gain:g}x)", f"{g.throughput_gain_at_90pct:.1f}x",
                          f"{r.hopb_loss:.1%} ({p.paper_hopb_loss:.0%})", f"{r.fig3_loss:.1%}"))
        if r.gains_with_extra is not None:
            e = r.gains_with_extra
            lines.append(_row("  extra:", "+ " + ", ".join(p.extra_baselines), f"{e.interactivity_gain:.2f}x",
                              f"{e.throughput_gain:.1f}x", f"{e.throughput_gain_at_90pct:.1f}x", "", ""))
    lines.append("")
    for r in reproduction["headline"].values():
        g = r.gains
        lines.append(f"{r.spec.model.name}:")
        lines.append(f"  baseline's most interactive point: {_point_text(g.baseline_point)}")
        if g.helix_point_at_baseline_max:
            lines.append(f"  Helix's best at that latency:      {_point_text(g.helix_point_at_baseline_max)}")
        lines.append(f"  Helix's most interactive point:    {_point_text(g.helix_point)}")
        lines.append(f"  HOP-B off costs most at {r.hopb_loss_throughput:.0f} tok/s/GPU; the Fig. 3 reading at "
                     f"{r.fig3_loss_throughput:.0f} tok/s/GPU")
    return "\n".join(lines)


def sensitivity_table(reproduction: dict) -> str:
    keys = [s.key for s in STUDIES]
    head = f"{'latency':>8} | " + " | ".join(f"{k + ': thr / @0.9x / inter / HOP-B':<40}" for k in keys)
    lines = ["Headlines against the per-collective latency (the model's key unpublished constant):", head,
             "-" * len(head)]
    for lat, results in sorted(reproduction["by_latency"].items()):
        cells = []
        for k in keys:
            r = results[k]
            g = r.gains
            cells.append(f"{g.throughput_gain:>6.1f}x / {g.throughput_gain_at_90pct:>5.1f}x / "
                         f"{g.interactivity_gain:>5.2f}x / {r.hopb_loss:>5.1%}".ljust(40))
        mark = " <- headline" if lat == reproduction["latency_us"] else ""
        lines.append(f"{lat:>6g}us | " + " | ".join(cells) + mark)
    return "\n".join(lines)


def sensitivity_json(reproduction: dict) -> dict:
    return {f"{lat:g}": {key: {"throughput_gain": r.gains.throughput_gain,
                               "throughput_gain_at_0.9x": r.gains.throughput_gain_at_90pct,
                               "interactivity_gain": r.gains.interactivity_gain, "hopb_ablation": r.hopb_loss,
                               "hopb_ablation_fig3_reading": r.fig3_loss}
                         for key, r in results.items()}
            for lat, results in sorted(reproduction["by_latency"].items())}


# ------------------------------------------------------------------------------ planner
@dataclass(frozen=True)
class Plan:
    budget_ttl_s: float
    gpus: int
    best_helix: dict | None
    best_baseline: dict | None
    best: dict | None

    def as_dict(self) -> dict:
        return {"ttl_budget_ms": self.budget_ttl_s * 1e3, "gpus": self.gpus, "best": self.best,
                "best_helix": self.best_helix, "best_baseline": self.best_baseline}


def _best_under_budget(points: Points, budget_s: float, gpus: int) -> dict | None:
    """The point that serves the most tokens/s on ``gpus`` GPUs (as many replicas as fit) within the budget."""
    ok = np.nonzero(points.ttl_s <= budget_s)[0]
    if len(ok) == 0:
        return None
    replicas = gpus // points.configs.gpus[points.config_index[ok]]
    total = replicas * points.batch[ok] / points.ttl_s[ok]
    # Ties (within 0.1%) go to the more interactive point.
    top = ok[total >= total.max() * (1 - 1e-3)]
    i = int(top[np.argmax(points.interactivity[top])])
    point = points.describe(i)
    point["replicas"] = gpus // point["gpus"]
    point["total_tokens_per_s"] = point["replicas"] * point["batch"] / (point["ttl_ms"] * 1e-3)
    point["tokens_per_s_per_gpu_of_all"] = point["total_tokens_per_s"] / gpus
    point["concurrent_users"] = point["replicas"] * point["batch"]
    return point


def plan(model: ModelSpec, hardware: HardwareSpec, context: float, gpus: int, ttl_budget_s: float,
         options: ModelingOptions | None = None, strategies=BASELINES + ("Helix",)) -> Plan:
    """The sharding that serves the most tokens/s on ``gpus`` GPUs with every token within the TTL
    budget: the best Helix layout, the best baseline layout, and the better of the two.

    One instance spans at most ``gpus`` GPUs and one NVLink domain; ``gpus`` holds as many
    replicas of it as fit (a 48-GPU instance on 64 GPUs leaves 16 idle, and is scored so).
    """
    if gpus < 1:
        raise ValueError(f"gpus: expected >= 1, got {gpus}")
    if ttl_budget_s <= 0:
        raise ValueError(f"ttl budget: expected > 0, got {ttl_budget_s}")
    max_gpus = min(gpus, hardware.nvlink_domain_gpus)
    best = {}
    for strategy in progress(strategies, "planning", False):
        best[strategy] = _best_under_budget(sweep(model, hardware, strategy, context, max_gpus=max_gpus,
                                                  options=options), ttl_budget_s, gpus)
    key = lambda p: p["total_tokens_per_s"] if p else -1.0  # noqa: E731
    baselines = [best[s] for s in strategies if s != "Helix" and best[s]]
    best_baseline = max(baselines, key=key) if baselines else None
    helix = best.get("Helix")
    # A tie (within 0.1%) goes to the baseline: the conventional layout, and Helix with KVP = 1 is TP anyway.
    if helix and (best_baseline is None or key(helix) > key(best_baseline) * (1 + 1e-3)):
        choice = helix
    else:
        choice = best_baseline
    return Plan(ttl_budget_s, gpus, helix, best_baseline, choice)


def plan_text(model: ModelSpec, hardware: HardwareSpec, context: float, result: Plan) -> str:
    lines = [f"{model.name}, {context:,.0f}-token context, {result.gpus} x {hardware.name}, "
             f"TTL <= {result.budget_ttl_s * 1e3:g} ms, collective latency "
             f"{hardware.collective_latency_s * 1e6:g} us"]
    if result.best is None:
        lines.append("  no sharding meets the budget within HBM (try more GPUs, a shorter context or a looser TTL)")
        return "\n".join(lines)
    for label, p in (("Helix", result.best_helix), ("best baseline", result.best_baseline)):
        if p is None:
            lines.append(f"  {label:<14} none meets the budget")
            continue
        replicas = f"{p['replicas']} replica" + ("s" if p["replicas"] != 1 else "")
        lines.append(f"  {label:<14} {p['strategy']} {p['layout']} on {p['gpus']} GPUs x {replicas}, "
                     f"batch {p['batch']} per instance")
        lines.append(f"  {'':<14} TTL {p['ttl_ms']:.2f} ms = {p['interactivity']:.0f} tok/s/user; "
                     f"{p['throughput_per_gpu']:.1f} tok/s/GPU per instance, {p['total_tokens_per_s']:.0f} tok/s "
                     f"and {p['concurrent_users']} users on all {result.gpus} GPUs; "
                     f"{p['memory_gb_per_gpu']:.1f} of {hardware.hbm_capacity_bytes / 1e9:.0f} GB per GPU")
    if result.best_helix and result.best_baseline:
        ratio = result.best_helix["total_tokens_per_s"] / result.best_baseline["total_tokens_per_s"]
        lines.append(f"  recommendation: {result.best['strategy']} {result.best['layout']} "
                     f"(Helix / best baseline: {ratio:.2f}x tok/s at this budget)")
    else:
        lines.append(f"  recommendation: {result.best['strategy']} {result.best['layout']}")
    return "\n".join(lines)
