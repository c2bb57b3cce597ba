"""Caffe's Python layer: a layer whose code is the user's, named by ``python_param``.

As Caffe built with ``WITH_PYTHON_LAYER`` does (``python_layer.hpp``, ``GetPythonLayer`` in
``layer_factory.cpp``), the Net imports ``python_param.module``, calls its class ``python_param.layer``
with the LayerParameter, sets ``param_str`` (the prototxt's string, as is) and ``phase`` (0 TRAIN,
1 TEST) on the object, then calls its methods with lists of :class:`~amct_caffe.runtime.Blob`:

* ``setup(bottom, top)`` once when the Net is built (Caffe's LayerSetUp), then ``reshape(bottom, top)``;
* ``reshape(bottom, top)`` then ``forward(bottom, top)`` on every forward (Layer::Forward reshapes first);
* ``backward(top, propagate_down, bottom)``: ``top[i].diff`` holds the gradient; the method writes
  ``bottom[i].diff`` where ``propagate_down[i]``, and its learned blobs' ``diff``.

A blob has pycaffe's ``data``, ``diff``, ``reshape(*shape)``, ``shape``, ``count``, ``num`` ... ``width``.
An in-place layer (top == bottom) gets one Blob object in both lists, as Caffe passes one pointer.
The learned blobs are ``self.blobs``, made in ``setup`` by ``self.blobs.add_blob(*shape)`` (zeros,
as pycaffe's BlobVec); they are the Net's ``params[name]``, read from and saved to the caffemodel,
and keep the values ``setup`` gave them when the caffemodel has none for the layer (Caffe copies
only the layers a caffemodel holds).

``import caffe`` in the module: while the Net imports it, ``caffe`` is :mod:`amct_caffe.runtime`, whose
``Layer`` is :class:`Layer` below (pycaffe's base class; a module imported earlier with another
Caffe's pycaffe derives from that Caffe's class, which this Net cannot build, and is refused). Like
Caffe, building a Net of such a model runs the module's code: load models from sources you trust.

What the Net keeps of Caffe's memory model: the top blobs the layer sees persist from one forward to
the next (a forward writing only part of a top finds the rest as it left it), but the Net's blob gets
a copy after each forward, so arrays a caller holds from an earlier forward never change. Bottoms are
the Net's arrays (an in-place layer's are a copy the Net takes as its top). Shape inference outside a
Net (config generation, the guide's file flow) never imports the module: the tops of a Python layer
and what follows get their shapes when a Net runs it. An exception in the user's code is raised as
a GraphError naming the layer, with the original chained (``__cause__``) for its traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

import numpy as np

from amct_caffe.errors import AmctError, GraphError, UnsupportedLayerError
from amct_caffe.ops import register
from amct_caffe.runtime.blob import Blob
from amct_caffe.runtime.layer import Layer as ExecutorLayer

__all__ = ["BlobVec", "Layer", "PythonLayer"]


class BlobVec(list):
    """pycaffe's ``BlobVec``: a layer's learned blobs, grown by :meth:`add_blob` in ``setup``."""

    def add_blob(self, *shape) -> None:
        blob = Blob(())
        blob.reshape(*shape)  # Blob.reshape checks the shape (non-negative, not too large)
        self.append(blob)


class Layer:
    """pycaffe's ``caffe.Layer``, the base class of a Python layer (module doc).

    Subclasses define ``setup``, ``reshape``, ``forward`` and (to train) ``backward``. The Net sets
    ``param_str`` and ``phase`` before calling ``setup``.
    """

    def __init__(self, param=None):
        self.blobs = BlobVec()
        self.param_str = ""
        self.phase = 1
        self.layer_param = param

    @property
    def type(self) -> str:
        return "Python"

    def setup(self, bottom, top) -> None:
        """Caffe's Layer::LayerSetUp: nothing unless the subclass defines it."""

    def reshape(self, bottom, top) -> None:
        raise NotImplementedError(f"{type(self).__name__} defines no reshape(bottom, top); Caffe needs one too")

    def forward(self, bottom, top) -> None:
        raise NotImplementedError(f"{type(self).__name__} defines no forward(bottom, top)")

    def backward(self, top, propagate_down, bottom) -> None:
        raise NotImplementedError(f"{type(self).__name__} defines no backward(top, propagate_down, bottom)")


