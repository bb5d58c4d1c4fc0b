"""helix-ext: CUDA kernels and PyTorch custom ops for Helix-parallel long-context decoding.

Importing this package loads the native library, which registers the ``torch.ops.helix.*``
operators (CPU kernels always, CUDA kernels in CUDA builds); the typed wrappers below are
the documented Python API.
"""

import torch  # noqa: F401  (the native library links against libtorch: load it first)

from helix_ext import _C  # noqa: F401  (registers torch.ops.helix.*)
from helix_ext._build_info import build_info
from helix_ext.ops import dequantize_fp4, flash_decode, fp4_grouped_gemm, merge_states, quantize_fp4

__version__ = "0.1.0"
__all__ = ["build_info", "dequantize_fp4", "flash_decode", "fp4_grouped_gemm", "merge_states", "quantize_fp4",
           "__version__"]
