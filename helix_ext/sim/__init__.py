"""helix_ext.sim: an open roofline-plus-communication simulator of one decode step.

It sweeps sharding strategies (TP, PP, EP, Medha-style KVP, Helix with and without HOP-B),
their degrees, GPU counts (1-64) and batch sizes, keeps the configurations that fit in HBM,
and draws Pareto frontiers of throughput per GPU against interactivity (1 / TTL). It
reproduces the Helix paper's studies (``python -m helix_ext.sim reproduce``) and answers
"what would Helix buy me?" for other models and machines (``python -m helix_ext.sim plan``).

Where everything lives:
  hardware.py    HardwareSpec: every hardware constant (public datasheets) and every hardware
                 assumption (the per-collective latency above all), GB200 NVL72 / B200 HGX /
                 H200 HGX, override from a bench/results JSON
  models.py      ModelSpec: DeepSeek-R1, Llama-3.1-405B, any Hugging Face config.json
  costs.py       the per-kernel roofline, the collectives, HOP-B, the paper's Appendix A
                 formulas, and the modeling choices (each with why)
  strategies.py  the configurations of each strategy and the step time / memory of each
  sweep.py       sweeps, Pareto frontiers, the headline metrics
  study.py       the paper's two studies, the latency sensitivity, the planner
  plot.py        normalized frontier plots (matplotlib, the ``sim`` extra)

The per-collective latency of the headline table is 7 us (hardware.DEFAULT_COLLECTIVE_LATENCY_US).
Why: it is the one constant that no datasheet gives, and the value must stand for a small-
message collective across up to 64 GPUs of one NVLink domain issued from inside a decode
step: a one-shot NVLink kernel on a few GPUs costs a few us, an NCCL ring/tree collective
over tens of ranks well over 10 us; 7 us, from the issue's list, sits between the two. It is
also, and the README says so, inside the narrow band (~6.6-7.9 us) where all four of the
issue's reproduction bounds hold, so the bounds do not independently confirm it: every
headline is reported for 1, 3, 5, 7, 10, 15 and 20 us as well.

Nothing here imports helix_ext's compiled parts: the simulator needs NumPy only (matplotlib
for plots).
"""

from helix_ext.sim.costs import FP4, ModelingOptions, Precision, appendix_a_kv_time, appendix_a_weight_time
from helix_ext.sim.hardware import (B200_HGX, DEFAULT_COLLECTIVE_LATENCY_US, GB200_NVL72, H200_HGX, HARDWARE,
                                    LATENCY_SWEEP_US, HardwareSpec, get_hardware)
from helix_ext.sim.models import DEEPSEEK_R1, LLAMA_405B, MODELS, ModelSpec, from_hf_config, get_model
from helix_ext.sim.strategies import BASELINES, STRATEGIES, Configs, StepModel, evaluate, make_configs
from helix_ext.sim.study import STUDIES, Plan, StudyResult, headline_json, plan, reproduce, run_study
from helix_ext.sim.sweep import Gains, Points, batch_grid, frontier, gains, interactivity_loss, pareto, sweep

__all__ = [
    "B200_HGX", "BASELINES", "Configs", "DEEPSEEK_R1", "DEFAULT_COLLECTIVE_LATENCY_US", "FP4", "GB200_NVL72",
    "Gains", "H200_HGX", "HARDWARE", "HardwareSpec", "LATENCY_SWEEP_US", "LLAMA_405B", "MODELS", "ModelSpec",
    "ModelingOptions", "Plan", "Points", "Precision", "STRATEGIES", "STUDIES", "StepModel", "StudyResult",
    "appendix_a_kv_time", "appendix_a_weight_time", "batch_grid", "evaluate", "from_hf_config", "frontier", "gains",
    "get_hardware", "get_model", "headline_json", "interactivity_loss", "make_configs", "pareto", "plan", "reproduce",
    "run_study", "sweep",
]
