"""Two references for the executor's GRU (amct_caffe/runtime/layers/gru.py), independent of it.

* :func:`gru_forward64`: the published equations (ONNX's GRU, which synopsys-caffe's layer
  implements) in float64, written from the formulas, not from the unrolled net::

      z = sigmoid(W_z x_t + b_z + R_z h~)       r = sigmoid(W_r x_t + b_r + R_r h~)
      n = tanh(W_h x_t + b_h + R_h (r * h~))                 (reset before the product)
      n = tanh(W_h x_t + b_h + r * (R_h h~ + Rb_h))          (linear_before_reset)
      h_t = (1 - z) * n + z * h~,    h~ = cont_t * h_{t-1}

  (plus ``W_static x_static`` inside every gate). :func:`numeric_grads` differentiates it by
  central differences, for the backward check.
* :func:`unrolled_gru`: the fork's unrolled net written out as a prototxt of official Caffe's own
  layers (Slice, InnerProduct with shared ``param { name }``, Reshape, Eltwise, Scale, Sigmoid, TanH,
  Concat), in the fork's layer order, so official Caffe computes what the fork's GRU layer
  computes inside its RecurrentLayer, operation for operation. :func:`params_from_unrolled` maps its
  learned blobs to the GRU layer's.
"""

from __future__ import annotations

import numpy as np

from tests.training.gradcheck import input_layer


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def gru_forward64(x, cont, params, *, x_static=None, h0=None, reset_after=False):
    """``(y (T, N, H), h_T (N, H))`` in float64; ``params`` in the layer's blob order."""
    x = np.asarray(x, np.float64)
    t_steps, n = x.shape[:2]
    x2 = x.reshape(t_steps, n, -1)
    p = [np.asarray(a, np.float64) for a in params]
    w, b = p[0], p[1]
    k = 2
    w_static = None
    if x_static is not None:
        w_static, k = p[2], 3
    r_z, r_r, r_h = p[k:k + 3]
    rb_h = p[k + 3] if reset_after else None
    hid = r_z.shape[0]
    static = 0.0 if w_static is None else np.asarray(x_static, np.float64).reshape(n, -1) @ w_static.T
    h = np.zeros((n, hid)) if h0 is None else np.asarray(h0, np.float64).reshape(n, hid)
    ys = []
    for t in range(t_steps):
        g = x2[t] @ w.T + b + static
        hc = h * np.asarray(cont, np.float64)[t][:, None]
        z = _sigmoid(g[:, :hid] + hc @ r_z.T)
        r = _sigmoid(g[:, hid:2 * hid] + hc @ r_r.T)
        if reset_after:
            n_t = np.tanh(g[:, 2 * hid:] + r * (hc @ r_h.T + rb_h))
        else:
            n_t = np.tanh(g[:, 2 * hid:] + (r * hc) @ r_h.T)
        h = (1 - z) * n_t + z * hc
        ys.append(h)
    return np.stack(ys), h


def numeric_grads(x, cont, params, seed, *, x_static=None, h0=None, reset_after=False, eps=1e-6):
    """Central differences of ``sum(seed * y)``: ``{"x": ..., "x_static": ..., "p0": ...}``."""
    def loss(xx, xs, ps):
        y, _ = gru_forward64(xx, cont, ps, x_static=xs, h0=h0, reset_after=reset_after)
        return float(np.sum(seed * y))

    def diff(arr, f):
        arr = np.array(arr, np.float64)
        g = np.empty_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + eps
            up = f(arr)
            arr[i] = old - eps
            down = f(arr)
            arr[i] = old
            g[i] = (up - down) / (2 * eps)
        return g

    ps = [np.array(a, np.float64) for a in params]
    grads = {"x": diff(x, lambda a: loss(a, x_static, ps))}
    if x_static is not None:
        grads["x_static"] = diff(x_static, lambda a: loss(x, a, ps))
    for j in range(len(ps)):
        grads[f"p{j}"] = diff(ps[j], lambda a, j=j: loss(x, x_static, ps[:j] + [a] + ps[j + 1:]))
    return grads


def _layer(name, ltype, bottoms, tops, body=""):
    return (f'layer {{ name: "{name}" type: "{ltype}" ' + " ".join(f'bottom: "{b}"' for b in bottoms) + " "
            + " ".join(f'top: "{t}"' for t in tops) + f" {body} }}\n")


def _ip(name, bottom, top, num_output, axis, params, bias=False):
    body = " ".join(f'param {{ name: "{p}" }}' for p in params)
    body += f" inner_product_param {{ num_output: {num_output} bias_term: {str(bias).lower()} axis: {axis} }}"
    return _layer(name, "InnerProduct", [bottom], [top], body)


def _sum(name, bottoms, top, coeffs=()):
    body = "eltwise_param { operation: SUM " + " ".join(f"coeff: {c}" for c in coeffs) + " }"
    return _layer(name, "Eltwise", bottoms, [top], body)


def _prod(name, bottoms, top):
    return _layer(name, "Eltwise", bottoms, [top], "eltwise_param { operation: PROD }")


