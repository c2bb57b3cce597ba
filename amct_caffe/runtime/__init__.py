"""The embedded executor: a pycaffe-compatible ``Net`` running on NumPy.

Switch a pycaffe script to it with ``import amct_caffe.runtime as caffe``.
"""

import sys

from amct_caffe.runtime.blob import Blob
from amct_caffe.runtime.layers import python_layer as _python_layer
from amct_caffe.runtime.layers.python_layer import Layer  # pycaffe's caffe.Layer, for Python layers
from amct_caffe.runtime import io, proto  # pycaffe's caffe.io and caffe.proto
from amct_caffe.runtime.net import TEST, TRAIN, Net
from amct_caffe.runtime.registry import known_types, layer_class, layer_type_list, register
from amct_caffe.runtime.seed import set_random_seed
from amct_caffe.runtime.classifier import Classifier  # pycaffe's caffe.Classifier
from amct_caffe.runtime.solver import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver, RMSPropSolver,
                                       SGDSolver, Solver, get_solver)
from amct_caffe.runtime.threads import num_threads, set_device, set_mode_cpu, set_mode_gpu, set_num_threads

__all__ = ["AdaDeltaSolver", "AdaGradSolver", "AdamSolver", "Blob", "Classifier", "Layer", "Net", "NesterovSolver",
           "RMSPropSolver", "SGDSolver", "Solver", "TEST", "TRAIN", "get_solver", "io", "known_types", "layer_class",
           "layer_type_list", "proto", "register", "set_device", "set_mode_cpu", "set_mode_gpu", "set_random_seed",
           "num_threads", "set_num_threads"]

_python_layer.CAFFE_ALIAS = sys.modules[__name__]  # `import caffe` in a Python layer's module: this package
