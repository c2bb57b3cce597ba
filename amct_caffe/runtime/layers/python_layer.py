"""Caffe's Python layer: a layer whose code is the user's, named by ``python_param``.

As Caffe built with ``WITH_PYTHON_LAYER`` does (``python_layer.hpp``, ``GetPythonLayer`` in
``layer_factory.cpp``), the Net imports ``python_param.module``, calls its class ``python_param.layer``
with the LayerParameter, sets ``param_str`` (the prototxt's string, as is) and ``phase`` (0 TRAIN,
1 TEST) on the object, then calls its methods with lists of blobs:

* when the Net is built (Caffe's SetUp): ``setup(bottom, top)``, then ``reshape(bottom, top)``; the
  learned blobs are read after both, so either may ``self.blobs.add_blob(*shape)``;
* on every forward (Caffe's Layer::Forward): ``reshape(bottom, top)``, then ``forward(bottom, top)``, with
  the Net's bottom arrays;
* in training: ``backward(top, propagate_down, bottom)``: ``top[i].diff`` holds the gradient; the method
  writes ``bottom[i].diff`` where ``propagate_down[i]``, and its learned blobs' ``diff``.

A blob has pycaffe's ``data``, ``diff``, ``reshape(*shape)``, ``shape``, ``count``, ``num`` ... ``width``;
as in pycaffe, a bottom's or top's ``data`` and ``diff`` cannot be rebound (write into them). An in-place
layer (top == bottom) gets one blob object in both lists, as Caffe passes one pointer. The learned blobs
(``self.blobs``, pycaffe's BlobVec; zeros when added) *are* the Net's ``params[name]``: read from and
saved to the caffemodel (written into in place), updated in place by the solvers, and left as the layer
made them when the caffemodel has none for it (Caffe copies only the layers a caffemodel holds); one
shared by name (``param { name }``) with an earlier layer reads and writes that layer's data and diff
(:class:`_ParamBlob`), as Caffe's ShareData / ShareDiff make it. ``net.layers[i]`` /
``net.layer_dict[name]`` reach the user's object: names the executor's side does not have are the
object's, read and written (a method such as py-faster-rcnn's ``set_roidb``, or state the layer keeps).

``import caffe`` in the module, when it is imported and inside every call, gives :mod:`amct_caffe.runtime`
(``Layer``, ``Blob``, ``Net``, ``TRAIN`` / ``TEST``, the solvers, ``caffe.io``, ``caffe.proto``); the alias
is module-wide, so other threads see it until the last call of any thread ends. NetSpec is not there
(``caffe.layers`` is the executor's own package). A module imported earlier with another Caffe's
pycaffe derives from that Caffe's class, which this Net cannot build, and is refused (and the other way
round: once this Net imported a module, that Caffe cannot build it in the same process). Like Caffe,
building a Net of such a model runs the module's code: load models from sources you trust.

What differs from Caffe:

* at the build, ``setup`` and ``reshape`` see bottoms holding zeros of their shapes, where Caffe would
  pass what an earlier layer's own setup wrote (a DummyData's constant);
* the Net's blob gets a copy of each top after the forward (the layer's own top blobs persist, as
  Caffe's do), so arrays a caller holds from an earlier forward never change;
* a layer without bottoms gets no ``backward`` call (Caffe calls it under ``force_backward``; it can
  only have side effects there);
* its tops take whatever shape the forward gives them (``shape_from_forward``), so the layers after it
  run the Net's per-layer path, and the accuracy report, the fallback and label-free QAT compare and
  distil the blobs before the first Python layer (as for a detection output: the shapes may differ
  between the float and the quantized model);
* shape inference outside a Net (config generation, the guide's file flow) never imports the module.

Failures are AmctErrors naming the layer, the original exception chained (``__cause__``) for its
traceback: UnsupportedLayerError when the class cannot be loaded, GraphError when its code raises.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading

import numpy as np

from amct_caffe.errors import AmctError, GraphError, UnsupportedLayerError
from amct_caffe.ops import register
from amct_caffe.runtime.blob import Blob
from amct_caffe.runtime.layer import Layer as ExecutorLayer

__all__ = ["BlobVec", "Layer", "PythonLayer"]

# What ``import caffe`` gives a Python layer's module: the package amct_caffe.runtime, which sets it when it
# loads (it imports this module for Layer; importing the package here would make the two a cycle).
CAFFE_ALIAS = None


class _ParamBlob(Blob):
    """A learned blob a Python layer made. When the prototxt shares it by name (``param { name }``) with an earlier
    layer's, it reads and writes that blob's data and diff (Caffe's ShareData / ShareDiff), so that the object the
    layer keeps stays the one it computes with."""

    __slots__ = ("_owner",)

    def __init__(self, shape=()):
        super().__init__(shape)
        self._owner = None

    def _target(self) -> Blob:
        return self if self._owner is None else self._owner

    data = property(lambda self: Blob.data.fget(self._target()),
                    lambda self, value: Blob.data.fset(self._target(), value))
    diff = property(lambda self: Blob.diff.fget(self._target()),
                    lambda self, value: Blob.diff.fset(self._target(), value))
    shape = property(lambda self: Blob.shape.fget(self._target()))
    count = property(lambda self: Blob.count.fget(self._target()))


class BlobVec(list):
    """pycaffe's ``BlobVec``: a layer's learned blobs, grown by :meth:`add_blob`."""

    def add_blob(self, *shape) -> None:
        blob = _ParamBlob(())
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

    @property
    def type(self) -> str:
        return "Python"

    def setup(self, bottom, top) -> None:
        # pycaffe's base binds Caffe's LayerSetUp, which calls setup again: a class without one recurses there
        raise NotImplementedError(f"{type(self).__name__} defines no setup(bottom, top); Caffe needs one too")

    def reshape(self, bottom, top) -> None:
        raise NotImplementedError(f"{type(self).__name__} defines no reshape(bottom, top); Caffe needs one too")

    def forward(self, bottom, top) -> None:
        raise NotImplementedError(f"{type(self).__name__} defines no forward(bottom, top)")

    def backward(self, top, propagate_down, bottom) -> None:
        raise NotImplementedError(f"{type(self).__name__} defines no backward(top, propagate_down, bottom)")


class _LayerBlob(Blob):
    """A bottom or top handed to the user's code: pycaffe's blob, whose ``data`` / ``diff`` cannot be rebound."""

    __slots__ = ()

    data = property(Blob.data.fget)
    diff = property(Blob.diff.fget)

    @classmethod
    def of(cls, data: np.ndarray, diff: np.ndarray | None = None) -> _LayerBlob:
        blob = cls(data=data)
        blob._diff = diff  # noqa: SLF001 - Blob's own slot
        return blob


_ALIAS_LOCK = threading.Lock()
_alias_depth = 0
_alias_saved: dict = {}
_MISSING = object()


@contextlib.contextmanager
def _caffe_is_runtime():
    """``import caffe`` (``caffe.io``, ``caffe.proto``) gives :data:`CAFFE_ALIAS` (its ``io``, ``proto``) inside the
    block; what those names were comes back when the last such block of any thread ends (module-wide state:
    other threads see the alias meanwhile)."""
    global _alias_depth
    aliases = {"caffe": CAFFE_ALIAS, "caffe.io": CAFFE_ALIAS.io, "caffe.proto": CAFFE_ALIAS.proto}
    with _ALIAS_LOCK:
        if _alias_depth == 0:
            _alias_saved.clear()
            _alias_saved.update({name: sys.modules.get(name, _MISSING) for name in aliases})
            sys.modules.update(aliases)
        _alias_depth += 1
    try:
        yield
    finally:
        with _ALIAS_LOCK:
            _alias_depth -= 1
            if _alias_depth == 0:
                for name, module in aliases.items():
                    if sys.modules.get(name) is module:  # (unless the code itself replaced it)
                        if _alias_saved[name] is _MISSING:
                            del sys.modules[name]
                        else:
                            sys.modules[name] = _alias_saved[name]


def _foreign_base(cls: type) -> bool:
    """Whether ``cls`` derives from another Caffe's pycaffe ``Layer`` (Boost.Python's, in ``caffe._caffe``)."""
    return any(base.__name__ == "Layer" and base.__module__.startswith("caffe") for base in cls.__mro__[1:])


def _import_failure(where: str, module: str, e: ImportError) -> UnsupportedLayerError:
    missing = e.name or ""
    if missing == "caffe" or missing.startswith("caffe."):
        return UnsupportedLayerError(f"{where}: importing module '{module}' failed: {e}; `caffe` is "
                                     "amct_caffe.runtime there, which has pycaffe's Layer, Blob, Net, io, proto "
                                     "and solvers but not NetSpec")
    if missing and (missing == module or module.startswith(missing + ".")):
        return UnsupportedLayerError(f"{where}: cannot import module '{module}' ({e}); put the directory that "
                                     "holds it on PYTHONPATH, as Caffe needs too")
    return UnsupportedLayerError(f"{where}: importing module '{module}' failed: {type(e).__name__}: {e}")


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
        raise _import_failure(where, p.module, e) from e
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
    """The executor's side of a Python layer: the user's object, called with blob lists (module doc)."""

    num_bottoms = (0, None)
    num_tops = (0, None)
    shape_from_forward = True  # the user's forward may reshape its tops
    weights_optional = True    # Caffe keeps the blobs setup() made when the caffemodel has none for the layer
    runs_user_code = True      # shape inference outside a Net leaves it alone (module doc)

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        # every attribute of the executor's side exists before `user` does (__setattr__ sends new names there)
        self._built = False
        self._where = f"layer '{lp.name}' (Python {lp.python_param.module}.{lp.python_param.layer})"
        # top i -> the bottom it is computed in place on (Caffe hands the layer one blob for both)
        self._in_place = {i: list(lp.bottom).index(t) for i, t in enumerate(lp.top) if t in lp.bottom}
        self._tops = [_LayerBlob(()) for _ in lp.top]  # the top blobs the user's code sees, kept between calls
        self._top_shapes: list[tuple[int, ...]] = []
        self.user = self._call("__init__", user_layer_class(lp), lp)
        if not isinstance(getattr(self.user, "blobs", None), BlobVec):  # a subclass that skipped Layer.__init__
            self.user.blobs = BlobVec()
        self.user.param_str = lp.python_param.param_str
        self.user.phase = phase

    # -- the user's object: its attributes, its code -------------------------------------
    def __getattr__(self, name: str):
        if (name.startswith("__") and name.endswith("__")) or "user" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["user"], name)

    def __setattr__(self, name: str, value) -> None:
        # the executor's attributes all exist before `user` (or are class attributes); any other name set on the
        # layer (net.layers[i].x = ...) is the user's object's, as reading one the layer lacks reads the object's
        if "user" not in self.__dict__ or name in self.__dict__ or hasattr(type(self), name):
            object.__setattr__(self, name, value)
        else:
            setattr(self.__dict__["user"], name, value)

    def _call(self, method: str, *args):
        try:
            with _caffe_is_runtime():
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

    def _check_blobs(self, tops) -> None:
        for k, blob in enumerate(self.user.blobs):
            if not isinstance(blob, Blob) or not isinstance(blob.data, np.ndarray):
                raise GraphError(f"{self._where}: self.blobs[{k}] is not a blob of numbers; add learned blobs with "
                                 "self.blobs.add_blob(*shape) and write into their data")
        self._top_shapes = [blob.shape for blob in tops]

    def _build(self, bottom_shapes) -> None:
        """Caffe's SetUp at the Net's build: setup, then reshape, on zero bottoms of these shapes."""
        if self._built:
            return
        self._built = True
        bottoms, tops = self._blob_lists([_LayerBlob(tuple(s)) for s in bottom_shapes])
        self._call("setup", bottoms, tops)
        self._call("reshape", bottoms, tops)
        self._check_blobs(tops)

    # -- the executor's interface ---------------------------------------------------------
    def param_shapes(self, bottom_shapes):
        self._build(bottom_shapes)
        return [tuple(blob.shape) for blob in self.user.blobs]

    def initial_params(self, shapes, rng):
        return [np.array(blob.data, np.float32) for blob in self.user.blobs]

    def make_param_blobs(self, arrays):
        """The user's own blobs, the values written into them (so that what the layer holds stays the Net's)."""
        for blob, arr in zip(self.user.blobs, arrays, strict=True):
            if blob.data.shape == arr.shape and blob.data.dtype == arr.dtype:
                blob.data[...] = arr
            else:
                blob.data = arr
        return list(self.user.blobs)

    def on_net_built(self, net, index: int) -> None:
        # a learned blob shared by name is the owner's Blob in the Net: the layer's own object now reads it
        for mine, nets in zip(self.user.blobs, self.blobs, strict=True):
            if mine is not nets:
                if isinstance(mine, _ParamBlob):
                    mine._owner = nets  # noqa: SLF001 - this module's class
                else:  # a blob the layer's code appended itself
                    self.user.blobs[self.user.blobs.index(mine)] = nets

    def reshape(self, bottom_shapes):
        """The top shapes the layer's code gave last (its own reshape runs at the build and in every forward)."""
        self._build(bottom_shapes)
        return list(self._top_shapes)

    def _with_data(self, bottoms) -> tuple[list[Blob], list[Blob]]:
        """The user's bottom and top blobs for the Net's arrays ``bottoms`` (an in-place one: a copy to write)."""
        return self._blob_lists([_LayerBlob.of(np.array(a) if j in self._in_place.values() else a)
                                 for j, a in enumerate(bottoms)])

    def reshape_on(self, bottoms) -> None:
        """The layer's reshape on the Net's bottom arrays (``Net.reshape()``, as Caffe's Net::Reshape)."""
        bottom_blobs, tops = self._with_data(bottoms)
        self._call("reshape", bottom_blobs, tops)
        self._check_blobs(tops)

    def forward(self, bottoms):
        bottom_blobs, tops = self._with_data(bottoms)
        self._call("reshape", bottom_blobs, tops)
        self._call("forward", bottom_blobs, tops)
        self._check_blobs(tops)
        # copies: the layer's blobs keep their memory for the next forward, the Net's arrays are never rewritten
        return [np.asarray(blob.data, np.float32) if i in self._in_place else np.array(blob.data, np.float32)
                for i, blob in enumerate(tops)]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        bottom_blobs = [_LayerBlob.of(a) for a in bottoms]
        top_blobs = []
        for i, (data, diff) in enumerate(zip(tops, top_diffs, strict=True)):
            if i in self._in_place:
                blob = bottom_blobs[self._in_place[i]]
                blob._diff = np.array(diff, np.float32)  # noqa: SLF001 - a copy the user's code may write into
            else:
                blob = _LayerBlob.of(data, np.array(diff, np.float32))
            top_blobs.append(blob)
        self._call("backward", top_blobs, [bool(p) for p in propagate_down], bottom_blobs)
        return [np.array(blob.diff, np.float32) if propagate_down[j] else None for j, blob in enumerate(bottom_blobs)]
