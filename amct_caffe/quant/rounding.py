"""Learned rounding onto ARQ's weight grid: the codes that minimise the layer's output error.

ARQ rounds every weight to its nearest code. That minimises each weight's own error, not the
error of the layer's output, which also depends on how the layer's inputs are correlated: a 3x3
high-pass kernel on a smooth image sees nine almost equal inputs, so what matters is the error of
the kernel's *sum* (its gain on flat regions), and nine nearest roundings can move that sum by
most of its value. Following AdaRound (Nagel et al., 2020) and the layer-wise objective of
OBQ / GPTQ, each output channel's codes are chosen instead to minimise

    f(q) = E[(e . (x - mu))^2] = e^T H e,     e = s q - w,     H = Cov(x) + damp * mean(diag Cov(x)) I

where ``w`` (K,) is the channel's float weight, ``s`` its ARQ scale (kept: the grid does not
change), ``x`` (K,) the input patch the channel multiplies (im2col column; the *quantized*
input, as the deployed layer sees it), ``mu = E[x]``. The mean error ``e . mu`` is removed by the
bias (:func:`bias_correction`, Nagel et al. 2019), so only the covariance counts. ``damp`` keeps
H well conditioned when the data hold fewer independent patches than K.

Constraints (so that the saved weight, ``s q``, is exactly what ARQ quantizes to ``q`` with the
same ``s``):

* every code stays within one step of its float weight, ``q_k in {floor(w_k / s), floor + 1}``
  (AdaRound's), and within ``[qmin, qmax]``;
* the channel's dominant element (the one ARQ's scale comes from) keeps its nearest code (the
  extreme ``qmax`` or ``qmin``), so ARQ of ``s q`` finds the same scale.

Search: a row with at most ``EXHAUSTIVE`` free codes (a 3x3 depthwise kernel has 8) tries all
``2^free`` roundings and takes the best. Larger rows start at the nearest codes and lower f by
coordinate descent; flipping code k by ``d = +-1`` changes f by ``df = 2 d s (H e)_k +
s^2 H_kk``, and a flip is taken when df < 0. Rows that share H (the output channels of one group)
move together, vectorised; sweeps over k repeat until no flip lowers f, at most ``sweeps`` times.
Either way f never rises above nearest rounding's on the data H came from.

Upstream error. Aiming at the layer's own float weight on its quantized input ignores that the
input itself differs from the FP32 network's, ``x_fp32 = x + d``. Aiming at the FP32 output
``w . x_fp32`` instead, the centred error is ``e . x - w . d`` and

    f(q) = e^T H e - 2 e . c + const,     c = Cov(x, d) w

(the part of the upstream error this layer's rounding can cancel; BRECQ / QDrop call this the
asymmetric reconstruction). The statistics must come from a network whose earlier layers already
hold their final codes, or every layer would cancel the same upstream error again.
"""

from __future__ import annotations

import numpy as np

from ._common import QuantizationError, qrange, round_half_away

__all__ = ["DAMP", "bias_correction", "dominant_mask", "learned_codes", "rounding_cost"]

DAMP = 0.01     # H's diagonal loading, relative to its mean diagonal
SWEEPS = 16     # coordinate-descent passes over the K codes (they usually settle in 3 to 6)
EXHAUSTIVE = 10  # rows with at most this many free codes try every rounding (2^10 = 1024 candidates)


def dominant_mask(rows: np.ndarray) -> np.ndarray:
    """Boolean (R, K): each row's element ARQ takes its scale from (``max`` when ``|max| > |min|``,
    else ``min``; the first such element)."""
    mx, mn = rows.max(axis=1), rows.min(axis=1)
    t = np.where(np.abs(mx) > np.abs(mn), mx, mn)
    mask = np.zeros(rows.shape, bool)
    mask[np.arange(len(rows)), np.argmax(rows == t[:, None], axis=1)] = True
    return mask


def _damped(h: np.ndarray, damp: float) -> np.ndarray:
    h = np.array(h, np.float64)
    load = damp * float(np.mean(np.diag(h)))
    h[np.diag_indices_from(h)] += load if load > 0 else damp
    return h


def rounding_cost(rows: np.ndarray, scale: np.ndarray, codes: np.ndarray, h: np.ndarray,
                  linear: np.ndarray | None = None) -> np.ndarray:
    """f(q) = e^T H e - 2 e . c per row (R,), ``e = s q - w``; ``h`` (K, K) shared by the rows,
    ``linear`` (R, K) the rows' ``c`` (None: 0)."""
    e = np.asarray(scale, np.float64).reshape(-1, 1) * codes - rows
    f = np.einsum("rk,kl,rl->r", e, h, e)
    return f if linear is None else f - 2.0 * np.einsum("rk,rk->r", e, linear)