# What ``import caffe`` gives a Python layer's module: the package amct_caffe.runtime, which sets it when it
# loads (it imports this module for Layer; importing the package here would make the two a cycle).
CAFFE_ALIAS = None


@contextlib.contextmanager
def _caffe_is_runtime():
    """``import caffe`` gives :data:`CAFFE_ALIAS` inside the block; what ``caffe`` was comes back after."""
    runtime = CAFFE_ALIAS
    missing = object()
    saved = sys.modules.get("caffe", missing)
    sys.modules["caffe"] = runtime
    try:
        yield
    finally:
        if sys.modules.get("caffe") is runtime:
            if saved is missing:
                del sys.modules["caffe"]
            else:
                sys.modules["caffe"] = saved


def _foreign_base(cls: type) -> bool:
    """Whether ``cls`` derives from another Caffe's pycaffe ``Layer`` (Boost.Python's, in ``caffe._caffe``)."""
    return any(base.__name__ == "Layer" and base.__module__.startswith("caffe") for base in cls.__mro__[1:])


def user_layer_class(lp) -> type:
    """The class ``python_param`` names, its module imported with ``caffe`` as this runtime."""
    p = lp.python_param
    where = f"layer '{lp.name}' (Python)"
    if not p.module or not p.layer:
        raise UnsupportedLayerError(f"{where}: python_param must give the module and the class of the layer "
                                    "(python_param {{ module: \"my_layers\" layer: \"MyLayer\" }})")
    try:
        with _caffe_is_runtime():
            module = importlib.import_module(p.module)
    except ImportError as e:
        raise UnsupportedLayerError(f"{where}: cannot import module '{p.module}' ({e}); put the directory that "
                                    "holds it on PYTHONPATH, as Caffe needs too") from e
    except Exception as e:  # the module's own code failed while it was imported
        raise UnsupportedLayerError(f"{where}: importing module '{p.module}' raised {type(e).__name__}: {e}") from e
    cls = getattr(module, p.layer, None)
    origin = getattr(module, "__file__", None) or p.module
    if not isinstance(cls, type):
        raise UnsupportedLayerError(f"{where}: module '{p.module}' ({origin}) has no class '{p.layer}'")
    if not issubclass(cls, Layer):
        if _foreign_base(cls):
            raise UnsupportedLayerError(
                f"{where}: class '{p.layer}' of module '{p.module}' derives from another Caffe's caffe.Layer (the "
                "module was imported with that Caffe's pycaffe before this Net); build the Net before importing "
                "it yourself, or write `import amct_caffe.runtime as caffe` in it")
        raise UnsupportedLayerError(f"{where}: class '{p.layer}' of module '{p.module}' must derive from caffe.Layer")
    return cls


