"""Caffe's loss layers and Accuracy (``*_loss_layer.cpp``, ``accuracy_layer.cpp`` of the fork).

A loss layer (``is_loss``) reads predictions (bottom 0) and labels or targets (bottom 1), and
writes a scalar (shape ()) top; its top diff at backward time is the loss weight ``w`` (1 unless
``loss_weight`` says otherwise), which scales every gradient. Labels are float blobs holding
integers, read as Caffe's ``static_cast<int>`` does (truncation toward zero).

Losses accumulate in float64 and are rounded to float32 once (Caffe sums float32 terms one by one;
the two agree far inside the 1e-4 the gradient tests ask for).
"""

from __future__ import annotations

import math

import numpy as np

from amct_caffe.errors import AmctError, GraphError
from amct_caffe.ops import register
from amct_caffe.runtime.layer import Layer, canonical_axis
from amct_caffe.runtime.layers.activation import Sigmoid
from amct_caffe.runtime.layers.softmax import Softmax

_F32 = np.float32
FLT_MIN = np.finfo(np.float32).tiny
LOG_THRESHOLD = _F32(1e-20)  # Caffe's kLOG_THRESHOLD
# LossParameter.NormalizationMode
FULL, VALID, BATCH_SIZE, NONE = 0, 1, 2, 3


def _labels(arr, layer) -> np.ndarray:
    """Caffe's static_cast<int>(label): truncation toward zero. A NaN or infinite label, which that cast turns into
    some integer of no meaning, is refused naming ``layer``."""
    values = np.asarray(arr, np.float64)
    if not np.isfinite(values).all():
        bad = values[~np.isfinite(values)][0]
        raise GraphError(f"layer '{layer.name}' ({layer.type}): label {'NaN' if bad != bad else bad} is not a "
                         "class number; check the labels")
    return np.trunc(values).astype(np.int64)


def _legacy(shape, i: int) -> int:
    """Caffe's Blob::LegacyShape(i): 1 past the last axis."""
    return int(shape[i]) if i < len(shape) else 1


def normalizer(mode: int, outer: int, inner: int, valid: int) -> np.float32:
    """LossLayer::GetNormalizer: FULL outer * inner, VALID the non-ignored count, BATCH_SIZE outer,
    NONE 1; never below 1 (a batch without labels gives a zero loss, not NaN)."""
    value = {FULL: outer * inner, VALID: valid, BATCH_SIZE: outer, NONE: 1}[mode]
    return _F32(max(1.0, float(value)))


class LossLayer(Layer):
    """Caffe's LossLayer: two bottoms of the same first axis, one scalar top of weight 1 by default."""

    is_loss = True
    num_bottoms = 2

    def reshape(self, bottom_shapes):
        a, b = bottom_shapes[0], bottom_shapes[1]
        if not a or not b or a[0] != b[0]:
            raise GraphError(f"layer '{self.name}' ({self.type}): the data {list(a)} and the label {list(b)} "
                             "must have the same first dimension")
        return [()]

    def _no_label_diff(self, propagate_down) -> None:
        if any(propagate_down[1:]):
            raise GraphError(f"layer '{self.name}' ({self.type}) cannot backpropagate to label inputs "
                             "(Caffe aborts); set propagate_down: [true, false]")

    def _check_labels(self, labels, num_classes: int, ignore=None) -> None:
        bad = (labels < 0) | (labels >= num_classes)
        if ignore is not None:
            bad &= labels != ignore
        if bad.any():
            raise GraphError(f"layer '{self.name}' ({self.type}): label {int(labels[bad][0])} is outside "
                             f"0..{num_classes - 1}")


