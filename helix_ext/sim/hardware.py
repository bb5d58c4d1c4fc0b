"""Hardware specifications: every constant of the machine the simulator assumes, in one place.

All figures are per GPU and come from public datasheets, except where a field says it is a
modeling assumption. The paper (Bhatia et al., arXiv 2507.07120) states only one constant:
8000 GB/s of HBM bandwidth per GB200 GPU. The per-collective latency is nobody's datasheet
figure and is the simulator's key assumption: ``python -m helix_ext.sim reproduce`` reports
every headline for 1, 3, 5, 7, 10, 15 and 20 us.

A spec can be overridden by a benchmark JSON of ``bench/results/`` (``with_benchmark``): the
measured copy bandwidth replaces the datasheet HBM bandwidth and the measured fractions of it
that this package's kernels reach become the kernel efficiencies, so a projection can rest on
measured rather than datasheet figures.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path

GB = 1e9
TB = 1e12
PFLOPS = 1e15
TFLOPS = 1e12
US = 1e-6

# The latency the headline table uses; the reproduction reports all of LATENCY_SWEEP_US too.
# Why 7 us: see the docstring of helix_ext/sim/__init__.py.
DEFAULT_COLLECTIVE_LATENCY_US = 7.0
LATENCY_SWEEP_US = (1.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0)


@dataclass(frozen=True)
class HardwareSpec:
    """One GPU of a scale-up (NVLink) domain, as the roofline-plus-communication model sees it.

    Public specifications (per GPU, dense, i.e. without 2:4 sparsity):
      hbm_bandwidth_bps   HBM bandwidth, bytes/s.
      hbm_capacity_bytes  HBM capacity, bytes.
      fp4_flops, fp8_flops, bf16_flops
                          dense tensor-core rates, FLOP/s. ``fp4_flops`` is None on GPUs
                          without FP4 tensor cores (Hopper): FP4 weights and KV are then
                          dequantized in registers and multiplied at the FP8 rate.
      nvlink_bandwidth_bps
                          NVLink bandwidth per direction per GPU, bytes/s (all links of the
                          GPU together; every peer is one NVSwitch hop away).
      nvlink_domain_gpus  GPUs in one NVLink domain; the sweeps never shard beyond it.

    Modeling assumptions (not datasheet figures):
      collective_latency_s
                          fixed cost of one collective (all-reduce, all-gather, reduce-scatter,
                          all-to-all, or one pipeline hop), on top of bytes / bandwidth. Not
                          published for any of these systems; the key unpublished constant.
      usable_hbm_fraction share of HBM that weights + KV cache may fill; the rest is left to
                          activations, workspaces and the CUDA context.
      attention_efficiency, gemm_efficiency
                          fraction of ``hbm_bandwidth_bps`` that the decode-attention kernel and
                          the weight GEMMs reach. 1.0 (the paper's roofline) unless a benchmark
                          JSON says otherwise.
      compute_efficiency  fraction of the tensor-core rate reached; 1.0 likewise.
      link_efficiency     fraction of ``nvlink_bandwidth_bps`` a collective reaches; 1.0.
    """

    name: str
    hbm_bandwidth_bps: float
    hbm_capacity_bytes: float
    fp4_flops: float | None
    fp8_flops: float
    bf16_flops: float
    nvlink_bandwidth_bps: float
    nvlink_domain_gpus: int
    collective_latency_s: float = DEFAULT_COLLECTIVE_LATENCY_US * US
    usable_hbm_fraction: float = 0.9
    attention_efficiency: float = 1.0
    gemm_efficiency: float = 1.0
    compute_efficiency: float = 1.0
    link_efficiency: float = 1.0
    sources: tuple[str, ...] = field(default=(), compare=False)

    def flops(self, precision: str) -> float:
        """Dense FLOP/s for arithmetic in ``precision`` ("fp4", "fp8" or "bf16")."""
        if precision == "fp4":
            rate = self.fp4_flops if self.fp4_flops is not None else self.fp8_flops
        elif precision == "fp8":
            rate = self.fp8_flops
        elif precision == "bf16":
            rate = self.bf16_flops
        else:
            raise ValueError(f"precision: expected 'fp4', 'fp8' or 'bf16', got {precision!r}")
        return rate * self.compute_efficiency

    @property
    def usable_hbm_bytes(self) -> float:
        return self.hbm_capacity_bytes * self.usable_hbm_fraction

    @property
    def link_bandwidth_bps(self) -> float:
        return self.nvlink_bandwidth_bps * self.link_efficiency

    def with_latency_us(self, latency_us: float) -> "HardwareSpec":
        if latency_us < 0:
            raise ValueError(f"latency_us: expected >= 0, got {latency_us}")
        return replace(self, collective_latency_s=latency_us * US)

    def with_benchmark(self, path: str | Path) -> "HardwareSpec":
        """This spec with the measured figures of a ``bench/results/*.json`` file.

        ``copy_bandwidth_gbs`` (a device-to-device copy, read + write bytes per second) replaces
        the HBM bandwidth; the median ``fraction_of_copy_bw`` of the ``flash_decode`` shapes
        becomes ``attention_efficiency`` and that of the ``fp4_grouped_gemm`` shapes
        ``gemm_efficiency`` (each left as it was when the file has no such shape). Capacity,
        tensor-core rates and NVLink stay at the datasheet figures: the benchmark measures none.
        """
        report = json.loads(Path(path).read_text())
        if not isinstance(report, dict) or "copy_bandwidth_gbs" not in report or "results" not in report:
            raise ValueError(f"{path}: not a bench/results JSON (expected keys 'gpu', 'copy_bandwidth_gbs', "
                             "'results')")
        if report.get("gpu") is None:
            raise ValueError(f"{path}: the benchmark ran on a CPU ('gpu' is null); its bandwidths say nothing "
                             "about a GPU")
        copy_gbs = float(report["copy_bandwidth_gbs"])
        if not copy_gbs > 0:
            raise ValueError(f"{path}: copy_bandwidth_gbs must be positive, got {copy_gbs}")

        def median_fraction(op: str, default: float) -> float:
            fractions = [float(r["fraction_of_copy_bw"]) for r in report["results"]
                         if r.get("op") == op and r.get("fraction_of_copy_bw") is not None]
            return min(1.0, statistics.median(fractions)) if fractions else default

        return replace(
            self,
            name=f"{self.name} (measured on {report['gpu']})",
            hbm_bandwidth_bps=copy_gbs * GB,
            attention_efficiency=median_fraction("flash_decode", self.attention_efficiency),
            gemm_efficiency=median_fraction("fp4_grouped_gemm", self.gemm_efficiency),
            sources=self.sources + (f"measured: {Path(path).name}",),
        )


GB200_NVL72 = HardwareSpec(
    name="GB200 NVL72",
    # The paper's one stated constant; also the GB200 NVL72 datasheet's 576 TB/s / 72 GPUs.
    hbm_bandwidth_bps=8 * TB,
    # Datasheet: up to 13.4 TB HBM3e per 72 GPUs -> 186 GB per GPU.
    hbm_capacity_bytes=186 * GB,
    # Datasheet (with sparsity, per rack): FP4 1,440 PF, FP8 720 PF, BF16 360 PF; dense = half, / 72.
    fp4_flops=10 * PFLOPS,
    fp8_flops=5 * PFLOPS,
    bf16_flops=2.5 * PFLOPS,
    # NVLink 5: 1.8 TB/s per GPU (both directions together), 130 TB/s per rack.
    nvlink_bandwidth_bps=900 * GB,
    nvlink_domain_gpus=72,
    sources=("NVIDIA GB200 NVL72 datasheet", "arXiv 2507.07120 (HBM 8000 GB/s)"),
)

B200_HGX = HardwareSpec(
    name="B200 HGX",
    # HGX B200 datasheet, per 8 GPUs: 64 TB/s HBM3e, 1.44 TB.
    hbm_bandwidth_bps=8 * TB,
    hbm_capacity_bytes=180 * GB,
    # HGX B200 datasheet (with sparsity, per 8 GPUs): FP4 144 PF, FP8 72 PF, BF16 36 PF.
    fp4_flops=9 * PFLOPS,
    fp8_flops=4.5 * PFLOPS,
    bf16_flops=2.25 * PFLOPS,
    # NVLink 5 over NVSwitch, 1.8 TB/s per GPU; one NVLink domain is the 8-GPU board.
    nvlink_bandwidth_bps=900 * GB,
    nvlink_domain_gpus=8,
    sources=("NVIDIA HGX B200 datasheet",),
)

H200_HGX = HardwareSpec(
    name="H200 HGX",
    # H200 SXM datasheet: 141 GB HBM3e at 4.8 TB/s.
    hbm_bandwidth_bps=4.8 * TB,
    hbm_capacity_bytes=141 * GB,
    # Hopper has no FP4 tensor cores: FP4 data is multiplied at the FP8 rate.
    # Datasheet (with sparsity): FP8 3,958 TF, BF16 1,979 TF.
    fp4_flops=None,
    fp8_flops=1979 * TFLOPS,
    bf16_flops=989.5 * TFLOPS,
    # NVLink 4: 900 GB/s per GPU (both directions together).
    nvlink_bandwidth_bps=450 * GB,
    nvlink_domain_gpus=8,
    sources=("NVIDIA H200 datasheet",),
)

HARDWARE = {"gb200-nvl72": GB200_NVL72, "b200-hgx": B200_HGX, "h200-hgx": H200_HGX}


def get_hardware(name: str) -> HardwareSpec:
    try:
        return HARDWARE[name.lower()]
    except KeyError:
        raise ValueError(f"hardware: expected one of {sorted(HARDWARE)}, got {name!r}") from None
