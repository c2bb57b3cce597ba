"""Building and running one executor layer outside a Net, the way the Net does.

``run_layer`` checks what every layer owes the Net: bottoms left untouched (layers are pure),
tops of the shapes ``reshape`` announced, float32 tops.
"""

from __future__ import annotations

import numpy as np
from google.protobuf import text_format

from amct_caffe.io.schema import caffe_pb
from amct_caffe.runtime import TEST
from amct_caffe.runtime.blob import Blob
from amct_caffe.runtime.registry import layer_class


def make_layer(text: str, num_bottoms: int | None = None, blobs=(), phase: int = TEST):
    """A layer from its prototxt text.

    With ``num_bottoms``, missing bottom/top names are filled in (b0.., t) and the arity is
    checked; without, the text is taken as is (top counts matter to Slice, Split...).
    """
    lp = text_format.Parse(text, caffe_pb().LayerParameter())
    cls = layer_class(lp.type, lp.name)
    if num_bottoms is not None:
        if not lp.bottom:
            lp.bottom.extend(f"b{i}" for i in range(num_bottoms))
        if not lp.top:
            lp.top.append("t")
        cls.check_arity(lp)
    layer = cls(lp, phase)
    layer.blobs = [Blob(data=np.array(b, np.float32)) for b in blobs]
    return layer


def run_layer(layer, bottoms):
    """reshape + forward ``layer`` on ``bottoms``; returns (tops, announced shapes)."""
    bottoms = list(bottoms)
    before = [b.copy() for b in bottoms]
    shapes = layer.reshape([b.shape for b in bottoms])
    tops = layer.forward(bottoms)
    for b, c in zip(bottoms, before, strict=True):
        np.testing.assert_array_equal(b, c)  # a layer never writes its bottoms
    assert [t.shape for t in tops] == [tuple(s) for s in shapes]
    assert all(t.dtype == np.float32 for t in tops)
    return tops, shapes
