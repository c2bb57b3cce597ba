"""Caffe model files in and out: prototxt (text) and caffemodel (binary).

``load_model(prototxt, caffemodel)`` returns the upgraded, phase-filtered NetParameter and the
weights by layer name; saving writes atomically. Nothing here modifies an input file.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np

from amct_caffe.errors import WeightsError
from amct_caffe.io.blobs import array_to_blob, blob_shape, blob_to_array
from amct_caffe.io.files import (atomic_output, parse_prototxt_text, read_caffemodel, read_prototxt,
                                 write_caffemodel, write_prototxt)
from amct_caffe.io.schema import caffe_pb
from amct_caffe.io.upgrade import TEST, TRAIN, clear_batchnorm_param_specs, filter_phase, layer_included, upgrade_net

__all__ = [
    "TEST", "TRAIN", "Weights", "array_to_blob", "atomic_output", "blob_shape", "blob_to_array",
    "clear_batchnorm_param_specs", "conform_blob", "filter_phase", "layer_blobs", "layer_included", "load_model",
    "load_prototxt", "load_weights", "net_to_caffemodel", "parse_prototxt_text", "read_caffemodel", "read_prototxt",
    "upgrade_net", "write_caffemodel", "write_prototxt",
]

_LOG = logging.getLogger(__name__)


def load_prototxt(path, phase: int = TEST, filter_layers: bool = True, level: int = 0, stages=()):
    """Read a prototxt, upgrade legacy forms and (by default) keep only the layers of ``phase``, ``level`` and
    ``stages`` (pycaffe's Net(file, phase, level=0, stages): its level wins over the file's, its stages add)."""
    net = read_prototxt(path)
    upgrade_net(net, str(path))
    if filter_layers:
        filter_phase(net, phase, level=level, stages=stages)
    return net


class Weights(OrderedDict):
    """A caffemodel's weights: layer name -> its blobs as float32 arrays (file order). ``without_blobs`` names the
    layers the file lists with no blob at all (every parameter-free layer Caffe saves; for a layer that has
    parameters, Caffe's CopyTrainedLayersFrom aborts on "Incompatible number of blobs")."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.without_blobs: set[str] = set()


def load_weights(path, finite: bool = True) -> Weights:
    """Weights of a caffemodel: layer name -> its blobs as float32 arrays (file order).

    With ``finite`` (the quantization flows), a blob holding NaN or infinity is refused: such weights (a
    diverged training, a corrupt file) cannot be quantized, and would otherwise fail much later, or
    silently, in the calibration; the executor's Net loads them with a warning, as Caffe loads them, and
    computes with them.
    Two layers of one name (a layer a prototxt defines once per phase) give one entry: Caffe copies each
    in turn into the layer of that name, so the last one's blobs are those used; a warning says so where
    they differ.
    """
    net = read_caffemodel(path)
    upgrade_net(net, str(path))
    weights = Weights()
    for layer in net.layer:
        if not len(layer.blobs):
            weights.without_blobs.add(layer.name)
            continue
        arrays = []
        for i, b in enumerate(layer.blobs):
            where = f"{path}: layer '{layer.name}' blob {i}"
            arr = blob_to_array(b, where)
            arrays.append(_finite(arr, where, refuse=finite))
        earlier = weights.get(layer.name)
        if earlier is not None and not (len(earlier) == len(arrays) and all(
                a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
                for a, b in zip(earlier, arrays, strict=True))):
            _LOG.warning("%s: two layers named '%s' carry different weights; the last one's are used, as Caffe "
                         "copies both in turn", path, layer.name)
        weights[layer.name] = arrays
    weights.without_blobs -= set(weights)  # a later entry of the name had blobs
    return weights


def layer_blobs(weights, name: str) -> list[np.ndarray] | None:
    """``name``'s blobs in ``weights``: its arrays, [] where the caffemodel lists the layer with no blob (a layer
    with parameters is then refused, as Caffe's CopyTrainedLayersFrom refuses it), None where it does not
    name the layer (its blobs come from its fillers, as in Caffe)."""
    arrays = weights.get(name)
    return [] if arrays is None and name in getattr(weights, "without_blobs", ()) else arrays

def _finite(arr: np.ndarray, where: str, refuse: bool = True) -> np.ndarray:
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), arr.shape))
            what = (f"{where} holds NaN/Inf: {int(bad.sum())} of its {arr.size} values, the first {arr[first]} at "
                    f"index {list(first)} (a diverged training, or a corrupt file; values beyond float32's range "
                    "read as Inf)")
            if refuse:
                raise WeightsError(f"{what}; quantization needs finite weights: fix or retrain the model")
            _LOG.warning("%s; computed with, as Caffe does (quantization refuses such weights)", what)
    return arr


def conform_blob(arr: np.ndarray, target_shape, where: str) -> np.ndarray:
    """Check a loaded blob against the shape the layer expects (Caffe's ShapeEquals).

    Legacy files store every blob as 4-D (num, channels, height, width); such a blob matches
    a target of <= 4 axes whose shape, left-padded with 1s, equals it.
    """
    target_shape = tuple(int(d) for d in target_shape)
    if arr.shape == target_shape:
        return arr
    if arr.ndim == 4 and len(target_shape) <= 4 and (1,) * (4 - len(target_shape)) + target_shape == arr.shape:
        return arr.reshape(target_shape)
    raise WeightsError(f"{where}: shape mismatch: the caffemodel has {list(arr.shape)} but the "
                       f"prototxt defines {list(target_shape)}; were the model and weights files "
                       "saved from the same network?")


def load_model(model_file, weights_file=None, phase: int = TEST, level: int = 0, stages=(), finite: bool = True):
    """Load a network definition and, optionally, its weights.

    Returns ``(net_param, weights)`` where weights maps layer name -> list of arrays and is
    empty without a weights file. Layers of the caffemodel that the (filtered) prototxt lacks
    are ignored with a log line, as Caffe does; shape checks happen where shapes are known
    (the IR importer and the executor). ``finite``: as :func:`load_weights`.
    """
    net = load_prototxt(model_file, phase, level=level, stages=stages)
    weights = Weights()
    if weights_file is not None:
        weights = load_weights(weights_file, finite)
        names = {layer.name for layer in net.layer}
        extra = [n for n in weights if n not in names]
        if extra:
            _LOG.info("%s: ignoring weights of %d layer(s) absent from %s: %s", weights_file, len(extra),
                      model_file, ", ".join(extra[:10]) + (" ..." if len(extra) > 10 else ""))
            for n in extra:
                del weights[n]
    return net, weights


def net_to_caffemodel(net, weights, leave_out=()) -> object:
    """A NetParameter for a .caffemodel: ``net``'s layers with their blobs from ``weights``, but those named in
    ``leave_out`` (layers that have parameters and no weights: Caffe aborts on an entry with no blob for them,
    and leaves a layer the file does not name at its fillers)."""
    out = caffe_pb().NetParameter()
    out.CopyFrom(net)
    for k in reversed([k for k, layer in enumerate(out.layer) if layer.name in leave_out]):
        del out.layer[k]
    for layer in out.layer:
        del layer.blobs[:]
        for arr in weights.get(layer.name, ()):
            array_to_blob(arr, layer.blobs.add())
    return out
