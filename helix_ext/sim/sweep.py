"""Sweeps over configurations and batch sizes, Pareto frontiers, and the paper's headline metrics.

A point is one (configuration, batch) pair that fits in HBM:
  interactivity = 1 / TTL (tokens/s/user), throughput = batch / TTL / GPUs (tokens/s/GPU).
A frontier keeps the points no other point beats on both.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from helix_ext.sim.costs import ModelingOptions
from helix_ext.sim.hardware import HardwareSpec
from helix_ext.sim.models import ModelSpec
from helix_ext.sim.strategies import Configs, evaluate, make_configs


def batch_grid(max_batch: int = 8192, every_integer_to: int = 256, geometric_points: int = 64) -> np.ndarray:
    """Every integer up to ``every_integer_to`` (the frontier's ends are sensitive to it), then a
    geometric grid up to ``max_batch``."""
    dense = np.arange(1, min(every_integer_to, max_batch) + 1)
    if max_batch <= every_integer_to:
        return dense
    tail = np.unique(np.round(np.geomspace(every_integer_to, max_batch, geometric_points)).astype(np.int64))
    return np.unique(np.concatenate([dense, tail]))


@dataclass(frozen=True)
class Points:
    """The feasible points of one sweep, flattened."""

    strategy: str
    configs: Configs
    config_index: np.ndarray
    batch: np.ndarray
    ttl_s: np.ndarray
    memory_bytes: np.ndarray

    @property
    def interactivity(self) -> np.ndarray:
        return 1.0 / self.ttl_s

    @property
    def throughput_per_gpu(self) -> np.ndarray:
        return self.batch / self.ttl_s / self.configs.gpus[self.config_index]

    def __len__(self) -> int:
        return len(self.batch)

    def describe(self, i: int) -> dict:
        c = int(self.config_index[i])
        return {**self.configs.as_dict(c), "batch": int(self.batch[i]), "ttl_ms": float(self.ttl_s[i] * 1e3),
                "interactivity": float(self.interactivity[i]), "throughput_per_gpu": float(self.throughput_per_gpu[i]),
                "memory_gb_per_gpu": float(self.memory_bytes[i] / 1e9)}


def sweep(model: ModelSpec, hw: HardwareSpec, strategy: str, context: float, batches=None, max_gpus: int | None = None,
          options: ModelingOptions | None = None, hopb: str = "on") -> Points:
    """Every feasible (configuration, batch) point of ``strategy`` on 1..max_gpus GPUs (default: the
    NVLink domain, at most 64 as in the paper)."""
    batches = batch_grid() if batches is None else np.asarray(batches, dtype=np.int64)
    max_gpus = min(64, hw.nvlink_domain_gpus) if max_gpus is None else max_gpus
    if max_gpus > hw.nvlink_domain_gpus:
        raise ValueError(f"max_gpus: {max_gpus} exceeds the {hw.name} NVLink domain of {hw.nvlink_domain_gpus} GPUs")
    configs = make_configs(strategy, model, max_gpus)
    step = evaluate(model, hw, configs, batches, context, options, hopb)
    ci, bi = np.nonzero(step.feasible)
    return Points(strategy, configs, ci, batches[bi], step.ttl_s[ci, bi], step.memory_bytes[ci, bi])


@dataclass(frozen=True)
class PointSet:
    """Several strategies' points taken together (e.g. every baseline)."""

    label: str
    parts: list[Points]

    @property
    def interactivity(self) -> np.ndarray:
        return np.concatenate([p.interactivity for p in self.parts]) if self.parts else np.empty(0)

    @property
    def throughput_per_gpu(self) -> np.ndarray:
        return np.concatenate([p.throughput_per_gpu for p in self.parts]) if self.parts else np.empty(0)

    def describe(self, i: int) -> dict:
        for part in self.parts:
            if i < len(part):
                return part.describe(i)
            i -= len(part)
        raise IndexError(i)


def as_set(points) -> PointSet:
    return points if isinstance(points, PointSet) else PointSet(points.strategy, [points])


def pareto(points) -> np.ndarray:
    """Indices of the frontier points, by increasing interactivity (throughput decreasing)."""
    x, y = as_set(points).interactivity, as_set(points).throughput_per_gpu
    if len(x) == 0:
        return np.empty(0, dtype=np.int64)
    order = np.lexsort((-y, -x))  # interactivity descending, then throughput descending
    best_so_far = np.maximum.accumulate(y[order])
    previous = np.concatenate([[-np.inf], best_so_far[:-1]])
    keep = order[y[order] > previous]
    return keep[::-1]


def frontier(points) -> tuple[np.ndarray, np.ndarray]:
    """(interactivity, throughput per GPU) of the frontier, interactivity increasing."""
    s = as_set(points)
    idx = pareto(s)
    return s.interactivity[idx], s.throughput_per_gpu[idx]


def best_throughput_at(points, min_interactivity: float) -> tuple[float, int | None]:
    """Highest throughput per GPU among points at least as interactive as ``min_interactivity``."""
    s = as_set(points)
    x, y = s.interactivity, s.throughput_per_gpu
    ok = np.nonzero(x >= min_interactivity * (1 - 1e-12))[0]
    if len(ok) == 0:
        return 0.0, None
    i = int(ok[np.argmax(y[ok])])
    return float(y[i]), i


def max_interactivity(points) -> tuple[float, int]:
    s = as_set(points)
    x, y = s.interactivity, s.throughput_per_gpu
    top = x.max()
    candidates = np.nonzero(x >= top * (1 - 1e-12))[0]
    i = int(candidates[np.argmax(y[candidates])])
    return float(x[i]), i


def interactivity_at_throughput(front_x: np.ndarray, front_y: np.ndarray, throughput: np.ndarray) -> np.ndarray:
    """The frontier's interactivity at each ``throughput``, interpolating linearly in log-log space
    between frontier points (NaN outside the frontier's throughput range)."""
    order = np.argsort(front_y)
    ly, lx = np.log(front_y[order]), np.log(front_x[order])
    t = np.log(np.asarray(throughput, dtype=float))
    out = np.exp(np.interp(t, ly, lx))
    return np.where((t >= ly[0] - 1e-12) & (t <= ly[-1] + 1e-12), out, np.nan)


@dataclass(frozen=True)
class Gains:
    interactivity_gain: float
    throughput_gain: float           # at the baseline's highest interactivity
    throughput_gain_at_90pct: float  # at 0.9x the baseline's highest interactivity
    baseline_max_interactivity: float
    helix_max_interactivity: float
    baseline_point: dict
    helix_point: dict
    helix_point_at_baseline_max: dict
    baseline_point_at_90pct: dict
    helix_point_at_90pct: dict


def gains(helix, baseline) -> Gains:
    """The paper's "up to" claims, read as issue 7 defines them.

    interactivity gain: Helix's highest interactivity / the baseline's highest.
    throughput gain: Helix's best throughput per GPU at the baseline's highest interactivity over
    the baseline's throughput there (the end of the baseline's frontier); also at 0.9x of it.
    """
    h, b = as_set(helix), as_set(baseline)
    xb, ib = max_interactivity(b)
    xh, ih = max_interactivity(h)
    yb = float(b.throughput_per_gpu[ib])
    yh, jh = best_throughput_at(h, xb)
    yb90, jb90 = best_throughput_at(b, 0.9 * xb)
    yh90, jh90 = best_throughput_at(h, 0.9 * xb)
    return Gains(
        interactivity_gain=xh / xb, throughput_gain=yh / yb, throughput_gain_at_90pct=yh90 / yb90,
        baseline_max_interactivity=xb, helix_max_interactivity=xh, baseline_point=b.describe(ib),
        helix_point=h.describe(ih), helix_point_at_baseline_max=h.describe(jh) if jh is not None else {},
        baseline_point_at_90pct=b.describe(jb90), helix_point_at_90pct=h.describe(jh90) if jh90 is not None else {},
    )


def interactivity_loss(reference, ablated, samples: int = 400) -> tuple[float, float]:
    """Largest fractional interactivity lost by ``ablated`` against ``reference`` at fixed throughput
    per GPU, over the throughputs both frontiers reach: (loss, throughput where it peaks)."""
    rx, ry = frontier(reference)
    ax, ay = frontier(ablated)
    lo, hi = max(ry.min(), ay.min()), min(ry.max(), ay.max())
    if not lo < hi:
        return float("nan"), float("nan")
    grid = np.geomspace(lo, hi, samples)
    loss = 1.0 - interactivity_at_throughput(ax, ay, grid) / interactivity_at_throughput(rx, ry, grid)
    i = int(np.nanargmax(loss))
    return float(max(loss[i], 0.0)), float(grid[i])


def progress(items, label: str, enabled: bool | None = None):
    """Yield ``items``, drawing a one-line progress bar on stderr when it is a terminal."""
    items = list(items)
    enabled = sys.stderr.isatty() if enabled is None else enabled
    for i, item in enumerate(items):
        if enabled:
            done = int(30 * i / max(len(items), 1))
            sys.stderr.write(f"\r{label} [{'#' * done}{'.' * (30 - done)}] {i}/{len(items)}")
            sys.stderr.flush()
        yield item
    if enabled:
        sys.stderr.write(f"\r{label} [{'#' * 30}] {len(items)}/{len(items)}\n")
        sys.stderr.flush()
