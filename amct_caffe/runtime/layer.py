"""Base class of the executor's layers.

A layer is built from its LayerParameter (``self.lp``; read fields there, so defaults are
caffe.proto's own) and works on numpy float32 arrays:

* ``reshape(bottom_shapes) -> top_shapes`` — called before every forward, like Caffe's
  ``Layer::Reshape``; cache derived sizes on ``self`` here.
* ``forward(bottoms) -> tops`` — pure: it must never modify a bottom array in place (in-place
  layers of the prototxt simply rebind the blob name to the new array), and it may return views.
* ``param_shapes(bottom_shapes)`` / ``param_fillers()`` — the learned blobs this layer owns
  (``self.blobs``, a list of :class:`Blob` shared with ``Net.params``).

Training (Caffe's ``Backward_cpu``):

* ``backward(top_diffs, propagate_down, bottoms, tops) -> bottom_diffs`` — ``bottoms`` / ``tops``
  are the blobs' data *as Caffe would hold it at backward time* (for an in-place layer the
  bottom is the top, overwritten), so a layer that needs its pre-in-place input keeps it from
  ``forward`` (``self.in_place`` tells), as Caffe's layers do. Return one array per bottom
  (``None`` where ``propagate_down`` is False); add the parameter gradients into
  ``self.blobs[i].diff`` (accumulate, never assign) where ``self.param_propagate_down[i]``.
  Never modify a diff or data array in place. A type whose Caffe backward writes a bottom's diff
  whatever propagate_down says sets ``writes_unpropagated_diffs`` and returns that array too.
* ``is_loss`` marks Caffe's LossLayer family (top 0 weighs 1 unless ``loss_weight`` says
  otherwise); ``allow_force_backward(i)`` is Caffe's AllowForceBackward.

A layer whose top shape depends on the data (DetectionOutput) sets ``shape_from_forward``:
its ``reshape`` gives a placeholder shape and the blob takes whatever ``forward`` returns.

Arity is declared with ``num_bottoms`` / ``num_tops``: an int (exact) or an inclusive
``(min, max)`` range with ``None`` for "no limit"; the Net checks it at construction.
"""

from __future__ import annotations

import logging

import numpy as np

from amct_caffe.errors import GraphError, ModelFormatError
from amct_caffe.runtime.blob import Blob
from amct_caffe.runtime.fillers import fill

_LOG = logging.getLogger(__name__)