def unrolled_gru(t_steps, n, xdims, hidden, *, static=None, reset_after=False) -> str:
    """Prototxt of the fork's unrolled GRU net over Inputs ``x``, ``cont``, [``xs``] and ``h0``;
    output ``y``, the last state ``h_T``."""
    hid3 = 3 * hidden
    text = "force_backward: true\n" + input_layer("x", t_steps, n, *xdims) + input_layer("cont", t_steps, n)
    if static is not None:
        text += input_layer("xs", n, *static)
    text += input_layer("h0", 1, n, hidden)
    steps = range(1, t_steps + 1)
    text += _layer("cont_slice", "Slice", ["cont"], [f"cont_{t}" for t in steps], "slice_param { axis: 0 }")
    text += _ip("x_transform", "x", "W_xc_x", hid3, 2, ["W_xc", "b_c"], bias=True)
    if static is not None:
        text += _ip("W_xc_x_static", "xs", "W_xc_x_static_preshape", hid3, 1, ["W_xc_static"])
        text += _layer("W_xc_x_static_reshape", "Reshape", ["W_xc_x_static_preshape"], ["W_xc_x_static"],
                       f"reshape_param {{ shape {{ dim: 1 dim: -1 dim: {hid3} }} }}")
    text += _layer("W_xc_x_slice", "Slice", ["W_xc_x"], [f"W_xc_x_{t}" for t in steps], "slice_param { axis: 0 }")
    for t in steps:
        hp = "h0" if t == 1 else f"h_{t - 1}"
        hc = f"h_conted_{t - 1}"
        gates = f"W_xc_x_{t}"
        if static is not None:
            text += _sum(f"XW_X_static_{t}", [gates, "W_xc_x_static"], f"XW_X_static_{t}")
            gates = f"XW_X_static_{t}"
        text += _layer(f"wx_slice{t}", "Slice", [gates], [f"W_xc_x_z_{t}", f"W_xc_x_r_{t}", f"W_xc_x_h_{t}"],
                       "slice_param { axis: 2 }")
        text += _layer(hc, "Scale", [hp, f"cont_{t}"], [hc], "scale_param { axis: 0 }")
        for g, w in (("z", "R_z"), ("r", "R_r")):
            text += _ip(f"{w}_h_{t}", hc, f"{w}_h_{t}", hidden, 2, [w])
            text += _sum(f"inner_{g}_{t}", [f"{w}_h_{t}", f"W_xc_x_{g}_{t}"], f"inner_{g}_{t}")
            text += _layer(f"{g}_{t}", "Sigmoid", [f"inner_{g}_{t}"], [f"{g}_{t}"])
        if reset_after:
            text += _ip(f"Rh_h_tm1s_{t}", hc, f"Rh_h_tm1s_{t}", hidden, 2, ["R_h", "Rb_h"], bias=True)
            text += _prod(f"R_rt_h_tm1s_{t}", [f"r_{t}", f"Rh_h_tm1s_{t}"], f"R_rt_h_tm1s_{t}")
        else:
            text += _prod(f"r_ts_h_tm1s_{t}", [f"r_{t}", hc], f"r_ts_h_tm1s_{t}")
            text += _ip(f"R_rt_h_tm1s_{t}", f"r_ts_h_tm1s_{t}", f"R_rt_h_tm1s_{t}", hidden, 2, ["R_h"])
        text += _sum(f"inner_h_{t}", [f"R_rt_h_tm1s_{t}", f"W_xc_x_h_{t}"], f"inner_h_{t}")
        text += _layer(f"ht_{t}", "TanH", [f"inner_h_{t}"], [f"ht_{t}"])
        text += _sum(f"H_h_sub_{t}", [hc, f"ht_{t}"], f"H_h_sub_{t}", coeffs=(1, -1))
        text += _prod(f"z_h_prod_{t}", [f"z_{t}", f"H_h_sub_{t}"], f"z_h_prod_{t}")
        text += _sum(f"h_{t}", [f"ht_{t}", f"z_h_prod_{t}"], f"h_{t}")
    return text + _layer("h_concat", "Concat", [f"h_{t}" for t in steps], ["y"], "concat_param { axis: 0 }")


def params_from_unrolled(ref: dict, kind: str, *, static: bool, reset_after: bool) -> list[np.ndarray]:
    """The GRU layer's blobs (its order) from the unrolled net's ``{kind}/layer/i`` arrays
    (``kind`` "pdata" or "pdiff"; shared blobs hold the accumulated diff)."""
    names = [("x_transform", 0), ("x_transform", 1)] + ([("W_xc_x_static", 0)] if static else [])
    names += [("R_z_h_1", 0), ("R_r_h_1", 0)]
    names += [("Rh_h_tm1s_1", 0), ("Rh_h_tm1s_1", 1)] if reset_after else [("R_rt_h_tm1s_1", 0)]
    return [ref[f"{kind}/{layer}/{i}"] for layer, i in names]
