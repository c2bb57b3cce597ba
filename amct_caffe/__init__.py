"""amct_caffe: quantize Caffe models to INT8 (and INT4 weights) for NPU deployment.

The public API keeps the names and signatures of the AMCT for Caffe user guide.
"""

import pkgutil

# Running from a source checkout after `pip install .`: the checkout's Python files shadow the
# installed ones, and this makes the build's artifacts (the _kernels extension, the compiled
# proto schemas) still reachable from the installed copy.
__path__ = pkgutil.extend_path(__path__, __name__)

from amct_caffe.api.calibration import (activation_quantize_model, create_quant_config, init,  # noqa: E402
                                        save_model, weights_quantize_model)
from amct_caffe.api.common import set_cpu_mode, set_gpu_mode, uninplace_model  # noqa: E402
from amct_caffe.api.convert import convert_model  # noqa: E402
from amct_caffe.api.fallback import calibrate_with_fallback  # noqa: E402  (ours, beyond the guide)
from amct_caffe.errors import (AmctError, ConfigError, FileAccessError, GraphError,  # noqa: E402
                               ModelFormatError, UnsupportedLayerError, WeightsError)
from amct_caffe.io.schema import set_caffe_proto  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AmctError", "ConfigError", "FileAccessError", "GraphError", "ModelFormatError", "UnsupportedLayerError",
    "WeightsError",
    "__version__", "activation_quantize_model", "calibrate_with_fallback", "convert_model", "create_quant_config",
    "init", "save_model", "set_caffe_proto", "set_cpu_mode", "set_gpu_mode", "uninplace_model",
    "weights_quantize_model",
]
