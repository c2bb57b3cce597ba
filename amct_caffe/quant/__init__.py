"""Quantization algorithms: NumPy references plus dispatch to the C++ kernels.

Every public function takes ``backend=None | "kernel" | "reference"``; ``None`` uses the kernel
when ``amct_caffe._kernels`` is built. ``use_backend(...)`` changes the default for a block.
Conventions shared by all algorithms (rounding, ranges, scale checks) are in ``_common``.
"""

from ._backend import kernels_available, use_backend
from ._common import QuantizationError, round_half_away
from .arq import ArqResult, arq_quantize_weight, arq_retrain_backward, arq_retrain_forward
from .bias import dequantize_bias, quantize_bias
from .fake_quant import dequantize, fake_quant, pack_deq_scale, quantize, unpack_deq_scale
from .ifmr import IfmrObserver, IfmrParams, IfmrResult, ifmr_search
from .ifmr_stream import IfmrStreamObserver
from .search_n import SearchNObserver, search_n
from .snq import SnqResult, snq_quantize_weight
from .ulq import UlqQuantizer, ulq_backward, ulq_forward, ulq_scale_offset

__all__ = [
    "ArqResult", "IfmrObserver", "IfmrParams", "IfmrResult", "IfmrStreamObserver", "QuantizationError",
    "SearchNObserver",
    "SnqResult", "UlqQuantizer", "arq_quantize_weight", "arq_retrain_backward",
    "arq_retrain_forward", "dequantize", "dequantize_bias", "fake_quant", "ifmr_search",
    "kernels_available", "pack_deq_scale", "quantize", "quantize_bias", "round_half_away",
    "search_n", "snq_quantize_weight", "ulq_backward", "ulq_forward", "ulq_scale_offset",
    "unpack_deq_scale", "use_backend",
]
