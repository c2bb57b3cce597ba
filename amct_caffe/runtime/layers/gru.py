"""GRU, as synopsys-caffe defines it (``src/caffe/layers/gru_layer.cpp`` there), computed directly.

Official Caffe has no GRU. The executor follows the public fork whose GRU is built like Caffe's
RNN and LSTM: a RecurrentLayer whose unrolled internal net is made of InnerProduct, Slice, Scale,
Eltwise, Sigmoid and TanH layers (docs/recurrent.md says why this definition and where it comes
from). Here the same layers' float32 arithmetic runs in a Python loop over time, as recurrent.py
does for RNN and LSTM; the bottoms, tops, state and input transforms are recurrent.py's.

Bottoms ``x (T, N, ...)`` (``D = prod(shape[2:])``), ``cont (T, N)``, optional ``x_static (N, ...)``
(``D_s``), with ``expose_hidden`` ``h0 (1, N, H)``; tops ``h (T, N, H)`` and with ``expose_hidden``
``hT (1, N, H)``. ``H = recurrent_param.num_output``.

Learned blobs, in the order the fork's unrolled net creates them (so its caffemodels load)::

    W (3H, D), b (3H), [W_static (3H, D_s)], R_z (H, H), R_r (H, H), R_h (H, H), [Rb_h (H)]

the rows of ``W``, ``b`` and ``W_static`` stacked ``z, r, h`` (update, reset, candidate); ``Rb_h``
only with ``recurrent_param.linear_before_reset`` non-zero. One step, in the unrolled net's order
(``a + b`` an Eltwise SUM with its bottoms in that order)::

    h~    = cont_t * h_{t-1}                                  Scale
    g_t   = (W x_t + b) [+ W_static x_static]                 x_transform (+ the static sum)
    z     = sigmoid(R_z h~ + g_z)
    r     = sigmoid(R_r h~ + g_r)
    a     = R_h (r * h~)                 linear_before_reset = 0 (reset before the product)
    a     = r * (R_h h~ + Rb_h)          linear_before_reset != 0 (reset after it)
    n     = tanh(a + g_h)
    h_t   = n + z * (h~ - n)             = (1 - z) * n + z * h~

The ONNX GRU's equations, with ``Wb + Rb`` of the z, r gates folded into ``b`` (and ``Rb_h`` into
``b_h`` when the reset comes first). Note that the fork mixes ``h~``, the state *after* ``cont``,
into ``h_t``: a restarted stream starts from zero, as in RNN and LSTM.

Rounding: ``sigmoid`` is sigmoid_layer.cpp's ``1. / (1. + expf(-x))`` (the division in double,
:func:`.libm_float.caffe_sigmoid`), ``tanh`` glibc's ``tanhf`` (:func:`.libm_float.tanhf`), the
InnerProducts :func:`.inner_product.InnerProduct`'s, the rest float32 in the C++ order.

Backward (Caffe's backward of the unrolled net, as recurrent.py): only the output's diff enters,
``hT``'s diff is ignored and none reaches ``h0`` or ``cont``; per step, from ``dh`` (the output's
diff plus the next step's recurrent diff)::

    d(h~ - n) = z * dh           dz = (h~ - n) * dh          dn = -(z * dh) + dh
    dg_h = dn * (1 - n^2)                                    (TanH backward)
    reset first:  dR_h += dg_h^T (r * h~);  d(r h~) = dg_h R_h;  dr = h~ * d(r h~)
    reset after:  dr = (R_h h~ + Rb_h) * dg_h;  dl = r * dg_h;  dR_h += dl^T h~;  dRb_h += sum dl
    dg_r = dr * r * (1. - r);  dg_z = dz * z * (1. - z)      (Sigmoid backward, the last factor in double)
    dR_r += dg_r^T h~;  dR_z += dg_z^T h~
    dh~  = ((dg_z R_z + dg_r R_r) + [d(r h~) * r | dl R_h]) + d(h~ - n)     (h~'s Split, consumer order)
    dh_{t-1} = cont_t * dh~

and ``[dg_z, dg_r, dg_h]`` of every step go to recurrent.py's input backward (``W``, ``b``,
``W_static``, ``x``, ``x_static``).
"""

from __future__ import annotations

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.ops import register
from amct_caffe.runtime.layers.activation_grad import TanH_grad
from amct_caffe.runtime.layers.libm_float import tanhf
from amct_caffe.runtime.layers.libm_float import caffe_sigmoid
from amct_caffe.runtime.layers.recurrent import _Recurrent

_F32 = np.float32
# the fork's default gate (F) and candidate (G) activations: recurrent_param.activations overrides them
_DEFAULT_ACTIVATIONS = ("Sigmoid", "TanH")


