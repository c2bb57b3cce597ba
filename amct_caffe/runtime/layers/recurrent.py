"""RNN and LSTM (``src/caffe/layers/{recurrent,rnn,lstm}_layer.cpp``), computed directly.

Caffe builds both as an unrolled internal net (InnerProduct, Scale, Eltwise, TanH, LSTMUnit
layers, one set per time step). Here the same layers' arithmetic runs in a Python loop over time,
vectorised over the streams, with the same float32 operations in the same order; the GEMMs are the
InnerProduct ones (:func:`.inner_product.InnerProduct`, rounded as Caffe's OpenBLAS).

Bottoms: ``x (T, N, ...)`` (``D = prod(shape[2:])``), ``cont (T, N)`` (0 starts a new sequence in
that stream), an optional static input ``x_static (N, ...)`` (``D_s``), and with
``expose_hidden`` the initial state ``h0 (1, N, H)`` [LSTM: and ``c0 (1, N, H)``]. Tops: the
output ``(T, N, H)`` and with ``expose_hidden`` the final state ``hT`` [LSTM: and ``cT``].
``H = recurrent_param.num_output``. Without ``expose_hidden`` the initial state is the final state
of the previous forward (zero on the first one), as Caffe's layer keeps it; with fewer streams than the
last forward, streams ``0 .. N-1`` go on from theirs, with more, every stream starts from zero (the memory
Caffe's Blob::Reshape keeps or allocates).

LSTM, learned blobs ``[W_xc (4H, D), b_c (4H), [W_xc_static (4H, D_s)], W_hc (4H, H)]``, gates
stacked ``i, f, o, g`` (lstm_unit.py)::

    h~_{t-1} = cont_t * h_{t-1}
    z_t      = (W_hc h~_{t-1} + (W_xc x_t + b_c)) + W_xc_static x_static
    i, f', o, g = sigmoid(z_i), sigmoid(z_f), sigmoid(z_o), tanh(z_g);  f = cont_t * f'
    c_t      = f * c_{t-1} + i * g
    h_t      = o * tanh(c_t)                       output h = [h_1 ... h_T]

RNN, learned blobs ``[W_xh (H, D), b_h (H), [W_xh_static (H, D_s)], W_hh (H, H), W_ho (H, H), b_o (H)]``::

    h_t = tanh((W_hh (cont_t * h_{t-1}) + (W_xh x_t + b_h)) + W_xh_static x_static)
    o_t = tanh(W_ho h_t + b_o)                     output o = [o_1 ... o_T]

Backward (Caffe's ``BackwardFrom`` over the unrolled net): only the output's diff enters; the
diffs of ``hT`` / ``cT`` are ignored (Caffe never shares them) and none reaches ``h0`` / ``c0``
(their unrolled inputs share data, not diffs) or ``cont``. Caffe back-propagates to ``x``,
``x_static`` and every learned blob unconditionally whenever the layer's backward runs, so this
layer writes those diffs whatever ``propagate_down`` and ``lr_mult`` say. The per-step products
add into the shared weights' diffs from ``t = T`` down to ``t = 1``, as the unrolled layers run;
the static input's diff is the sum of the steps' gate diffs taken in ``t`` order (its Split).
The ``hT`` / ``cT`` tops share the memory of the unrolled net's last state, which the last step's
backward reads (LSTMUnit's ``tanh(c_T)``, the RNN's TanH and W_ho on ``h_T``): a layer working in
place on them changes the gradient in Caffe, so the backward reads them from the tops too.
"""

from __future__ import annotations

import math

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.ops import recurrent_base, register
from amct_caffe.runtime.layer import Layer
from amct_caffe.runtime.layers.activation_grad import TanH_grad
from amct_caffe.runtime.layers.inner_product import InnerProduct
from amct_caffe.runtime.layers.libm_float import tanhf
from amct_caffe.runtime.layers.lstm_unit import lstm_unit_backward, lstm_unit_forward

_F32 = np.float32


