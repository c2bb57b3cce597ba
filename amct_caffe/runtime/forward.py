"""The forward pass of a :class:`~.net.Net`: one layer (or folded chain) at a time, and the prepared
steps that repeat it while the input shapes stay the same.

Caffe's ``Net::Forward`` calls every layer's ``Reshape`` and then its ``Forward_cpu``: a few
hundred nanoseconds of C++ per layer. The same bookkeeping in Python (compare the bottom shapes
with the last ones, replay the ShareDiff of a Reshape, look the blobs up by name, check the tops)
costs 10-20 us per layer, more than Caffe's whole layer on MTCNN's 12x12 P-Net. So after a full
forward, the Net prepares one closure per layer (:func:`prepare`), bound to its Blob objects and to
the layer's :meth:`~.layer.Layer.prepared_forward`; a later forward with the same input shapes runs
them in a row. The closures store exactly what :func:`forward_layer` stores (the same arrays, so the
same bytes), minus the work that cannot change while the shapes do not: the reshape checks (a layer's
top shapes depend only on its bottoms' shapes), and the top shape check, made against the shapes the
full forward saw.

Layers that read a blob whose shape depends on the data (a ``shape_from_forward`` layer's top, and
everything after it) keep the full per-layer path, reshape included; so do layers whose result needs
the slow path's care (a loss, an integer deploy layer's float64 accumulator, an in-place write into
memory other blobs share).
"""

from __future__ import annotations

import sys

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.runtime.layers import caffe_gemm

try:  # csrc/python/small_conv.cpp: consecutive native ops in one call (_runs_of_small_ops)
    from amct_caffe._kernels import SmallRun as SMALL_RUN
except ImportError:
    SMALL_RUN = None

_F32 = np.dtype(np.float32)


def _sole_refcount() -> int:
    """What sys.getrefcount says of an array held by one slot and read into a local, as _sole_array reads a
    blob's (3 on CPython 3.11: the slot, the local, the argument), measured rather than assumed, with no
    trace function set: a debugger's, reading the frame's locals, keeps a reference more (CPython < 3.13),
    and a count too high would let a held array pass for a sole one."""
    trace = sys.gettrace()
    sys.settrace(None)
    try:
        return _count_one_holder()
    finally:
        sys.settrace(trace)


def _count_one_holder() -> int:
    holder = [np.empty(1, np.float32)]
    local = holder[0]
    return sys.getrefcount(local)


_SOLE_REFS = _sole_refcount()


def forward_layer(net, i: int, reshape: bool = True) -> tuple:
    """Run layer ``i`` of ``net`` as Caffe's Layer::Forward (Reshape, then Forward_cpu); returns the
    shapes of the arrays it produced. ``reshape`` False: the shapes are known not to have changed."""
    layer = net.layers[i]
    name = net._layer_names[i]  # noqa: SLF001 - the Net's own helper, split out of net.py
    if layer.type == "Input":
        return ()
    if reshape:
        net._reshape_layer(i)  # noqa: SLF001
        net._share_diffs(i, "reshape")  # noqa: SLF001 - Caffe's Layer::Forward calls Reshape, which may ShareDiff
    if layer.holds_top_diff:  # (its backward reads the diff memory its top has now: Layer.holds_top_diff)
        net._held_top_diff[i] = net._diffs.memory_of(net.top_names[name][0])  # noqa: SLF001
    bottoms = [net.blobs[b].data for b in net.bottom_names[name]]
    tops = layer.forward(bottoms)
    in_place = net.bottom_names[name]
    shared_with = net._shared_with  # noqa: SLF001
    for t, arr in zip(net.top_names[name], tops, strict=False):
        blob = net.blobs[t]
        # An in-place top may legitimately change shape (Caffe's MVN reshapes to 4 axes).
        if arr.shape != blob.shape and not (layer.shape_from_forward or t in in_place):
            raise GraphError(f"layer '{name}' produced {t} of shape {arr.shape}, expected {blob.shape}")
        # Blobs are float32, except an INT8 layer's exact float64 accumulator (deploy model), which
        # goes on to its DeQuant unrounded.
        keep = arr.dtype == np.float32 or (layer.integer_params and arr.dtype == np.float64)
        blob.data = arr if keep else arr.astype(np.float32)
        if t in in_place and t in shared_with:
            # Caffe's ShareData: the in-place write lands in memory other blobs are views of
            for other in shared_with[t]:
                if other != t and net.blobs[other].count == blob.count:
                    net.blobs[other].data = blob.data.reshape(net.blobs[other].shape)
    plan = net._plan  # noqa: SLF001
    for j, (t, w) in enumerate(zip(net.top_names[name], plan.loss_weights[i], strict=False)):
        if w:  # Caffe's Layer::Forward: loss += dot(top data, loss weights)
            net._loss += float(np.float32(w) * np.sum(net.blobs[t].data, dtype=np.float32))  # noqa: SLF001
        if (i, j) in plan.diff_weighted:  # ... whose loss weights are the top's diff (BackwardPlan.diff_weighted)
            blob = net.blobs[t]
            net._loss += float(np.dot(blob.data.ravel(), blob.diff.ravel().astype(np.float32)))  # noqa: SLF001
    return tuple(arr.shape for arr in tops)