@register("SoftmaxWithLoss")
class SoftmaxWithLossLayer(LossLayer):
    """loss = -sum_{valid (i, j)} log(max(p[i, label(i, j), j], FLT_MIN)) / normalizer.

    p = softmax of bottom 0 over ``softmax_param.axis``, viewed as (outer, C, inner); the labels
    (outer * inner values) select one class per position; positions whose label is
    ``loss_param.ignore_label`` count neither in the sum nor in VALID's normalizer. The mode is
    ``loss_param.normalization`` (default VALID), or the legacy ``normalize`` (true: VALID,
    false: BATCH_SIZE) when only that is given. Top 1, if present, is p.

    Backward: dx = w / normalizer * (p - onehot(label)), zero at ignored positions.

    This fork cannot build the layer with the prob top: two tops need two loss_weight values, and
    its internal Softmax, made from a copy of the whole LayerParameter, then has two loss weights
    for its one top (Caffe's CHECK fails; later Caffe clears them). The executor refuses it too.
    """

    num_tops = (1, 2)

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        if len(lp.top) > 1:
            raise GraphError(f"layer '{self.name}' (SoftmaxWithLoss): a second (prob) top cannot be built by this "
                             "Caffe (its internal Softmax inherits the loss_weight of both tops); add a Softmax layer "
                             "for the probabilities")
        p = lp.loss_param
        self.ignore = p.ignore_label if p.HasField("ignore_label") else None
        if not p.HasField("normalization") and p.HasField("normalize"):
            self.mode = VALID if p.normalize else BATCH_SIZE
        else:
            self.mode = p.normalization
        self._prob = self._norm = None

    def reshape(self, bottom_shapes):
        super().reshape(bottom_shapes)
        shape = tuple(bottom_shapes[0])
        self.axis = canonical_axis(self.lp.softmax_param.axis, len(shape), self.name)
        self.outer, self.inner = math.prod(shape[:self.axis]), math.prod(shape[self.axis + 1:])
        if self.outer * self.inner != math.prod(bottom_shapes[1]):
            raise GraphError(f"layer '{self.name}' (SoftmaxWithLoss): {math.prod(bottom_shapes[1])} labels for "
                             f"{self.outer * self.inner} predictions (shape {list(shape)}, axis {self.axis})")
        return [()] + ([shape] if len(self.lp.top) > 1 else [])

    def _gather(self, bottoms):
        """prob viewed (outer, C, inner), labels (outer, inner), the valid mask and the labels to index with."""
        prob = Softmax(bottoms[0], axis=self.axis, gemv_sums=False)  # (the loss sums in float64 anyway)
        p3 = prob.reshape(self.outer, -1, self.inner)
        labels = _labels(bottoms[1], self).reshape(self.outer, self.inner)
        valid = labels != self.ignore if self.ignore is not None else np.ones(labels.shape, bool)
        self._check_labels(labels, p3.shape[1], self.ignore)
        return prob, p3, valid, np.where(valid, labels, 0)

    def forward(self, bottoms):
        prob, p3, valid, idx = self._gather(bottoms)
        picked = np.take_along_axis(p3, idx[:, None, :], axis=1)[:, 0, :]
        logs = np.log(np.maximum(picked[valid], FLT_MIN).astype(np.float64))
        self._norm = normalizer(self.mode, self.outer, self.inner, int(valid.sum()))
        self._prob, self._valid, self._idx = prob, valid, idx
        loss = _F32(-logs.sum()) / self._norm
        return [np.array(loss, _F32)] + ([prob] if len(self.lp.top) > 1 else [])

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        self._no_label_diff(propagate_down)
        if not propagate_down[0]:
            return [None, None]
        grad = self._prob.reshape(self.outer, -1, self.inner).copy()
        rows, cols = np.nonzero(self._valid)
        grad[rows, self._idx[rows, cols], cols] -= _F32(1)
        grad *= self._valid[:, None, :]
        grad *= _F32(top_diffs[0].reshape(-1)[0]) / self._norm
        return [grad.reshape(bottoms[0].shape), None]


