"""Public interfaces shared by every workflow: device mode and uninplace_model."""

from __future__ import annotations

import logging

from amct_caffe import io, log
from amct_caffe.io.graph_io import graph_from_net, graph_to_net
from amct_caffe.io.paths import reading

_LOG = logging.getLogger(__name__)
_MODE = {"device": "cpu"}


def set_cpu_mode() -> None:
    """Quantize weights on the CPU (the default)."""
    log.setup()
    _MODE["device"] = "cpu"


def set_gpu_mode() -> None:
    """Ask for GPU weight quantization; this build has no GPU kernels, so it stays on the CPU."""
    log.setup()
    _LOG.warning("set_gpu_mode: amct_caffe was built without GPU kernels; weights are quantized on the CPU")
    _MODE["device"] = "cpu"


def uninplace_model(model_file, uninplaced_model_file) -> None:
    """Rewrite a prototxt without in-place layers, keeping layers with no phase or phase TEST.

    Every blob written by an in-place layer (top == bottom) gets a fresh name (the layer's name
    when free), and later readers are redirected to it, so each blob has one writer. The last value
    of a chain keeps the blob's name (the net's outputs keep theirs), except on a network input: the
    input keeps its name, so the model is fed as before, and the values written over it are renamed.
    """
    log.setup()
    with reading(model_file=model_file):
        net = io.load_prototxt(model_file, io.TEST)
        graph = graph_from_net(net)
        out, _ = graph_to_net(graph)
        # keep the net-level settings (name, state, ...) of the original
        header = io.read_prototxt(model_file)
        del header.layer[:]
        del header.layers[:]
        del header.input[:]
        del header.input_shape[:]
        del header.input_dim[:]
        header.MergeFrom(out)
        io.write_prototxt(header, uninplaced_model_file)
    _LOG.info("uninplaced model written to %s", uninplaced_model_file)