def forward_chain(net, chain, reshape: bool = True) -> None:
    """A Convolution or Eltwise and the in-place layers after it as one step (:mod:`.fold`)."""
    names = net._layer_names  # noqa: SLF001
    if reshape:
        for i in range(chain.first, chain.last + 1):
            net._reshape_layer(i)  # noqa: SLF001
    name = names[chain.first]
    top = net.blobs[net.top_names[name][0]]
    other = second = None
    if chain.residual is not None:  # the Eltwise's other bottom, and its top
        other = net.blobs[net.bottom_names[names[chain.residual]][chain.other]].data
        second = net.blobs[net.top_names[names[chain.last]][0]]
    # Written into the arrays the tops hold when nothing else does, as the prepared steps are: on the first
    # forward those are the arrays the reshape just made (not yet touched), so no second set is allocated.
    into = (_sole_array(top), None if second is None else _sole_array(second))
    tops = chain.forward([net.blobs[b].data for b in net.bottom_names[name]], other, into)
    top.data = tops[0]
    if second is not None:
        second.data = tops[1]


def run(net, start: int, stop: int, produced: list | None = None, releases=None) -> None:
    """Layers ``start`` .. ``stop - 1`` one by one, folded chains as one step (the full path).

    ``produced``: filled with the shapes each layer's forward returned (for :func:`prepare`).
    ``releases``: the net's :class:`~.release.Releases` in a full forward (None: every value is kept).
    """
    i = start
    while i < stop:
        chain = net._chains.get(i)  # noqa: SLF001
        if chain is not None and chain.last >= stop:  # a chain cut by start / end: unfolded
            chain = None
        last = chain.last if chain is not None else i
        if chain is not None:
            forward_chain(net, chain)
        else:
            shapes = forward_layer(net, i)
            if produced is not None:
                produced[i] = shapes
        if releases is not None:
            releases.free(i, last)
        i = last + 1


def prepare(net, produced: list) -> list:
    """The closures of a full forward for the current input shapes (module doc).

    ``produced``: per layer, the shapes its forward returned in the full forward just run.
    """
    steps = []
    dynamic: set[str] = set()  # blobs whose shape may change from one forward to the next
    names = net._layer_names  # noqa: SLF001
    i, n = 0, len(net.layers)
    while i < n:
        layer = net.layers[i]
        chain = net._chains.get(i)  # noqa: SLF001
        last = chain.last if chain is not None else i
        reads_dynamic = any(b in dynamic for j in range(i, last + 1) for b in net.bottom_names[names[j]])
        if reads_dynamic or layer.shape_from_forward:
            dynamic.update(t for j in range(i, last + 1) for t in net.top_names[names[j]])
        step = None
        if chain is not None:
            step = _chain_step(net, chain, reshape=reads_dynamic)
        elif layer.type != "Input":
            step = _layer_step(net, i, produced[i], reads_dynamic)
        if step is not None:
            releases = net._releases  # noqa: SLF001
            steps.append(step if releases is None else releases.steps(i, last, step))
        i = last + 1
    return _runs_of_small_ops(steps)