def _ip(x2: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """One InnerProduct of a ``(M, K)`` matrix, the call Caffe makes for it."""
    return InnerProduct(x2, w, b, axis=1)


def _accumulate_ip_grads(blobs, w_index: int, b_index: int | None, dy2: np.ndarray, x2: np.ndarray) -> None:
    """InnerProduct's parameter gradients: ``dW += dY^T X``, ``db += sum_m dY`` (beta = 1 GEMM / GEMV)."""
    blobs[w_index].diff += dy2.T @ x2
    if b_index is not None:
        blobs[b_index].diff += dy2.sum(axis=0, dtype=_F32)


def _sum_in_order(parts: np.ndarray) -> np.ndarray:
    """Caffe's Split backward: ``((d_0 + d_1) + d_2) + ...``."""
    total = parts[0].copy()
    for p in parts[1:]:
        total += p
    return total


def _refuse_unsupported_fields(lp) -> None:
    """synopsys-caffe's RecurrentParameter fields that change the bottoms, tops or math and that the
    executor does not implement: a layer setting them is refused, naming the field. (``tf_rnn`` only
    changes the RNN; the fork ignores ``linear_before_reset`` outside the GRU, and so does this.) A calibration
    or quantized form (GRUCalibration, RNNQuant, ...) takes the fields of the type it stands for."""
    rp = lp.recurrent_param
    base = recurrent_base(lp.type)
    bad = [f"direction {rp.direction!r}" if rp.direction != "forward" else "",
           "default_initial" if rp.default_initial else "", "continue_recur" if rp.continue_recur else "",
           "tf_rnn" if rp.tf_rnn and base == "RNN" else "",
           "activation_alpha" if len(rp.activation_alpha) else "", "activation_beta" if len(rp.activation_beta) else "",
           "activations" if len(rp.activations) and base != "GRU" else ""]
    bad = [b for b in bad if b]
    if bad:
        raise GraphError(f"layer '{lp.name}' ({lp.type}): recurrent_param {', '.join(bad)} is not supported "
                         "(synopsys-caffe's extensions; only their defaults are)")


class _Recurrent(Layer):
    """What RNN, LSTM and GRU (gru.py) share (recurrent_layer.cpp): bottoms, tops, state, the input
    transforms."""

    num_bottoms = (2, 5)
    num_tops = (1, 3)
    in_place_ok = False
    # Caffe's Backward_cpu writes x's and x_static's diff whatever propagate_down says
    writes_unpropagated_diffs = True
    # its unrolled net's output blob shares top 0's diff from Reshape (recurrent_layer.cpp)
    holds_top_diff = True
    states = 1      # recurrent state blobs (h; LSTM: h, c)
    gate_factor = 1  # rows of the input weights per hidden unit (LSTM: 4 gates)

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        rp = lp.recurrent_param
        _refuse_unsupported_fields(lp)
        if rp.num_output <= 0:
            raise GraphError(f"layer '{lp.name}' ({lp.type}): recurrent_param.num_output must be > 0")
        self.hidden = int(rp.num_output)
        self.expose = bool(rp.expose_hidden)
        exposed = self.states if self.expose else 0
        nb, nt = len(lp.bottom), len(lp.top)
        if not 2 + exposed <= nb <= 3 + exposed or nt != 1 + exposed:
            raise GraphError(f"layer '{lp.name}' ({lp.type}) with expose_hidden {str(self.expose).lower()} takes "
                             f"{2 + exposed} or {3 + exposed} bottoms and {1 + exposed} top(s); the prototxt gives "
                             f"{nb} and {nt}")
        self.static = nb == 3 + exposed
        self.steps: int | None = None   # T, fixed at the first reshape as in Caffe's LayerSetUp
        self._state: list[np.ndarray] | None = None  # the final state blobs' memory, flat (capacity)
        self._cache: dict = {}

    # -- structure --------------------------------------------------------------------
    def _input_shapes(self, bottom_shapes):
        x, cont = tuple(bottom_shapes[0]), tuple(bottom_shapes[1])
        if len(x) < 3:  # recurrent_layer.cpp asks for 2, then its InnerProduct on axis 2 aborts on fewer than 3
            raise GraphError(f"layer '{self.name}' ({self.type}): x must have at least 3 axes (T, N, ...), "
                             f"got {list(x)}")
        if cont != x[:2]:
            raise GraphError(f"layer '{self.name}' ({self.type}): cont must be (T, N) = {list(x[:2])}, "
                             f"got {list(cont)}")
        d_static = None
        if self.static:
            s = tuple(bottom_shapes[2])
            # (at least 2 axes: Caffe's InnerProduct on it flattens from axis 1, and a 1-axis blob aborts there)
            if len(s) < 2 or s[0] != x[1]:
                raise GraphError(f"layer '{self.name}' ({self.type}): x_static must be (N, ...) with N = {x[1]} and "
                                 f"at least 2 axes, got {list(s)}")
            d_static = math.prod(s[1:])
        return x, math.prod(x[2:]), d_static

    def param_shapes(self, bottom_shapes):
        _, d, d_static = self._input_shapes(bottom_shapes)
        rows = self.gate_factor * self.hidden
        shapes = [(rows, d), (rows,)]
        if self.static:
            shapes.append((rows, d_static))
        return shapes + self._recurrent_param_shapes()

    def _recurrent_param_shapes(self) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def _recurrent_fillers(self, weight, bias) -> list:
        raise NotImplementedError

    def param_fillers(self):
        rp = self.lp.recurrent_param
        w, b = rp.weight_filler, rp.bias_filler
        return [w, b] + ([w] if self.static else []) + self._recurrent_fillers(w, b)

    def reshape(self, bottom_shapes):
        x, d, d_static = self._input_shapes(bottom_shapes)
        if self.steps is None:
            self.steps = x[0]
        elif x[0] != self.steps:
            raise GraphError(f"layer '{self.name}' ({self.type}): input number of timesteps changed "
                             f"({self.steps} -> {x[0]})")
        state = (1, x[1], self.hidden)
        for k in range(self.states if self.expose else 0):
            got = tuple(bottom_shapes[2 + self.static + k])
            if got != state:
                raise GraphError(f"layer '{self.name}' ({self.type}): bottom {2 + self.static + k} must be the "
                                 f"hidden state {list(state)}, got {list(got)}")
        if self.blobs:
            for k, want in ((0, d), (2, d_static)):
                if want is not None and self.blobs[k].data.shape[1] != want:
                    raise GraphError(f"layer '{self.name}' ({self.type}): input size {want} does not match the "
                                     f"weight shape {list(self.blobs[k].data.shape)}")
        return [(x[0], x[1], self.hidden)] + [state] * (self.states if self.expose else 0)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 1  # recurrent_layer.hpp: no gradient for the sequence indicators

    # -- computation ------------------------------------------------------------------
    def _initial_state(self, bottoms, n: int) -> list[np.ndarray]:
        if self.expose:
            return [np.asarray(b, _F32)[0] for b in bottoms[2 + self.static:]]
        # Caffe copies the previous forward's final state blob into the first step's input, count N*H values.
        # That blob's Reshape allocates new (zeroed) memory only when the count grows past its capacity: with
        # fewer streams than before, stream k < N goes on from its own final state (the first N*H values).
        size = n * self.hidden
        if self._state is None or self._state[0].size < size:
            self._state = [np.zeros(size, _F32) for _ in range(self.states)]
        return [s[:size].reshape(n, self.hidden).copy() for s in self._state]

    def _input_transforms(self, bottoms):
        """``W x_t + b`` for every step, ``(T, N, rows)``, and ``W_static x_static`` (``(N, rows)`` or None)."""
        x = np.asarray(bottoms[0], _F32)
        t, n = x.shape[:2]
        wx = _ip(x.reshape(t * n, -1), self.blobs[0].data, self.blobs[1].data).reshape(t, n, -1)
        ws = None
        if self.static:
            ws = _ip(np.asarray(bottoms[2], _F32).reshape(n, -1), self.blobs[2].data)
        return wx, ws

    def _input_backward(self, bottoms, dgates: np.ndarray) -> list:
        """Diffs of x and x_static from the steps' pre-activation diffs ``(T, N, rows)``; adds the
        input weights' gradients."""
        x = np.asarray(bottoms[0], _F32)
        t, n = x.shape[:2]
        x2 = x.reshape(t * n, -1)
        dy2 = dgates.reshape(t * n, -1)
        grads: list = [None] * len(bottoms)
        if self.static:
            xs2 = np.asarray(bottoms[2], _F32).reshape(n, -1)
            ds = _sum_in_order(dgates)
            _accumulate_ip_grads(self.blobs, 2, None, ds, xs2)
            grads[2] = (ds @ self.blobs[2].data).reshape(bottoms[2].shape)
        _accumulate_ip_grads(self.blobs, 0, 1, dy2, x2)
        grads[0] = (dy2 @ self.blobs[0].data).reshape(x.shape)
        return grads

    def _hidden_index(self) -> int:
        """Index of the first recurrent weight in ``self.blobs``."""
        return 3 if self.static else 2

    def _hidden_product(self, h: np.ndarray, w_index: int, b_index: int | None = None) -> np.ndarray:
        """``W h (+ b)`` for a product whose input is the hidden state, ``(N, rows)``.

        The quantized and calibration forms of the layer (recurrent_quant.py) replace it: the hidden
        state is quantized, or observed, exactly there.
        """
        return _ip(h, self.blobs[w_index].data, None if b_index is None else self.blobs[b_index].data)

    def forward(self, bottoms):
        cont = np.asarray(bottoms[1], _F32)
        wx, ws = self._input_transforms(bottoms)
        state = self._initial_state(bottoms, cont.shape[1])
        out, final = self._run(wx, ws, cont, state)
        if not self.expose:
            for memory, s in zip(self._state, final, strict=True):
                memory[:s.size] = s.reshape(-1)
        return [out] + ([s[None] for s in final] if self.expose else [])

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        if propagate_down[1]:
            raise GraphError(f"layer '{self.name}' ({self.type}): cannot back-propagate to the sequence indicators")
        if self.expose:
            # Caffe's hT / cT tops share the data of the unrolled net's last state blobs, which the last
            # step's backward reads: a layer working in place on those tops changes the gradient
            self._cache["final"] = [np.asarray(top, _F32)[0] for top in tops[1:]]
            # likewise c0 is the unrolled net's c_0, which the first LSTMUnit's backward reads
            self._cache["initial"] = [np.asarray(b, _F32)[0] for b in bottoms[2 + self.static:]]
        if "out" in self._cache and len(tops[0]) == 1:
            # one step: Caffe's one-bottom Concat makes the output top share o_1's data, so a layer
            # working in place on the output changes what o_1's TanH backward reads
            self._cache["out"] = [np.asarray(tops[0], _F32)[0]]
        dgates = self._step_backward(np.asarray(top_diffs[0], _F32), np.asarray(bottoms[1], _F32))
        return self._input_backward(bottoms, dgates)


@register("LSTM")
class LSTMLayer(_Recurrent):
    """Caffe's LSTM: see the module doc (gate equations in lstm_unit.py)."""

    states = 2
    gate_factor = 4

    def shared_tops(self, bottom_shapes):
        # One step: the output Concat has one bottom and shares h_1's data, which is also the
        # exposed h_T; the tops point at the unrolled blobs (RecurrentLayer::Reshape after
        # unrolled_net_->Reshape; Forward_cpu), so y and hT are one memory.
        return [(0, 1)] if self.expose and bottom_shapes[0][0] == 1 else []

    def _recurrent_param_shapes(self):
        return [(4 * self.hidden, self.hidden)]

    def _recurrent_fillers(self, weight, bias):
        return [weight]

    def _run(self, wx, ws, cont, state):
        h, c = state
        k = self._hidden_index()
        steps = wx.shape[0]
        hs, cs, gates, conted = [], [c], [], []
        for t in range(steps):
            hc = h * cont[t][:, None]                 # Scale layer h_conted_{t-1}
            z = self._hidden_product(hc, k)           # transform_t: W_hc h~_{t-1}
            z += wx[t]                                # Eltwise SUM gate_input_t, bottoms in order
            if ws is not None:
                z += ws
            c, h = lstm_unit_forward(c, z, cont[t])
            conted.append(hc)
            gates.append(z)
            cs.append(c)
            hs.append(h)
        self._cache = {"conted": conted, "gates": gates, "cells": cs}
        return np.stack(hs), [h, c]

    def _step_backward(self, dh_out, cont):
        cache = self._cache
        w_hc = self.blobs[self._hidden_index()].data
        steps = dh_out.shape[0]
        dgates = np.empty((steps,) + cache["gates"][0].shape, _F32)
        dc = np.zeros_like(dh_out[0])                 # c_T's diff: nothing reads c_T in the unrolled net
        dh_rec = None
        for t in range(steps - 1, -1, -1):
            dh = dh_out[t] if dh_rec is None else dh_rec + dh_out[t]   # h_t's Split
            c = cache["final"][1] if t == steps - 1 and "final" in cache else cache["cells"][t + 1]
            c_prev = cache["initial"][1] if t == 0 and "initial" in cache else cache["cells"][t]
            dc, dz = lstm_unit_backward(c_prev, cache["gates"][t], cont[t], c, dc, dh)
            dgates[t] = dz
            self.blobs[self._hidden_index()].diff += dz.T @ cache["conted"][t]
            dh_rec = (dz @ w_hc) * cont[t][:, None]   # transform_t, then h_conted_{t-1}'s Scale backward
        return dgates


@register("RNN")
class RNNLayer(_Recurrent):
    """Caffe's RNN: tanh hidden units and a tanh output layer, see the module doc."""

    states = 1
    gate_factor = 1

    def _recurrent_param_shapes(self):
        h = self.hidden
        return [(h, h), (h, h), (h,)]

    def _recurrent_fillers(self, weight, bias):
        return [weight, weight, bias]

    def _run(self, wx, ws, cont, state):
        (h,) = state
        k = self._hidden_index()
        hs, os_, conted = [], [], []
        for t in range(wx.shape[0]):
            hc = h * cont[t][:, None]                 # Scale layer h_conted_{t-1}
            z = self._hidden_product(hc, k)           # W_hh_h_{t-1}
            z += wx[t]                                # Eltwise SUM h_input_sum_t
            if ws is not None:
                z += ws
            h = tanhf(z)                              # h_neuron_t (TanH: glibc's tanhf)
            o = tanhf(self._hidden_product(h, k + 1, k + 2))   # W_ho_h_t, o_neuron_t
            conted.append(hc)
            hs.append(h)
            os_.append(o)
        # the steps' own o_t, not the stacked top: Caffe's TanH backward reads o_neuron_t's top,
        # which a layer working in place on the RNN's output (a copy, by Concat, for T > 1) leaves alone
        self._cache = {"conted": conted, "hidden": hs, "out": os_}
        return np.stack(os_), [h]

    def _step_backward(self, do_out, cont):
        cache = self._cache
        k = self._hidden_index()
        w_hh, w_ho = self.blobs[k].data, self.blobs[k + 1].data
        steps = do_out.shape[0]
        dpre = np.empty_like(do_out)
        dh_rec = None
        for t in range(steps - 1, -1, -1):
            h = cache["final"][0] if t == steps - 1 and "final" in cache else cache["hidden"][t]
            dwo = TanH_grad(do_out[t], None, cache["out"][t])
            _accumulate_ip_grads(self.blobs, k + 1, k + 2, dwo, h)
            dh = dwo @ w_ho
            if dh_rec is not None:
                dh = dh + dh_rec                      # h_t's Split: W_ho_h_t's diff + h_conted_t's
            dz = TanH_grad(dh, None, h)
            dpre[t] = dz
            self.blobs[k].diff += dz.T @ cache["conted"][t]
            dh_rec = (dz @ w_hh) * cont[t][:, None]
        return dpre