@register("EuclideanLoss")
class EuclideanLossLayer(LossLayer):
    """loss = sum((a - b)^2) / N / 2 for bottoms a, b of the same count per item (N = a.shape[0]).

    Backward: da = w / N * (a - b), db = -w / N * (a - b); both bottoms take gradients, and
    force_backward reaches both (Caffe's AllowForceBackward is true for each).
    """

    def reshape(self, bottom_shapes):
        out = super().reshape(bottom_shapes)
        a, b = bottom_shapes
        if math.prod(a[1:]) != math.prod(b[1:]):
            raise GraphError(f"layer '{self.name}' (EuclideanLoss): inputs of shapes {list(a)} and {list(b)} "
                             "must have the same dimension")
        return out

    def allow_force_backward(self, bottom_index: int) -> bool:
        return True

    def forward(self, bottoms):
        a = bottoms[0]
        self._diff = np.subtract(a, bottoms[1].reshape(a.shape))
        dot = np.einsum("i,i->", self._diff.reshape(-1), self._diff.reshape(-1), dtype=np.float64)
        return [np.array(_F32(dot) / _F32(a.shape[0]) / _F32(2), _F32)]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        w = _F32(top_diffs[0].reshape(-1)[0])
        grads = []
        for i, sign in enumerate((_F32(1), _F32(-1))):
            alpha = sign * w / _F32(bottoms[i].shape[0])
            grads.append(self._diff * alpha if propagate_down[i] else None)
        return grads