@register("Python")
class PythonLayer(ExecutorLayer):
    """The executor's side of a Python layer: the user's object, called with Blob lists (module doc)."""

    num_bottoms = (0, None)
    num_tops = (0, None)
    shape_from_forward = True  # the user's forward may reshape its tops
    weights_optional = True    # Caffe keeps the blobs setup() made when the caffemodel has none for the layer
    runs_user_code = True      # shape inference outside a Net leaves it alone (module doc)

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        self._set_up = False
        self._bound = False  # the user's blobs are the Net's (on_net_built)
        cls = user_layer_class(lp)
        self._where = f"layer '{lp.name}' (Python {lp.python_param.module}.{lp.python_param.layer})"
        self.user = self._call("__init__", cls, lp)
        if not isinstance(getattr(self.user, "blobs", None), BlobVec):  # a subclass that skipped Layer.__init__
            self.user.blobs = BlobVec()
        self.user.param_str = lp.python_param.param_str
        self.user.phase = phase
        # top i -> the bottom it is computed in place on (Caffe hands the layer one Blob for both)
        self._in_place = {i: list(lp.bottom).index(t) for i, t in enumerate(lp.top) if t in lp.bottom}
        self._tops = [Blob(()) for _ in lp.top]  # the top blobs the user's code sees, kept between forwards

    # -- the user's code --------------------------------------------------------------
    def _call(self, method: str, *args):
        if self._bound:  # the Net's learned blobs, whichever objects the Net holds now (copy_from, share_with)
            self.user.blobs[:] = self.blobs
        try:
            if method == "__init__":
                return args[0](*args[1:])
            return getattr(self.user, method)(*args)
        except AmctError as e:
            raise type(e)(f"{self._where}: {e}") from e
        except Exception as e:
            raise GraphError(f"{self._where}: its {method}() raised {type(e).__name__}: {e}") from e

    def _blob_lists(self, bottoms: list[Blob]) -> tuple[list[Blob], list[Blob]]:
        tops = [bottoms[self._in_place[i]] if i in self._in_place else blob for i, blob in enumerate(self._tops)]
        return bottoms, tops

    def _ensure_setup(self, bottom_shapes) -> None:
        if not self._set_up:
            self._set_up = True
            bottoms, tops = self._blob_lists([Blob(tuple(s)) for s in bottom_shapes])
            self._call("setup", bottoms, tops)
            for k, blob in enumerate(self.user.blobs):
                if not isinstance(blob, Blob):
                    raise GraphError(f"{self._where}: self.blobs[{k}] is a {type(blob).__name__}, not a blob; "
                                     "add learned blobs with self.blobs.add_blob(*shape)")

    # -- the executor's interface ---------------------------------------------------------
    def param_shapes(self, bottom_shapes):
        self._ensure_setup(bottom_shapes)
        return [tuple(blob.shape) for blob in self.user.blobs]

    def initial_params(self, shapes, rng):
        return [np.array(blob.data, np.float32) for blob in self.user.blobs]

    def on_net_built(self, net, index: int) -> None:
        self._bound = True

    def reshape(self, bottom_shapes):
        """The user's reshape on blobs of these shapes holding zeros (Caffe's bottoms before the first forward)."""
        self._ensure_setup(bottom_shapes)
        bottoms, tops = self._blob_lists([Blob(tuple(s)) for s in bottom_shapes])
        self._call("reshape", bottoms, tops)
        return [blob.shape for blob in tops]

    def forward(self, bottoms):
        blobs = [Blob(data=np.array(a) if j in self._in_place.values() else a) for j, a in enumerate(bottoms)]
        bottom_blobs, tops = self._blob_lists(blobs)
        self._call("reshape", bottom_blobs, tops)
        self._call("forward", bottom_blobs, tops)
        return [self._top_array(i, blob) for i, blob in enumerate(tops)]

    def _top_array(self, i: int, blob) -> np.ndarray:
        data = blob.data
        if not isinstance(data, np.ndarray) or not np.can_cast(data.dtype, np.float64):
            raise GraphError(f"{self._where}: top {i} holds {type(data).__name__} "
                             f"{getattr(data, 'dtype', '')}, not numbers")
        # a copy: the user's blob keeps its memory for the next forward, the Net's arrays are never rewritten
        return np.array(data, np.float32) if i not in self._in_place else np.asarray(data, np.float32)

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        bottom_blobs = [Blob(data=a) for a in bottoms]
        top_blobs = []
        for i, (data, diff) in enumerate(zip(tops, top_diffs, strict=True)):
            blob = bottom_blobs[self._in_place[i]] if i in self._in_place else Blob(data=data)
            blob.diff = np.array(diff, np.float32)  # a copy: the user's code may write into it
            top_blobs.append(blob)
        self._call("backward", top_blobs, [bool(p) for p in propagate_down], bottom_blobs)
        out = []
        for j, blob in enumerate(bottom_blobs):
            diff = blob.diff if propagate_down[j] else None
            if diff is not None and np.shape(diff) != np.shape(bottoms[j]):
                raise GraphError(f"{self._where}: its backward() left bottom {j}'s diff of shape "
                                 f"{list(np.shape(diff))}, its data has {list(np.shape(bottoms[j]))}")
            out.append(None if diff is None else np.array(diff, np.float32))
        return out
