"""amct_caffe: quantize Caffe models to INT8 (and INT4 weights) for NPU deployment.

The public API keeps the names and signatures of the AMCT for Caffe user guide.

The names below are imported on first use (PEP 562 ``__getattr__``): ``import amct_caffe`` itself
loads nothing heavy, so that the ``amct-caffe`` command (``__main__``) can take charge of Ctrl-C
before numpy, protobuf and the executor are imported, and ``python -m amct_caffe`` likewise.
"""

import importlib
import pkgutil

# Running from a source checkout after `pip install .`: the checkout's Python files shadow the
# installed ones, and this makes the build's artifacts (the _kernels extension, the compiled
# proto schemas) still reachable from the installed copy.
__path__ = pkgutil.extend_path(__path__, __name__)

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    **dict.fromkeys(("activation_quantize_model", "create_quant_config", "init", "save_model",
                     "weights_quantize_model"), "amct_caffe.api.calibration"),
    **dict.fromkeys(("set_cpu_mode", "set_gpu_mode", "uninplace_model"), "amct_caffe.api.common"),
    "convert_model": "amct_caffe.api.convert",
    **dict.fromkeys(("create_quant_retrain_config", "create_quant_retrain_model", "save_quant_retrain_model"),
                    "amct_caffe.api.retrain"),
    "calibrate_with_fallback": "amct_caffe.api.fallback",  # ours, beyond the guide
    "label_free_retrain": "amct_caffe.api.label_free",  # ours, beyond the guide
    "compare_model": "amct_caffe.api.accuracy",  # ours, beyond the guide
    **dict.fromkeys(("AmctError", "ConfigError", "FileAccessError", "GraphError", "ModelFormatError",
                     "OutOfMemoryError", "UnsupportedLayerError", "WeightsError"), "amct_caffe.errors"),
    "set_caffe_proto": "amct_caffe.io.schema",
}

__all__ = [
    "AmctError", "ConfigError", "FileAccessError", "GraphError", "ModelFormatError", "OutOfMemoryError",
    "UnsupportedLayerError", "WeightsError",
    "__version__", "activation_quantize_model", "calibrate_with_fallback", "compare_model", "convert_model",
    "create_quant_config",
    "create_quant_retrain_config", "create_quant_retrain_model", "init", "label_free_retrain", "save_model",
    "save_quant_retrain_model",
    "set_caffe_proto", "set_cpu_mode", "set_gpu_mode", "uninplace_model", "weights_quantize_model",
]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'amct_caffe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