def learned_codes(rows: np.ndarray, scale: np.ndarray, h: np.ndarray, num_bits: int = 8, *, damp: float = DAMP,
                  sweeps: int = SWEEPS, linear: np.ndarray | None = None) -> np.ndarray:
    """Codes (R, K) float64 of integers for weight rows (R, K) on per-row scales (R,) (or one),
    minimising ``e^T H e - 2 e . c`` per row under the module doc's constraints; ``h`` (K, K) is
    the input covariance shared by these rows (damped here), ``linear`` (R, K) the rows' ``c``
    (None: 0; see "Upstream error" in the module doc)."""
    rows = np.asarray(rows, np.float64)
    if rows.ndim != 2:
        raise QuantizationError(f"learned rounding takes weight rows (R, K), got shape {rows.shape}")
    r, k = rows.shape
    h = np.asarray(h, np.float64)
    if h.shape != (k, k) or not np.isfinite(h).all():
        raise QuantizationError(f"learned rounding: input covariance must be finite ({k}, {k}), got {h.shape}")
    s = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (r,)).reshape(r, 1)
    c = np.zeros_like(rows) if linear is None else np.asarray(linear, np.float64)
    if c.shape != rows.shape or not np.isfinite(c).all():
        raise QuantizationError(f"learned rounding: the linear term must be finite {rows.shape}, got {c.shape}")
    hd = _damped(h, damp)
    qmin, qmax = qrange(num_bits)
    t = rows / s
    codes = np.clip(round_half_away(t), qmin, qmax)
    lo = np.clip(np.floor(t), qmin, qmax)
    hi = np.clip(lo + 1, qmin, qmax)
    free = ~dominant_mask(rows) & (hi > lo)
    if k <= EXHAUSTIVE + 1 and free.sum(axis=1).max() <= EXHAUSTIVE:
        return _exhaustive(rows, s[:, 0], codes, lo, free, hd, c)
    e = s * codes - rows
    g = e @ hd - c  # (R, K): H e - c, half the gradient of f
    diag = np.diag(hd)
    for _ in range(sweeps):
        flipped = False
        for j in range(k):
            d = np.where(codes[:, j] == lo[:, j], hi[:, j] - lo[:, j], lo[:, j] - hi[:, j])  # to the other code
            step = d * s[:, 0]
            gain = 2.0 * step * g[:, j] + step * step * diag[j]
            take = free[:, j] & (gain < -1e-12 * (np.abs(step * g[:, j]) + 1e-300))
            if not take.any():
                continue
            flipped = True
            rows_ = np.flatnonzero(take)  # only the rows that flip change H e (most do not)
            codes[rows_, j] += d[rows_]
            g[rows_] += step[rows_, None] * hd[j][None, :]
        if not flipped:
            break
    return codes


def _exhaustive(rows, s, codes, lo, free, hd, c) -> np.ndarray:
    """Every rounding of each row's free codes (to floor or floor + 1); the one of least f."""
    out = codes.copy()
    for r in range(len(rows)):
        idx = np.flatnonzero(free[r])
        if not len(idx):
            continue
        bits = (np.arange(1 << len(idx))[:, None] >> np.arange(len(idx))) & 1  # (2^F, F)
        cand = np.repeat(codes[r][None], len(bits), axis=0)
        cand[:, idx] = lo[r, idx] + bits
        e = s[r] * cand - rows[r]
        f = np.einsum("ck,kl,cl->c", e, hd, e) - 2.0 * (e @ c[r])
        out[r] = cand[int(np.argmin(f))]
    return out


def bias_correction(rows: np.ndarray, scale: np.ndarray, codes: np.ndarray, mu: np.ndarray,
                    mu_upstream: np.ndarray | None = None) -> np.ndarray:
    """What to add to each channel's bias (R,) so that its mean output on the quantized input is
    the float weight's: ``-(s q - w) . mu``, ``mu`` (K,) the mean input patch; with
    ``mu_upstream`` (K,), the mean of ``x_fp32 - x`` (the float network's input patch minus this
    one), also ``+ w . mu_upstream``: the mean of the FP32 network's output."""
    rows = np.asarray(rows, np.float64)
    e = np.asarray(scale, np.float64).reshape(-1, 1) * codes - rows
    shift = -(e @ np.asarray(mu, np.float64))
    return shift if mu_upstream is None else shift + rows @ np.asarray(mu_upstream, np.float64)