def _runs_of_small_ops(steps: list) -> list:
    """``steps`` with each run of consecutive steps that are native ops (convolutions of small inputs, the
    MAX pooling between them, a small Softmax; their step has ``small``: see :func:`_small_step`) replaced
    by one step that runs them all in one C++ call (``SmallRun``, csrc/python/small_conv.cpp): the same kernels with
    the same arguments, minus a Python step and a pybind11 call per layer, which on MTCNN's 12x12 P-Net
    cost more than the layers. A run reads one blob from outside (its first op's bottom); every op reads
    that blob or an earlier op's top, and no op writes the blob read from outside or a top written before.
    """
    if SMALL_RUN is None:
        return steps
    out, run = [], []

    def close():
        if len(run) > 1:
            out.append(_run_small_step(list(run)))  # (a copy: the steps it falls back to)
        else:
            out.extend(run)
        run.clear()

    for step in steps:
        small = getattr(step, "small", None)
        if small is not None and run:
            x = run[0].small[1]
            tops = [s.small[2] for s in run]
            if small[1] is not x and small[1] not in tops or small[2] is x or small[2] in tops:
                close()
        if small is None:
            close()
            out.append(step)
        else:
            run.append(step)
    close()
    return out


def _run_small_step(run: list):
    """One step running ``run`` (steps with ``small``) in one ``SmallRun`` call, bound to the Blob objects (it
    reads their arrays and writes each top into its array of the last step when no one else holds that; see
    small_conv.cpp); their own steps, one by one, under another GEMM configuration than the ops were made for
    (``caffe_gemm.configure``) or when the call refuses an array (not C-contiguous float32: it checks all
    before running any)."""
    x = run[0].small[1]
    tops = [s.small[2] for s in run]
    ops = [s.small[0][0] for s in run]
    inputs = [-1 if s.small[1] is x else tops.index(s.small[1]) for s in run]
    biased = [s.small[0][2] for s in run]
    params = [b for s in run for b in s.small[0][1]]
    configs = {id(c): c for c in (s.small[0][3] for s in run) if c is not None}
    config = next(iter(configs.values()), None)
    if len(configs) > 1:
        return _in_turn(run)
    try:
        call = SMALL_RUN(ops, inputs, biased)
    except ValueError:  # shapes that do not chain (its checks): the steps in turn
        return _in_turn(run)
    call.bind(x, params, tops)
    native = call.step
    gemm_config = caffe_gemm.gemm_config

    def step():
        if (config is None or gemm_config() is config) and native():
            return
        for s in run:  # the steps' own paths take such arrays
            s()
    return step


def _in_turn(run: list):
    def step():
        for s in run:
            s()
    return step


def _small_step(step, fwd, bottom, top):
    """Mark ``step`` (running ``fwd`` on Blob ``bottom`` into Blob ``top``) as a native op when ``fwd`` is one
    (its ``small_op``: the op, its learned blobs, whether it has a bias, its GEMM configuration)."""
    op = getattr(fwd, "small_op", None)
    if op is not None:
        step.small = (op, bottom, top)
    return step


def _careful(net, i: int, shapes, dynamic: bool) -> bool:
    """Whether layer ``i`` needs the full path of :func:`forward_layer` (module doc)."""
    layer = net.layers[i]
    name = net._layer_names[i]  # noqa: SLF001
    bottom_names, top_names = net.bottom_names[name], net.top_names[name]
    return (dynamic or layer.shape_from_forward or layer.integer_params or layer.holds_top_diff
            or any(net._plan.loss_weights[i]) or any(p == i for p, _ in net._plan.diff_weighted)  # noqa: SLF001
            or any(t in bottom_names and t in net._shared_with for t in top_names)  # noqa: SLF001
            or shapes is None or len(shapes) != len(top_names))


