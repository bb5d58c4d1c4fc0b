"""Normalized Pareto frontiers (throughput per GPU vs interactivity), like the paper's figures.

Needs matplotlib (``pip install helix-ext[sim]``). Both axes are normalized to the best
baseline's frontier: interactivity to its highest, throughput per GPU to its highest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from helix_ext.sim.sweep import frontier

STYLE = {
    "TP": dict(color="#8c8c8c", linestyle="-"),
    "PP": dict(color="#b5a04a", linestyle="-"),
    "EP": dict(color="#6a8fc4", linestyle="-"),
    "Medha": dict(color="#b07ab8", linestyle="-"),
    "Helix (HOP-B off)": dict(color="#5aa05a", linestyle="--"),
    "Helix": dict(color="#1f7a1f", linestyle="-", linewidth=2.4),
}


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise RuntimeError("plotting needs matplotlib: pip install 'helix-ext[sim]' (or pip install matplotlib)") \
            from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_ticks():
    from matplotlib.ticker import FuncFormatter

    def label(value, _position):  # 0.2, 0.5, 1, 2 rather than 2x10^-1; minor ticks only at 2 and 5
        mantissa = value / 10 ** np.floor(np.log10(value)) if value > 0 else 0
        return f"{value:g}" if round(mantissa) in (1, 2, 5) else ""

    return FuncFormatter(label)


def plot_study(result, path: str | Path) -> Path:
    """One study's frontiers as a PNG at ``path``."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bx, by = frontier(result.baseline_set)
    x0, y0 = bx.max(), by.max()
    fig, ax = plt.subplots(figsize=(7.0, 5.0), dpi=130)
    shown = list(result.spec.baselines) + list(result.spec.extra_baselines) + ["Helix (HOP-B off)", "Helix"]
    for name in shown:
        x, y = frontier(result.points[name])
        label = name + (" (extra)" if name in result.spec.extra_baselines else "")
        ax.plot(x / x0, y / y0, label=label, **{"linewidth": 1.4, **STYLE.get(name, {})})
    ax.plot(bx / x0, by / y0, color="black", linewidth=1.0, linestyle=":", label="best baseline")
    g = result.gains
    if g.helix_point_at_baseline_max:
        yh = g.helix_point_at_baseline_max["throughput_per_gpu"] / y0
        yb = g.baseline_point["throughput_per_gpu"] / y0
        ax.annotate("", xy=(1.0, yh), xytext=(1.0, yb),
                    arrowprops=dict(arrowstyle="->", color="#1f7a1f", linewidth=1.2))
        ax.text(1.03, (yh * yb) ** 0.5, f"{g.throughput_gain:.1f}x", color="#1f7a1f", va="center")
    ax.axvline(g.interactivity_gain, color="#1f7a1f", linewidth=0.6, linestyle=":")
    ax.text(g.interactivity_gain, 0.97, f" {g.interactivity_gain:.2f}x", transform=ax.get_xaxis_transform(),
            color="#1f7a1f", va="top", ha="left", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = _plain_ticks()
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(plain)
    ax.set_xlabel("interactivity (tokens/s/user), normalized to the best baseline's highest")
    ax.set_ylabel("throughput (tokens/s/GPU), normalized to the best baseline's highest")
    ax.set_title(f"{result.spec.model.name}, 1M context, {result.hardware.name}, FP4, 1-64 GPUs\n"
                 f"collective latency {result.latency_us:g} us (model, not measured)", fontsize=10)
    ax.grid(True, which="both", linewidth=0.3, alpha=0.5)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_sensitivity(reproduction: dict, path: str | Path) -> Path:
    """Throughput and interactivity gains of both studies against the per-collective latency."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    by_latency = sorted(reproduction["by_latency"].items())
    latencies = [lat for lat, _ in by_latency]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 4.0), dpi=130)
    positive = lambda values: [v if v > 0 else np.nan for v in values]  # noqa: E731  (0: Helix never gets there)
    for key, color in (("deepseek-r1", "#1f5fa0"), ("llama-405b", "#c0504d")):
        spec = by_latency[0][1][key].spec
        name = spec.model.name
        left.plot(latencies, positive([r[key].gains.throughput_gain for _, r in by_latency]), "o-", color=color,
                  label=name)
        left.plot(latencies, positive([r[key].gains.throughput_gain_at_90pct for _, r in by_latency]), "o--",
                  color=color, label=f"{name}, at 0.9x")
        left.axhline(spec.paper_throughput_gain, color=color, linewidth=0.8, linestyle=":")
        right.plot(latencies, [r[key].gains.interactivity_gain for _, r in by_latency], "o-", color=color, label=name)
        right.axhline(spec.paper_interactivity_gain, color=color, linewidth=0.8, linestyle=":")
    for ax, title in ((left, "throughput gain at the baseline's highest interactivity (paper: dotted)"),
                      (right, "interactivity gain (paper: dotted)")):
        ax.axvline(reproduction["latency_us"], color="gray", linewidth=0.8, linestyle=":")
        ax.set_xlabel("per-collective latency (us)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, linewidth=0.3, alpha=0.5)
        ax.legend(fontsize=8)
    left.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_reproduction(reproduction: dict, directory: str | Path) -> list[Path]:
    directory = Path(directory)
    paths = [plot_study(result, directory / f"{key}.png") for key, result in reproduction["headline"].items()]
    paths.append(plot_sensitivity(reproduction, directory / "latency-sensitivity.png"))
    return paths