class Layer:
    type_names: tuple[str, ...] = ()
    num_bottoms: int | tuple[int | None, int | None] = 1
    num_tops: int | tuple[int | None, int | None] = 1
    shape_from_forward: bool = False
    # True for a type whose tops depend on its bottoms' shapes only, never their values (PriorBox):
    # such a blob is the same in a float and a quantized model (api/compared_outputs.py).
    reads_shapes_only: bool = False
    # False for the types whose Caffe LayerSetUp checks top[0] != bottom[0] (AbsVal, Flatten...).
    in_place_ok: bool = True
    # Set by the Net when the caffemodel gave this layer integer blobs (a deploy model's int8
    # weights / int32 bias); they are handed to the layer as float32 holding those integers.
    integer_params: bool = False

    # Caffe's LossLayer family: top 0 is a loss of weight 1 unless the prototxt gives loss_weight.
    is_loss: bool = False
    # Caffe's Backward_cpu of this type writes some bottom diffs even where propagate_down is False
    # (BatchNorm, MVN ignore it; Scale leaves scratch there): ``backward`` may then return an
    # array for such a bottom and the Net stores it, so every blob's diff matches Caffe's.
    writes_unpropagated_diffs: bool = False
    # Caffe's ShareData: the tops are the bottom's memory (Flatten, Reshape, Split...), so an
    # in-place layer on one of them changes the others. See :meth:`shares_bottom_data`.
    shares_data: bool = False
    # Caffe keeps a layer's LayerSetUp blobs when the caffemodel has none for it. The executor
    # refuses that by default (a misnamed layer would silently run on filler values); the layers
    # the tool inserts into a trained float model for retraining set this and start from
    # ``param_fillers`` (or, sharing a param, from its owner).
    weights_optional: bool = False
    # True for a calibration layer, which acts on its net's first batch_num forwards only: such a net
    # allocates its blobs without numpy's huge-page hint (runtime/memory.py).
    bounded_run: bool = False
    # True for Caffe's Python layer, whose code is the user's module: only a Net imports it; shape inference
    # outside a Net (config generation, the guide's file flow) leaves the layer alone.
    runs_user_code: bool = False

    def __init__(self, lp, phase: int = 1):
        self.lp = lp
        self.name = lp.name
        self.phase = phase
        self.blobs: list = []
        # set by the Net: top 0 is bottom 0 in the prototxt; which learned blobs get gradients
        self.in_place = bool(lp.top) and bool(lp.bottom) and lp.top[0] == lp.bottom[0]
        self.param_propagate_down: list[bool] = []

    @property
    def type(self) -> str:
        return self.lp.type

    # -- structure --------------------------------------------------------------------
    @classmethod
    def check_arity(cls, lp) -> None:
        for what, spec, got in (("bottom", cls.num_bottoms, len(lp.bottom)), ("top", cls.num_tops, len(lp.top))):
            lo, hi = (spec, spec) if isinstance(spec, int) else spec
            if (lo is not None and got < lo) or (hi is not None and got > hi):
                want = str(lo) if lo == hi else f"{lo if lo is not None else 0}..{hi if hi is not None else 'n'}"
                raise GraphError(f"layer '{lp.name}' ({lp.type}) takes {want} {what} blob(s), "
                                 f"the prototxt gives {got}")
        if lp.top and lp.bottom and lp.top[0] == lp.bottom[0]:
            if not cls.in_place_ok:
                raise GraphError(f"layer '{lp.name}' ({lp.type}) does not allow in-place computation "
                                 "(top == bottom)")
            why = cls.in_place_fault(lp)
            if why:
                raise GraphError(f"layer '{lp.name}' ({lp.type}) works in place (top == bottom), where {why}; "
                                 "give it a top of its own")

    def in_place_zero_diff(self, bottom: np.ndarray, why: str) -> np.ndarray:
        """The bottom diff Caffe's backward gives in place, where it clears or scales the diff memory the top
        shares before it reads the top diff: zero (``why`` says how), with a warning once per layer."""
        if not getattr(self, "_warned_in_place", False):
            self._warned_in_place = True
            _LOG.warning("layer '%s' (%s) in place: Caffe's backward %s, so the bottom diff is zero, not the "
                         "gradient; reproduced as Caffe computes it (give the layer a top of its own for the "
                         "gradient)", self.name, self.type, why)
        return np.zeros(np.shape(bottom), np.float32)

    # Why Caffe's layer, run in place, does not compute its function (it writes its top, which is its bottom,
    # before it has read all of the bottom), for a type whose class sets it; such a net is refused by name.
    in_place_differs: str = ""

    @classmethod
    def in_place_fault(cls, lp) -> str:
        """Why this layer, as ``lp`` sets it up, cannot run in place ("" where it can): :attr:`in_place_differs`."""
        return cls.in_place_differs

    def param_shapes(self, bottom_shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """Shapes of the learned blobs (empty for parameter-free layers)."""
        return []

    def param_shapes_for_weights(self, bottom_shapes, arrays) -> list[tuple[int, ...]]:
        """Shapes expected when a caffemodel supplies ``arrays`` for this layer.

        The same as :meth:`param_shapes` except for layers whose blob set depends on the model
        kind (DeQuant: three float blobs in a fake-quant model, one packed blob in a deploy model).
        """
        return self.param_shapes(bottom_shapes)

    def param_fillers(self) -> list:
        """Filler message per learned blob, for nets built without weights.

        Missing entries (or None) mean a constant-0 fill.
        """
        return []

    def initial_params(self, shapes, rng: np.random.Generator) -> list[np.ndarray]:
        """The learned blobs' values when no caffemodel gives them: :meth:`param_fillers`' fills (a
        Python layer gives what its ``setup`` made)."""
        fillers = list(self.param_fillers()) + [None] * len(shapes)
        try:
            return [fill(f, s, rng) for f, s in zip(fillers, shapes, strict=False)]
        except ModelFormatError as e:
            raise ModelFormatError(f"layer '{self.name}' ({self.type}): {e}") from None

    def make_param_blobs(self, arrays: list[np.ndarray]) -> list:
        """The Blob objects holding the learned blobs' first values ``arrays`` (a Python layer gives its own)."""
        return [Blob(data=arr) for arr in arrays]

    def on_net_built(self, net, index: int) -> None:
        """Called once every layer exists; a layer may inspect its neighbours here."""

    # -- computation ------------------------------------------------------------------
    def reshape(self, bottom_shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """Top shapes for these bottom shapes. Default: one top shaped like bottom 0."""
        return [tuple(bottom_shapes[0])]

    def forward(self, bottoms: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def prepared_forward(self, bottom_shapes: list[tuple[int, ...]]):
        """A callable equal to :meth:`forward` for bottoms of these shapes (after :meth:`reshape` for them).

        The Net's prepared steps (:mod:`.forward`) call it on every forward while the shapes stay the
        same; a layer whose forward re-derives much from its parameters on each call returns one that
        did that work here, once. It must read learned blobs at call time (``self.blobs[i].data``):
        solvers, ``share_with`` and ``copy_from`` replace or rewrite them between forwards.
        """
        return self.forward

    def prepared_forward_into(self, bottom_shapes: list[tuple[int, ...]]):
        """None, or a callable ``(bottoms, outs) -> tops`` equal to :meth:`forward` that may write top ``i``
        into ``outs[i]`` when that is an array (C-contiguous float32 of the top's shape, which no one else
        holds) and must allocate it when ``outs[i]`` is None. The Net's prepared steps offer the top's
        array of the previous forward (:mod:`.forward`), which saves the page faults of fresh memory.
        A :meth:`prepared_forward` that already takes ``outs`` (a second argument, default ``(None,)``)
        says so with a ``takes_outs`` attribute set to True; the Net then uses it for both, and this
        method is not asked.
        """
        return None

    # -- training -----------------------------------------------------------------------
    def backward(self, top_diffs: list[np.ndarray], propagate_down: list[bool],
                 bottoms: list[np.ndarray], tops: list[np.ndarray]) -> list[np.ndarray | None]:
        """Caffe's ``Backward_cpu``: the gradient of the loss w.r.t. each bottom.

        ``top_diffs[i]`` has the shape of ``tops[i]``; the result has one entry per bottom, an
        array of the bottom's shape or None where ``propagate_down[i]`` is False. Learned blobs'
        gradients are *added* to ``self.blobs[k].diff`` when ``self.param_propagate_down[k]``.
        """
        raise NotImplementedError(f"{type(self).__name__}.backward")

    @classmethod
    def has_backward(cls) -> bool:
        """Whether this executor class implements :meth:`backward`."""
        return cls.backward is not Layer.backward

    def allow_force_backward(self, bottom_index: int) -> bool:
        """Caffe's AllowForceBackward: False for inputs no gradient is defined for (labels)."""
        return not (self.is_loss and bottom_index == 1)

    def shares_bottom_data(self, bottom_shapes) -> bool:
        """True when Caffe makes every top share bottom 0's memory (ShareData) for this layer."""
        return self.shares_data

    # True for a layer that, as Caffe's RecurrentLayer, points an inner blob at top 0's diff memory
    # in every Reshape and reads that memory in its backward: a ShareDiff made after its forward (a
    # Flatten above it, in the Flatten's backward) leaves it reading the memory its top had before.
    holds_top_diff: bool = False

    def shared_tops(self, bottom_shapes) -> list[tuple[int, int]]:
        """Pairs of this layer's tops that Caffe points at one data memory, so that a layer working
        in place on one changes the other (an LSTM of one step: see :mod:`.layers.recurrent`)."""
        return []

    def diff_sharing(self, bottom_shapes) -> str | None:
        """How Caffe's ShareDiff ties this layer's diffs (:class:`~.backward.DiffStore`).

        ``"reshape"``: top 0's diff is bottom 0's memory from every Reshape on (Reshape, a
        one-bottom Concat, a one-top Slice); ``"backward"``: bottom 0's diff becomes top 0's memory
        when the layer's backward runs, whatever propagate_down says (Flatten, an identity
        Permute); None: each blob keeps its own diff.
        """
        return None

    def param(self, i: int) -> np.ndarray:
        """Data of learned blob ``i``."""
        return self.blobs[i].data

    def __repr__(self) -> str:
        return f"<{type(self).__name__} '{self.name}'>"


class EmptyBackward:
    """Mixin for types whose Caffe ``Backward_cpu`` is an empty body.

    The fork's HardSigmoid, HardSwish, Unsqueeze, Upsample, BilinearInterpolate and MaxUnPool
    compute no gradient: Caffe leaves the bottom diff as it was (never written, so zero; in
    place, the top diff itself). Returning None leaves it untouched here too, and a warning says
    once per layer that no gradient crosses it.
    """

    @classmethod
    def has_backward(cls) -> bool:
        return True

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        if any(propagate_down) and not getattr(self, "_warned_empty_backward", False):
            self._warned_empty_backward = True
            _LOG.warning("layer '%s' (%s): Caffe's backward for this type is empty, so no gradient crosses "
                         "it (the bottom diff keeps what it held, as in Caffe)", self.name, self.type)
        return [None] * len(bottoms)


def canonical_axis(axis: int, ndim: int, layer_name: str, field: str = "axis", where: str | None = None) -> int:
    """Caffe's Blob::CanonicalAxisIndex: negative axes count from the end; range-checked. The error names
    ``where`` (e.g. "layer 'x' (Scale)") if given, else the layer."""
    if not -ndim <= axis < ndim:  # a 0-D blob has no axis (Caffe: "axis 0 out of range for 0-D Blob")
        raise GraphError(f"{where or f'layer {layer_name!r}'}: {field} {axis} is out of range for a {ndim}-D blob")
    return axis + ndim if axis < 0 else axis