def sigmoid_grad(dy: np.ndarray, y: np.ndarray) -> np.ndarray:
    """sigmoid_layer.cpp's backward ``top_diff * y * (1. - y)``: ``top_diff * y`` in float, the
    product with the double ``1. - y`` in double, rounded once."""
    return ((dy * y).astype(np.float64) * (1.0 - y.astype(np.float64))).astype(_F32)


@register("GRU")
class GRULayer(_Recurrent):
    """synopsys-caffe's GRU: see the module doc."""

    states = 1
    gate_factor = 3

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        rp = lp.recurrent_param
        acts = tuple(rp.activations)
        if acts != _DEFAULT_ACTIVATIONS[:len(acts)]:
            raise GraphError(f"layer '{lp.name}' (GRU): recurrent_param.activations {list(acts)} is not supported; "
                             f"only the defaults {list(_DEFAULT_ACTIVATIONS)} are")
        self.reset_after = rp.linear_before_reset != 0

    def _recurrent_param_shapes(self):
        h = self.hidden
        return [(h, h)] * 3 + ([(h,)] if self.reset_after else [])

    def _recurrent_fillers(self, weight, bias):
        return [weight] * 3 + ([bias] if self.reset_after else [])

    def _run(self, wx, ws, cont, state):
        (h,) = state
        hid = self.hidden
        k = self._hidden_index()
        hs, steps = [], []
        for t in range(wx.shape[0]):
            g = wx[t] if ws is None else wx[t] + ws   # XW_X_static_t (Eltwise SUM), then sliced z | r | h
            hc = h * cont[t][:, None]                 # h_conted_{t-1} (Scale)
            z = self._hidden_product(hc, k)           # R_z_h_t
            z += g[:, :hid]
            z = caffe_sigmoid(z)
            r = self._hidden_product(hc, k + 1)       # R_r_h_t
            r += g[:, hid:2 * hid]
            r = caffe_sigmoid(r)
            if self.reset_after:
                lin = self._hidden_product(hc, k + 2, k + 3)   # R_h h~ + Rb_h, then the Eltwise PROD
                a = r * lin
            else:
                lin = r * hc                          # r * h~ (Eltwise PROD), the input of R_h's product
                a = self._hidden_product(lin, k + 2)
            a += g[:, 2 * hid:]
            n = tanhf(a)                              # TanH layer: glibc's tanhf
            sub = hc - n                              # Eltwise SUM, coefficients 1, -1
            h = n + z * sub
            steps.append((hc, z, r, lin, n, sub))
            hs.append(h)
        self._cache = {"steps": steps}
        return np.stack(hs), [h]

    def _step_backward(self, dh_out, cont):
        k = self._hidden_index()
        r_z, r_r, r_h = (self.blobs[k + j].data for j in range(3))
        steps = self._cache["steps"]
        hid = self.hidden
        dgates = np.empty(dh_out.shape[:2] + (3 * hid,), _F32)
        dh_rec = None
        for t in range(len(steps) - 1, -1, -1):
            hc, z, r, lin, n, sub = steps[t]
            dh = dh_out[t] if dh_rec is None else dh_rec + dh_out[t]   # h_t's Split
            dsub = z * dh                             # z_h_prod's backward, then H_h_sub's (coefficient 1)
            dz = sub * dh
            dn = -dsub + dh                           # ht's Split: H_h_sub (coefficient -1), then h_t
            dgh = TanH_grad(dn, None, n)
            if self.reset_after:
                dr = lin * dgh
                dlin = r * dgh
                self.blobs[k + 2].diff += dlin.T @ hc
                self.blobs[k + 3].diff += dlin.sum(axis=0, dtype=_F32)
                dhc_h = dlin @ r_h
            else:
                self.blobs[k + 2].diff += dgh.T @ lin
                drh = dgh @ r_h
                dr = hc * drh
                dhc_h = r * drh
            dgr = sigmoid_grad(dr, r)
            self.blobs[k + 1].diff += dgr.T @ hc
            dgz = sigmoid_grad(dz, z)
            self.blobs[k].diff += dgz.T @ hc
            dhc = dgz @ r_z                           # h~'s Split: R_z, R_r, the candidate, H_h_sub
            dhc += dgr @ r_r
            dhc += dhc_h
            dhc += dsub
            dh_rec = dhc * cont[t][:, None]           # h_conted's Scale backward
            dgates[t, :, :hid] = dgz
            dgates[t, :, hid:2 * hid] = dgr
            dgates[t, :, 2 * hid:] = dgh
        return dgates