def _chain_step(net, chain, reshape: bool):
    if reshape:
        return lambda: forward_chain(net, chain)
    names = net._layer_names  # noqa: SLF001
    bottoms = [net.blobs[b] for b in net.bottom_names[names[chain.first]]]
    top = net.blobs[net.top_names[names[chain.first]][0]]
    fwd = chain.forward
    small = chain.prepared(bottoms[0].shape) if chain.residual is None and len(bottoms) == 1 else None
    if small is not None:
        (bottom,) = bottoms

        def small_step():
            top.data = small(bottom.data)
        return _small_step(small_step, small, bottom, top)
    if chain.residual is None:
        def step():
            top.data = fwd([b.data for b in bottoms], None, (_sole_array(top), None))[0]
        return step
    other = net.blobs[net.bottom_names[names[chain.residual]][chain.other]]
    second = net.blobs[net.top_names[names[chain.last]][0]]

    def residual_step():
        tops = fwd([b.data for b in bottoms], other.data, (_sole_array(top), _sole_array(second)))
        top.data = tops[0]
        second.data = tops[1]
    return residual_step


def _sole_array(blob):
    """The array ``blob`` holds when nothing else does (no caller keeping a result, no view of it as another
    blob, no layer keeping it for its backward: each would hold a reference), so that a kernel may write the
    blob's next value into it (see _into_step); else None. The kernels take it only when it has the new
    value's shape and shares no memory with what they read."""
    arr = blob.data
    if (sys.getrefcount(arr) > _SOLE_REFS or arr.dtype != _F32 or not arr.flags.c_contiguous
            or not arr.flags.writeable):  # (a top a user made read-only gets a fresh array)
        return None
    base = arr.base  # a kernel's result reshaped (numpy views even a reshape to the same shape): a view of all of it
    if base is not None and (type(base) is not np.ndarray or base.base is not None or base.nbytes != arr.nbytes
                             or sys.getrefcount(base) > _SOLE_REFS):
        return None
    return arr


def _layer_step(net, i: int, shapes: tuple, dynamic: bool):
    layer = net.layers[i]
    name = net._layer_names[i]  # noqa: SLF001
    bottom_names, top_names = net.bottom_names[name], net.top_names[name]
    if _careful(net, i, shapes, dynamic):
        return lambda: forward_layer(net, i, reshape=dynamic)
    step = _fast_layer_step(net, i, shapes)
    if bottom_names and top_names and layer.diff_sharing([net.blobs[b].shape for b in bottom_names]) == "reshape":
        # Caffe's Reshape (and a one-bottom Concat, a one-top Slice) re-ties the diffs on every forward
        def share_then_step():
            net._share_diffs(i, "reshape")  # noqa: SLF001
            step()
        return share_then_step
    return step


def _fast_layer_step(net, i: int, shapes: tuple):
    layer = net.layers[i]
    name = net._layer_names[i]  # noqa: SLF001
    bottom_names, top_names = net.bottom_names[name], net.top_names[name]
    # an in-place top may change shape (MVN): the full path does not check those either
    expect = [None if t in bottom_names else s for t, s in zip(top_names, shapes, strict=True)]
    bottoms = [net.blobs[b] for b in bottom_names]
    tops = [net.blobs[t] for t in top_names]
    fwd = layer.prepared_forward([b.shape for b in bottoms])
    # a prepared forward marked takes_outs is its own into-form (Layer.prepared_forward_into)
    into = fwd if getattr(fwd, "takes_outs", False) else layer.prepared_forward_into([b.shape for b in bottoms])
    if into is not None and len(tops) == 1 and len(bottoms) == 1 and expect[0] is not None:
        return _into_step(into, bottoms[0], tops[0], expect[0], name, top_names[0])
    if len(tops) == 1 and len(bottoms) == 1:
        bottom, top, shape = bottoms[0], tops[0], expect[0]

        def single():
            (arr,) = fwd([bottom.data])
            if arr.dtype != _F32:
                arr = arr.astype(_F32)
            if shape is not None and arr.shape != shape:
                raise GraphError(f"layer '{name}' produced {top_names[0]} of shape {arr.shape}, expected {shape}")
            top.data = arr
        return _small_step(single, fwd, bottom, top) if shape is not None else single
    pairs = list(zip(tops, expect, top_names, strict=True))

    def step():
        outs = fwd([b.data for b in bottoms])
        for (blob, want, t), arr in zip(pairs, outs, strict=False):
            if arr.dtype != _F32:
                arr = arr.astype(_F32)
            if want is not None and arr.shape != want:
                raise GraphError(f"layer '{name}' produced {t} of shape {arr.shape}, expected {want}")
            blob.data = arr
    return step