@register("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLossLayer(LossLayer):
    """loss = -sum(x * (t - [x >= 0]) - log(1 + exp(x - 2 * x * [x >= 0]))) / N, the stable form of
    the cross-entropy of sigmoid(x) against targets t in [0, 1]; N = x.shape[0].

    This fork's layer predates Caffe's normalization and ignore_label for it: ``loss_param`` is
    not read, the loss is always divided by N. Backward: dx = w / N * (sigmoid(x) - t).
    """

    def reshape(self, bottom_shapes):
        out = super().reshape(bottom_shapes)
        if math.prod(bottom_shapes[0]) != math.prod(bottom_shapes[1]):
            raise GraphError(f"layer '{self.name}' (SigmoidCrossEntropyLoss): inputs of shapes "
                             f"{list(bottom_shapes[0])} and {list(bottom_shapes[1])} must have the same count")
        return out

    def forward(self, bottoms):
        x = bottoms[0].astype(np.float64).reshape(-1)
        t = bottoms[1].astype(np.float64).reshape(-1)
        pos = (x >= 0).astype(np.float64)
        loss = -(x * (t - pos) - np.log1p(np.exp(x - 2 * x * pos))).sum()
        self._sigmoid = Sigmoid(bottoms[0])
        return [np.array(_F32(loss) / _F32(bottoms[0].shape[0]), _F32)]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        self._no_label_diff(propagate_down)
        if not propagate_down[0]:
            return [None, None]
        grad = self._sigmoid - bottoms[1].reshape(self._sigmoid.shape)
        grad *= _F32(top_diffs[0].reshape(-1)[0]) / _F32(bottoms[0].shape[0])
        return [grad, None]


@register("HingeLoss")
class HingeLossLayer(LossLayer):
    """One-vs-all hinge loss of scores x (N, D) (D = count / N) and labels l (N):

        m[i, j] = max(0, 1 + s[i, j] * x[i, j]),  s = -1 at j = l[i], +1 elsewhere
        loss = sum(m) / N (norm L1, default) or sum(m^2) / N (L2)

    Backward: dx = w / N * sign(m) * s (L1) or 2 w / N * m * s (L2). Caffe keeps m in bottom 0's
    diff between its forward and backward; when its backward does not run, that diff keeps m,
    which this executor (whose layers do not write diffs in forward) does not reproduce.
    """

    def forward(self, bottoms):
        x = bottoms[0]
        n = x.shape[0]
        labels = _labels(bottoms[1], self).reshape(-1)[:n]
        margins = x.reshape(n, -1).copy()
        self._check_labels(labels, margins.shape[1])
        rows = np.arange(n)
        margins[rows, labels] *= _F32(-1)
        margins += _F32(1)
        np.maximum(margins, _F32(0), out=margins)
        self._margins, self._labels = margins, labels
        flat = margins.reshape(-1).astype(np.float64)
        total = np.abs(flat).sum() if self._l1 else flat @ flat
        return [np.array(_F32(total) / _F32(n), _F32)]

    @property
    def _l1(self) -> bool:
        norm = self.lp.hinge_loss_param.norm
        if norm not in (1, 2):
            raise GraphError(f"layer '{self.name}' (HingeLoss): unknown norm {norm}")
        return norm == 1

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        self._no_label_diff(propagate_down)
        if not propagate_down[0]:
            return [None, None]
        n = self._margins.shape[0]
        grad = self._margins.copy()
        grad[np.arange(n), self._labels] *= _F32(-1)
        w = _F32(top_diffs[0].reshape(-1)[0])
        if self._l1:
            grad = np.sign(grad) * (w / _F32(n))
        else:
            grad *= w * _F32(2) / _F32(n)
        return [grad.reshape(bottoms[0].shape), None]


@register("MultinomialLogisticLoss")
class MultinomialLogisticLossLayer(LossLayer):
    """loss = -sum_i log(max(p[i, l_i], 1e-20)) / N for probabilities p (N, D) and labels l (N).

    Backward: dx[i, l_i] = -w / N / max(p[i, l_i], 1e-20), zero elsewhere.
    """

    def reshape(self, bottom_shapes):
        out = super().reshape(bottom_shapes)
        label = bottom_shapes[1]
        if any(_legacy(label, i) != 1 for i in (1, 2, 3)):
            raise GraphError(f"layer '{self.name}' ({self.type}): the label must be (N, 1, 1, 1), got {list(label)}")
        return out

    def _picked(self, bottoms):
        n = bottoms[0].shape[0]
        p = bottoms[0].reshape(n, -1)
        labels = _labels(bottoms[1], self).reshape(-1)
        self._check_labels(labels, p.shape[1])
        return p, labels, np.maximum(p[np.arange(n), labels], LOG_THRESHOLD)

    def forward(self, bottoms):
        _, _, prob = self._picked(bottoms)
        loss = -np.log(prob.astype(np.float64)).sum()
        return [np.array(_F32(loss) / _F32(bottoms[0].shape[0]), _F32)]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        self._no_label_diff(propagate_down)
        if not propagate_down[0]:
            return [None, None]
        p, labels, prob = self._picked(bottoms)
        grad = np.zeros(p.shape, _F32)
        scale = -_F32(top_diffs[0].reshape(-1)[0]) / _F32(p.shape[0])
        grad[np.arange(p.shape[0]), labels] = scale / prob
        return [grad.reshape(bottoms[0].shape), None]


@register("InfogainLoss")
class InfogainLossLayer(MultinomialLogisticLossLayer):
    """loss = -sum_i sum_j H[l_i, j] * log(max(p[i, j], 1e-20)) / N, H (D, D) from bottom 2 or
    from the BlobProto file ``infogain_loss_param.source``.

    Backward: dx[i, j] = -w / N * H[l_i, j] / max(p[i, j], 1e-20). Bottom 2 takes no gradient
    (Caffe aborts when asked for one, as force_backward does).
    """

    num_bottoms = (2, 3)

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        self._infogain = None
        if len(lp.bottom) < 3:
            from amct_caffe.io.blobs import blob_to_array  # noqa: PLC0415 - only for this variant
            from amct_caffe.io.schema import caffe_pb  # noqa: PLC0415
            source = lp.infogain_loss_param.source
            if not source:
                raise GraphError(f"layer '{self.name}' (InfogainLoss): infogain_loss_param.source must be given "
                                 "when there is no third bottom")
            from amct_caffe.io.files import read_bytes  # noqa: PLC0415
            where = f"layer '{self.name}' (InfogainLoss): infogain_loss_param.source {source}"
            blob = caffe_pb().BlobProto()
            data = read_bytes(source, f"layer '{self.name}' (InfogainLoss) infogain matrix", GraphError)
            try:
                blob.ParseFromString(data)
                self._infogain = blob_to_array(blob, where).astype(_F32)
            except AmctError as e:
                raise GraphError(str(e)) from None
            except Exception as e:  # protobuf's DecodeError, or any failure to parse a damaged file
                raise GraphError(f"{where} is not a binaryproto BlobProto ({e})") from None

    def _matrix(self, bottoms):
        h = bottoms[2] if len(bottoms) > 2 else self._infogain
        dim = bottoms[0].size // bottoms[0].shape[0]
        if h.size != dim * dim:
            raise GraphError(f"layer '{self.name}' (InfogainLoss): the infogain matrix has shape {list(h.shape)}, "
                             f"it must be (1, 1, {dim}, {dim})")
        return h.reshape(dim, dim)

    def forward(self, bottoms):
        n = bottoms[0].shape[0]
        p = np.maximum(bottoms[0].reshape(n, -1), LOG_THRESHOLD)
        labels = _labels(bottoms[1], self).reshape(-1)
        self._check_labels(labels, p.shape[1])
        h = self._matrix(bottoms)[labels]
        loss = -(h.astype(np.float64) * np.log(p.astype(np.float64))).sum()
        return [np.array(_F32(loss) / _F32(n), _F32)]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        self._no_label_diff(propagate_down)
        if not propagate_down[0]:
            return [None] * len(bottoms)
        n = bottoms[0].shape[0]
        p = np.maximum(bottoms[0].reshape(n, -1), LOG_THRESHOLD)
        scale = -_F32(top_diffs[0].reshape(-1)[0]) / _F32(n)
        grad = scale * self._matrix(bottoms)[_labels(bottoms[1], self).reshape(-1)] / p
        return [grad.reshape(bottoms[0].shape)] + [None] * (len(bottoms) - 1)


@register("ContrastiveLoss")
class ContrastiveLossLayer(LossLayer):
    """Siamese loss of feature pairs a, b (N, C) and similarity s (N) (bottoms 0, 1, 2):

        d_i^2 = |a_i - b_i|^2
        loss = sum_i [s_i] d_i^2 + [not s_i] max(margin - d_i, 0)^2 / (2 N)
               (legacy_version: max(margin - d_i^2, 0) instead of the square)

    Backward (bottoms 0 and 1, signs + and -): w / N * (a - b) for a similar pair; for a
    dissimilar pair with a positive margin term -w / N * (a - b) (legacy) or
    -w / N * mdist / (d + 1e-4) * (a - b), mdist = margin - d; else 0.
    """

    num_bottoms = 3

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 2

    def forward(self, bottoms):
        a, b = bottoms[0], bottoms[1]
        n = a.shape[0]
        self._diff = np.subtract(a, b).reshape(n, -1)
        self._dist_sq = np.einsum("nc,nc->n", self._diff, self._diff, dtype=np.float64).astype(_F32)
        self._similar = _labels(bottoms[2], self).reshape(-1) != 0
        p = self.lp.contrastive_loss_param
        margin = _F32(p.margin)
        if p.legacy_version:
            dissimilar = np.maximum(margin - self._dist_sq, _F32(0))
        else:
            dissimilar = np.square(np.maximum(margin - np.sqrt(self._dist_sq), _F32(0)))
        loss = np.where(self._similar, self._dist_sq, dissimilar).sum(dtype=np.float64)
        return [np.array(_F32(loss) / _F32(n) / _F32(2), _F32)]

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        if propagate_down[2]:
            raise GraphError(f"layer '{self.name}' (ContrastiveLoss) cannot backpropagate to its similarity input")
        p = self.lp.contrastive_loss_param
        margin = _F32(p.margin)
        n = self._diff.shape[0]
        grads: list = [None, None, None]
        for i, sign in enumerate((_F32(1), _F32(-1))):
            if not propagate_down[i]:
                continue
            alpha = sign * _F32(top_diffs[0].reshape(-1)[0]) / _F32(n)
            if p.legacy_version:
                mdist = margin - self._dist_sq
                beta = np.full(n, -alpha, _F32)
            else:
                dist = np.sqrt(self._dist_sq)
                mdist = margin - dist
                beta = -alpha * mdist / (dist + _F32(1e-4))
            coeff = np.where(self._similar, alpha, np.where(mdist > 0, beta, _F32(0))).astype(_F32)
            grads[i] = (self._diff * coeff[:, None]).reshape(bottoms[i].shape)
        return grads


@register("Accuracy")
class AccuracyLayer(Layer):
    """Top-k accuracy of scores x (outer, C, inner) (C along ``accuracy_param.axis``) against labels.

    A position counts as correct when its label is among the ``top_k`` classes ranked by
    (score, class index) in decreasing order (Caffe's partial_sort on pairs: of equal scores the
    larger index ranks first). top 0 = correct / counted positions (NaN when every label is
    ignore_label, as Caffe's 0/0); optional top 1 (C,): per-class correct / occurrences (0 for a
    class that never occurs). Not a loss, and without a backward (Caffe: NOT_IMPLEMENTED).
    """

    num_bottoms = 2
    num_tops = (1, 2)

    def reshape(self, bottom_shapes):
        shape, label = tuple(bottom_shapes[0]), tuple(bottom_shapes[1])
        p = self.lp.accuracy_param
        if p.top_k > math.prod(shape) // max(math.prod(label), 1):
            raise GraphError(f"layer '{self.name}' (Accuracy): top_k {p.top_k} exceeds the number of classes")
        self.axis = canonical_axis(p.axis, len(shape), self.name)
        self.outer, self.inner = math.prod(shape[:self.axis]), math.prod(shape[self.axis + 1:])
        if self.outer * self.inner != math.prod(label):
            raise GraphError(f"layer '{self.name}' (Accuracy): {math.prod(label)} labels for "
                             f"{self.outer * self.inner} predictions (shape {list(shape)}, axis {self.axis})")
        return [()] + ([(shape[self.axis],)] if len(self.lp.top) > 1 else [])

    def forward(self, bottoms):
        p = self.lp.accuracy_param
        x = bottoms[0].reshape(self.outer, -1, self.inner)
        c = x.shape[1]
        labels = _labels(bottoms[1], self).reshape(self.outer, self.inner)
        valid = labels != p.ignore_label if p.HasField("ignore_label") else np.ones(labels.shape, bool)
        if ((labels < 0) | (labels >= c))[valid].any():
            raise GraphError(f"layer '{self.name}' (Accuracy): a label is outside 0..{c - 1}")
        idx = np.where(valid, labels, 0)
        mine = np.take_along_axis(x, idx[:, None, :], axis=1)  # (outer, 1, inner)
        classes = np.arange(c).reshape(1, c, 1)
        above = (x > mine) | ((x == mine) & (classes > idx[:, None, :]))
        correct = (above.sum(axis=1) < p.top_k) & valid
        count = int(valid.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            accuracy = _F32(correct.sum()) / _F32(count)
        tops = [np.array(accuracy, _F32)]
        if len(self.lp.top) > 1:
            seen = np.bincount(labels[valid], minlength=c).astype(_F32)
            hits = np.bincount(labels[correct], minlength=c).astype(_F32)
            with np.errstate(invalid="ignore", divide="ignore"):
                tops.append(np.where(seen == 0, _F32(0), hits / seen).astype(_F32))
        return tops

    # No backward: Caffe's Accuracy is NOT_IMPLEMENTED there, so a net that asks for a gradient
    # through it (force_backward) is refused by the Net, naming the layer.