def _into_step(into, bottom, top, shape: tuple, name: str, top_name: str):
    """A one-bottom, one-top layer that can write its top into a given array (Layer.prepared_forward_into).

    It is given the array its top held after the last forward when nothing else holds that array: then no
    one can see it rewritten (a caller keeping a result, a view of it as another blob, a layer keeping it
    for its backward all hold a reference). Fresh memory costs a page fault per 4 KB, which on a
    large out-of-place ReLU is much of its time.
    """
    def step():
        old = _sole_array(top)
        if old is not None and old.shape != shape:
            old = None
        (arr,) = into([bottom.data], [old])
        if arr.dtype != _F32:
            arr = arr.astype(_F32)
        if arr.shape != shape:
            raise GraphError(f"layer '{name}' produced {top_name} of shape {arr.shape}, expected {shape}")
        top.data = arr
    return step


def set_inputs(net, given: dict, span: range | None) -> None:
    """``forward(**given)``'s arrays into their blobs (float32, the blob reshaped to fit), before the run of the
    layers in ``span`` (None: all). pycaffe takes data for the net's inputs only; here also for a blob no layer
    of the run computes anew (a partial run from a layer after its producer, or one computing it in place), but
    not for one that a layer of the run writes: the data would be written over unseen."""
    for name, value in given.items():
        name = net._input_aliases.get(name, name)  # noqa: SLF001 - the Net's own state, kept by this module
        if name not in net.blobs:
            raise GraphError(f"forward() got data for '{name}', which is not a blob of {net._source} "  # noqa: SLF001
                             f"(inputs: {net.inputs})")
        if name not in net.inputs:
            for i in span if span is not None else range(len(net.layers)):
                layer_name = net._layer_names[i]  # noqa: SLF001
                if name in net.top_names[layer_name] and name not in net.bottom_names[layer_name]:
                    raise GraphError(f"forward() got data for '{name}', which layer '{layer_name}' of this run "
                                     f"computes (the data would be written over): give data for the net's inputs "
                                     f"{net.inputs}, or start the run after that layer (forward(start=...))")
        try:
            value = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise GraphError(f"forward(): the data for '{name}' is not numbers: {e}") from None
        blob = net.blobs[name]
        if value.shape != blob.shape:
            blob.reshape(value.shape)
        blob.data[...] = value


def held_arrays(net) -> dict:
    """The arrays of ``net``'s outputs as a forward starts. pycaffe's blobs keep their memory for their life, and
    scripts hold an output's (``prob = net.blobs['prob'].data`` once, read after every forward);
    :func:`keep_memory` writes the forward's values into them. Only arrays of the blob's own are kept (a view of
    other memory is not written into); the Net leaves out data layers' tops, which may be views of the user's
    arrays (MemoryData)."""
    held = {}
    for name in net._memory_kept:  # noqa: SLF001
        arr = net.blobs[name].data
        base = arr.base
        if sys.getrefcount(arr) <= _SOLE_REFS and (base is None or sys.getrefcount(base) <= _SOLE_REFS):
            # no script holds it (nor a view of the array it is a view of: NumPy points a slice of a view at
            # the base): the forward may write into it or replace it, no one sees which (holding it here would
            # make the kernels that write into an array no one else holds allocate a new one, and keep_memory
            # copy that back: MTCNN P-Net at 12x12, 2 of its 17 microseconds)
            continue
        if arr.flags.writeable and (base is None or (type(base) is np.ndarray and base.base is None
                                                     and base.nbytes == arr.nbytes)):
            held[name] = arr
    return held


def keep_memory(net, before: dict) -> None:
    """Where a forward gave an output blob a new array of the shape it had, its values go into the array the
    blob held before, which it holds again (:func:`held_arrays`)."""
    for name, old in before.items():
        blob = net.blobs[name]
        new = blob.data
        if new is not old and new.shape == old.shape and new.dtype == old.dtype:
            np.copyto(old, new)
            blob.data = old
