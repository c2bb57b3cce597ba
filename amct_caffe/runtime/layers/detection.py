"""Detection layers: SSD's PriorBox and DetectionOutput (the ROI pooling family is in ``roi``).

Ops are pure functions named after their Caffe type (keyword defaults = caffe.proto's; ``None``
for an optional field left unset); the layer classes read the params. PriorBox and
DetectionOutput match the SSD fork that made our goldens (``prior_box_layer.cpp``,
``detection_output_layer.cpp``, ``util/bbox_util.cpp``) bit for bit, float/double mix and
orderings included. Boxes are ``[xmin, ymin, xmax, ymax]``, normalized to the image.
"""

from __future__ import annotations

import numpy as np

from amct_caffe.errors import GraphError
from amct_caffe.runtime.layer import Layer
from amct_caffe.ops import register

try:  # csrc/src/nms.cpp; libstdc++'s std::sort (csrc/python/elementwise_bindings.cpp)
    from amct_caffe._kernels import nms_fast as NMS_KERNEL
    from amct_caffe._kernels import sort_desc as SORT_KERNEL
except ImportError:
    NMS_KERNEL = SORT_KERNEL = None

f32, f64 = np.float32, np.float64


def _repeated(fd) -> bool:
    # protobuf >= 6 drops FieldDescriptor.label in favour of is_repeated
    return fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED


def _hw(shape) -> tuple[int, int]:
    """Caffe's height()/width(): LegacyShape(2), (3), which are 1 past the last axis."""
    return tuple(int(shape[i]) if i < len(shape) else 1 for i in (2, 3))


def prior_sizes(min_size=(), max_size=(), aspect_ratio=(), flip=True) -> np.ndarray:
    """(num_priors, 2) float32 (width, height) of the priors of one cell, in PriorBox's order.

    Per min_size s: [s, sqrt(s*max_s), then s*sqrt(ar) x s/sqrt(ar) for each distinct aspect
    ratio != 1 (and 1/ar after it when flipping)]. The fork stores min/max sizes in ints
    (truncating them), takes sqrt(ar) in float and sqrt(min*max) in double.
    """
    if not min_size or min(min_size) <= 0:
        raise ValueError("prior_box_param needs positive min_size values")
    if not all(np.isfinite(v) and v < 2.0 ** 31 for v in (*min_size, *max_size)):
        # (the fork stores them in ints: C's conversion of inf or of 2^31 and more has no defined value)
        raise ValueError(f"min_size {list(min_size)} and max_size {list(max_size)} must be finite and below 2^31")
    if max_size and (len(max_size) != len(min_size)
                     or any(M <= m for m, M in zip(min_size, max_size, strict=True))):
        raise ValueError("give one max_size > min_size per min_size")
    ars = [f32(1)]
    for ar in map(f32, aspect_ratio):
        if all(abs(float(ar) - float(a)) >= 1e-6 for a in ars):
            ars += [ar, f32(1.0 / f64(ar))] if flip else [ar]
    sizes = []
    for k, mn in enumerate(min_size):
        m = int(f32(mn))
        sizes.append((m, m))
        if max_size:
            sizes.append((f32(np.sqrt(f64(m * int(f32(max_size[k]))))),) * 2)
        sizes += [(f32(m) * np.sqrt(ar), f32(m) / np.sqrt(ar)) for ar in ars if abs(float(ar) - 1) >= 1e-6]
    return np.array(sizes, f32)


def check_image_and_step(*, img_size=None, img_h=None, img_w=None, step=None, step_h=None, step_w=None, **_) -> None:
    """PriorBox's LayerSetUp checks (prior_box_layer.cpp): img_size or img_h / img_w, not both; img_h with
    img_w, step_h with step_w, each given value > 0. ValueError naming the fields otherwise."""
    for one, pair in (("img_size", (("img_h", img_h), ("img_w", img_w))),
                      ("step", (("step_h", step_h), ("step_w", step_w)))):
        single = img_size if one == "img_size" else step
        if any(v is not None for _, v in pair):
            if single is not None:
                raise ValueError(f"give {one} or {pair[0][0]}/{pair[1][0]}, not both")
            for name, v in pair:
                if v is None or not v > 0:
                    raise ValueError(f"{pair[0][0]} and {pair[1][0]} go together and must be > 0, got {name} "
                                     f"{'unset' if v is None else v}")
        elif single is not None and not single > 0:
            raise ValueError(f"{one} must be > 0, got {single}")


def PriorBox(feature, image, *, min_size=(), max_size=(), aspect_ratio=(), flip=True, clip=True,  # noqa: N802
             variance=(), img_size=None, img_h=None, img_w=None, step=None, step_h=None, step_w=None,
             offset=0.5):
    """SSD default boxes for every cell of ``feature`` (N, C, H, W) over ``image``.

    Returns ``(1, 2, H*W*P*4)``: channel 0 the boxes ordered (h, w, prior), channel 1 their
    variances (one value for all, or 4 per box; default 0.1). For cell (h, w) with prior
    (bw, bh): ``cx = (w + offset) * step_w`` (float), box = ``((cx - bw/2) / img_w,
    (cy - bh/2) / img_h, (cx + bw/2) / img_w, (cy + bh/2) / img_h)`` in double, stored as float,
    clipped to [0, 1] if ``clip``. The image size is img_h/img_w (or img_size), else the
    image blob's; the step is step_h/step_w (or step), else image size / feature size.
    """
    sizes = prior_sizes(min_size, max_size, aspect_ratio, flip)
    if len(variance) not in (0, 1, 4) or any(v <= 0 for v in variance):
        raise ValueError("give 1 or 4 positive variances")
    check_image_and_step(img_size=img_size, img_h=img_h, img_w=img_w, step=step, step_h=step_h, step_w=step_w)
    lh, lw = _hw(np.shape(feature))
    if img_h is not None or img_w is not None:
        ih, iw = img_h, img_w
    else:
        ih, iw = (img_size,) * 2 if img_size is not None else _hw(np.shape(image))
    if step_h is not None or step_w is not None:
        sh, sw = step_h, step_w
    else:
        sh, sw = (step,) * 2 if step is not None else (f32(ih) / f32(lh), f32(iw) / f32(lw))
    cx = ((np.arange(lw, dtype=f32) + f32(offset)) * f32(sw)).astype(f64)[None, :, None]
    cy = ((np.arange(lh, dtype=f32) + f32(offset)) * f32(sh)).astype(f64)[:, None, None]
    hw, hh = sizes[:, 0].astype(f64) / 2, sizes[:, 1].astype(f64) / 2
    boxes = np.stack(np.broadcast_arrays((cx - hw) / iw, (cy - hh) / ih, (cx + hw) / iw, (cy + hh) / ih),
                     axis=-1).astype(f32).reshape(-1)
    if clip:
        boxes = np.clip(boxes, f32(0), f32(1))
    var = np.resize(np.array(variance or (0.1,), f32), boxes.size)
    return np.stack([boxes, var])[None]


def _bbox_size(b: np.ndarray) -> np.ndarray:
    """bbox_util's BBoxSize (normalized): w*h in float32, 0 for an inverted box."""
    w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    return np.where((w < 0) | (h < 0), f32(0), w * h)


def _jaccard(box: np.ndarray, size, others: np.ndarray, other_sizes: np.ndarray) -> np.ndarray:
    """bbox_util's JaccardOverlap(box, others[i]) in float32 (0 when boxes do not overlap)."""
    apart = ((others[:, 0] > box[2]) | (others[:, 2] < box[0])
             | (others[:, 1] > box[3]) | (others[:, 3] < box[1]))
    iw = np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0])
    ih = np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1])
    ok = ~apart & (iw > 0) & (ih > 0)
    inter = iw * ih
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / (size + other_sizes - inter)
    return np.where(ok, iou, f32(0))


def decode_boxes(loc: np.ndarray, priors: np.ndarray, variances: np.ndarray, code_type: str,
                 variance_encoded_in_target: bool = False) -> np.ndarray:
    """bbox_util's DecodeBBox for arrays ``(..., 4)`` of offsets, float32 like the fork.

    CENTER_SIZE: ``c = v01 * t01 * prior_wh + prior_c``, ``wh = exp(v23 * t23) * prior_wh``;
    CORNER: ``prior + v * t``; CORNER_SIZE: ``prior + v * t * prior_wh``. With
    ``variance_encoded_in_target`` the variances are taken as 1.
    """
    v = np.ones_like(variances) if variance_encoded_in_target else variances
    if code_type == "CORNER":
        return priors + (loc if variance_encoded_in_target else v * loc)
    pw = priors[..., 2] - priors[..., 0]
    ph = priors[..., 3] - priors[..., 1]
    if np.any(pw <= 0) or np.any(ph <= 0):
        raise ValueError(f"code_type {code_type} needs prior boxes of positive size")
    if code_type == "CORNER_SIZE":
        scale = np.stack([pw, ph, pw, ph], axis=-1)
        t = loc if variance_encoded_in_target else v * loc
        return priors + t * scale
    # CENTER_SIZE
    pcx = (priors[..., 0] + priors[..., 2]) * f32(0.5)
    pcy = (priors[..., 1] + priors[..., 3]) * f32(0.5)
    t = loc if variance_encoded_in_target else v * loc
    cx = t[..., 0] * pw + pcx
    cy = t[..., 1] * ph + pcy
    with np.errstate(over="ignore"):  # expf of the fork, correctly rounded
        w = np.exp(t[..., 2].astype(f64)).astype(f32) * pw
        h = np.exp(t[..., 3].astype(f64)).astype(f32) * ph
    cx, cy, hw, hh = cx.astype(f64), cy.astype(f64), w.astype(f64) / 2, h.astype(f64) / 2
    return np.stack([cx - hw, cy - hh, cx + hw, cy + hh], axis=-1).astype(f32)


def nms_fast(boxes: np.ndarray, scores: np.ndarray, score_threshold: float, nms_threshold: float,
             eta: float = 1.0, top_k: int = -1) -> np.ndarray:
    """bbox_util's ApplyNMSFast: indices kept, in descending score order.

    Candidates are the scores > threshold, stable-sorted by descending score (ties keep index
    order), cut to ``top_k``; a candidate is kept when its overlap with every kept box is
    <= the adaptive threshold, which is multiplied by ``eta`` after each keep while > 0.5.
    Greedy NMS is sequential: the loop runs in C++ (csrc/src/nms.cpp; SSD300's 21 classes at top_k 400
    on random scores, 286 ms of NumPy overlaps per forward before), :func:`nms_reference` is its NumPy form.
    """
    cand = np.flatnonzero(scores > f32(score_threshold))
    cand = cand[np.argsort(-scores[cand], kind="stable")]
    if top_k > -1:
        cand = cand[:top_k]
    sizes = _bbox_size(boxes)
    if NMS_KERNEL is None:
        return nms_reference(boxes, sizes, cand, nms_threshold, eta)
    return NMS_KERNEL(np.ascontiguousarray(boxes, f32), np.ascontiguousarray(sizes, f32), cand.astype(np.int64),
                      float(f32(nms_threshold)), float(f32(eta)))


def nms_reference(boxes: np.ndarray, sizes: np.ndarray, cand: np.ndarray, nms_threshold: float,
                  eta: float = 1.0) -> np.ndarray:
    """The greedy loop of :func:`nms_fast` over ``cand`` (in order), its overlaps vectorized in NumPy."""
    kept: list[int] = []
    thr = f32(nms_threshold)
    for i in cand:
        if kept:
            ids = np.asarray(kept)
            if not np.all(_jaccard(boxes[i], sizes[i], boxes[ids], sizes[ids]) <= thr):
                continue
        kept.append(int(i))
        if eta < 1 and thr > 0.5:
            thr = f32(thr * f32(eta))
    return np.asarray(kept, dtype=np.int64)


def libstdcxx_sort_desc(keys) -> list[int]:
    """The permutation libstdc++'s ``std::sort`` leaves when sorting by ``keys[i] > keys[j]``.

    std::sort is not stable, so which of several equal scores DetectionOutput keeps at its
    keep_top_k cut depends on this exact algorithm (introsort: median-of-3 pivot,
    unguarded partition, heapsort past depth 2*log2(n), final insertion sort, threshold 16).
    """
    a = list(range(len(keys)))

    def gt(i, j):
        return keys[i] > keys[j]

    def linear_insert(last):
        val = a[last]
        while gt(val, a[last - 1]):
            a[last] = a[last - 1]
            last -= 1
        a[last] = val

    def insertion_sort(first, last):
        for i in range(first + 1, last):
            if gt(a[i], a[first]):
                val = a[i]
                a[first + 1:i + 1] = a[first:i]
                a[first] = val
            else:
                linear_insert(i)

    def adjust_heap(first, hole, length, value):
        top, child = hole, hole
        while child < (length - 1) // 2:
            child = 2 * (child + 1)
            if gt(a[first + child], a[first + child - 1]):
                child -= 1
            a[first + hole] = a[first + child]
            hole = child
        if length % 2 == 0 and child == (length - 2) // 2:
            child = 2 * (child + 1)
            a[first + hole] = a[first + child - 1]
            hole = child - 1
        parent = (hole - 1) // 2
        while hole > top and gt(a[first + parent], value):
            a[first + hole] = a[first + parent]
            hole, parent = parent, (parent - 1) // 2
        a[first + hole] = value

    def heap_sort(first, last):
        n = last - first
        for parent in range((n - 2) // 2, -1, -1):
            adjust_heap(first, parent, n, a[first + parent])
        while last - first > 1:
            last -= 1
            val, a[last] = a[last], a[first]
            adjust_heap(first, 0, last - first, val)

    def introsort(first, last, depth):
        while last - first > 16:
            if depth == 0:
                heap_sort(first, last)
                return
            depth -= 1
            x, y, z, r = first + 1, first + (last - first) // 2, last - 1, first
            if gt(a[x], a[y]):
                m = y if gt(a[y], a[z]) else (z if gt(a[x], a[z]) else x)
            else:
                m = x if gt(a[x], a[z]) else (z if gt(a[y], a[z]) else y)
            a[r], a[m] = a[m], a[r]
            lo, hi = first + 1, last
            while True:
                while gt(a[lo], a[first]):
                    lo += 1
                hi -= 1
                while gt(a[first], a[hi]):
                    hi -= 1
                if lo >= hi:
                    break
                a[lo], a[hi] = a[hi], a[lo]
                lo += 1
            introsort(lo, last, depth)
            last = lo

    n = len(a)
    if n > 1:
        introsort(0, n, 2 * (n.bit_length() - 1))
        if n > 16:
            insertion_sort(0, 16)
            for i in range(16, n):
                linear_insert(i)
        else:
            insertion_sort(0, n)
    return a


def DetectionOutput(loc, conf, prior, *, num_classes=None, share_location=True,  # noqa: N802
                    background_label_id=0, nms_param=None, code_type="CORNER",
                    variance_encoded_in_target=False, keep_top_k=-1, confidence_threshold=None):
    """SSD's decoder + per-class NMS.

    loc ``(N, P*L*4)`` (L = 1 if share_location else num_classes), conf ``(N, P*C)``, prior
    ``(1, 2, P*4)`` -> ``(1, 1, K, 7)`` rows ``[image, label, score, xmin, ymin, xmax, ymax]``.
    Per image and class c != background: decode (unclipped), then ``nms_fast`` with
    ``nms_param`` = {nms_threshold, top_k, eta}; without nms_param the fork keeps every prior,
    unthresholded. If more than keep_top_k (> -1) survive, the best keep_top_k are chosen by
    libstdc++'s unstable std::sort. Rows go per image, by ascending label, within a label in
    NMS (or sort) order. With no detection at all: ``(1, 1, N, 7)`` of -1 with column 0 = image.
    """
    n, P = _check_detection_shapes(np.shape(loc), np.shape(conf), np.shape(prior), num_classes,
                                   share_location)
    L = 1 if share_location else num_classes
    if nms_param is not None:  # NonMaximumSuppressionParameter's defaults
        nms = {"nms_threshold": 0.3, "eta": 1.0, **{k: v for k, v in nms_param.items() if v is not None}}
        if nms["nms_threshold"] < 0 or not 0 < nms["eta"] <= 1:
            raise ValueError("need nms_threshold >= 0 and 0 < eta <= 1")
    conf = np.asarray(conf, f32).reshape(n, P, num_classes)
    prior = np.asarray(prior, f32).reshape(2, P, 1, 4)
    boxes = decode_boxes(np.asarray(loc, f32).reshape(n, P, L, 4), prior[0], prior[1], code_type,
                         variance_encoded_in_target)
    thresh = -np.finfo(f32).max if confidence_threshold is None else confidence_threshold
    rows = []
    for i in range(n):
        picked = {}  # label -> prior indices, in output order
        for c in range(num_classes):
            if c == background_label_id:
                continue
            if nms_param is None:
                picked[c] = np.arange(P)
            else:
                picked[c] = nms_fast(boxes[i, :, 0 if share_location else c], conf[i, :, c], thresh,
                                     nms["nms_threshold"], nms["eta"], nms.get("top_k", -1))
        if -1 < keep_top_k < sum(len(v) for v in picked.values()):
            picked = _keep_top_k(picked, conf[i], keep_top_k)
        for c, idx in picked.items():
            b = boxes[i, idx, 0 if share_location else c]
            rows.append(np.column_stack([np.full(len(idx), i), np.full(len(idx), c), conf[i, idx, c], b]))
    out = np.concatenate(rows) if rows else np.zeros((0, 7))
    if len(out) == 0:
        out = np.full((n, 7), -1.0)
        out[:, 0] = np.arange(n)
    return out.astype(f32)[None, None]


def _check_detection_shapes(loc, conf, prior, num_classes, share_location) -> tuple[int, int]:
    """(batch, num_priors) after DetectionOutput's Reshape checks; priors = prior height / 4."""
    if num_classes is None:
        raise ValueError("num_classes is required")
    n, P = loc[0], _hw(prior)[0] // 4
    L = 1 if share_location else num_classes
    if conf[0] != n or P * L * 4 != int(np.prod(loc[1:])) or P * num_classes != int(np.prod(conf[1:])):
        raise ValueError(f"{P} priors do not match loc {list(loc)} / conf {list(conf)} "
                         f"for {num_classes} classes")
    return n, P


def _keep_top_k(picked: dict, conf: np.ndarray, k: int) -> dict:
    """The best k (label, index) pairs, regrouped by label (std::sort; see libstdcxx_sort_desc)."""
    labels = np.concatenate([np.full(len(v), c) for c, v in picked.items()])
    idx = np.concatenate(list(picked.values()))
    scores = conf[idx, labels]
    if np.unique(scores).size == scores.size:  # no ties: every sort gives std::sort's order
        order = np.argsort(-scores, kind="stable")[:k]
    elif SORT_KERNEL is not None and not np.isnan(scores).any():  # std::sort itself (NaN breaks its ordering)
        order = SORT_KERNEL(np.ascontiguousarray(scores, f32))[:k]
    else:
        order = np.asarray(libstdcxx_sort_desc(scores.tolist())[:k], dtype=np.int64)
    return {c: idx[order[labels[order] == c]] for c in sorted(set(labels[order].tolist()))}


# ------------------------------------------------------------------------ layers
def param_kwargs(msg) -> dict:
    """A param message as keyword arguments: unset optional fields without a default -> None,
    repeated fields -> tuples, enums -> names, sub-messages -> dicts (None when absent)."""
    out = {}
    for fd in msg.DESCRIPTOR.fields:
        v = getattr(msg, fd.name)
        if _repeated(fd):
            out[fd.name] = tuple(v)
        elif not msg.HasField(fd.name) and (fd.message_type is not None or not fd.has_default_value):
            out[fd.name] = None
        elif fd.message_type is not None:
            out[fd.name] = param_kwargs(v)
        else:
            out[fd.name] = fd.enum_type.values_by_number[v].name if fd.enum_type is not None else v
    return out


class OpLayer(Layer):
    """Layer over one op of this module; ``param`` names its LayerParameter field."""

    param = ""
    keys: tuple[str, ...] = ()

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        if self.param not in lp.DESCRIPTOR.fields_by_name:
            raise GraphError(f"layer '{self.name}' ({self.type}): the caffe.proto in use has no {self.param}")
        kw = param_kwargs(getattr(lp, self.param))
        self._kw = {k: kw[k] for k in self.keys if k in kw}  # fields a user's proto lacks keep their defaults

    def _call(self, bottoms):
        try:
            return type(self).op(*bottoms, **self._kw)
        except ValueError as e:
            raise GraphError(f"layer '{self.name}' ({self.type}): {e}") from None

    def forward(self, bottoms):
        return [self._call(bottoms)]


@register("PriorBox")
class PriorBoxLayer(OpLayer):
    num_bottoms = 2
    reads_shapes_only = True
    op = staticmethod(PriorBox)
    param = "prior_box_param"
    keys = ("min_size", "max_size", "aspect_ratio", "flip", "clip", "variance", "img_size", "img_h", "img_w",
            "step", "step_h", "step_w", "offset")

    def __init__(self, lp, phase: int = 1):
        super().__init__(lp, phase)
        self._boxes, self._boxes_of = None, None

    def forward(self, bottoms):
        # The boxes depend on the bottoms' shapes only (reads_shapes_only): computed once per pair of shapes, a
        # copy handed out each forward (a script may write into the top's array)
        key = (np.shape(bottoms[0]), np.shape(bottoms[1]))
        if self._boxes_of != key:
            self._boxes = self._call(bottoms)
            self._boxes_of = key
        return [self._boxes.copy()]

    def reshape(self, bottom_shapes):
        h, w = _hw(bottom_shapes[0])
        try:  # prior_box_layer.cpp's LayerSetUp checks, before any forward
            check_image_and_step(**self._kw)
        except ValueError as e:
            raise GraphError(f"layer '{self.name}' (PriorBox): {e}") from None
        return [(1, 2, h * w * self._num_priors() * 4)]

    def _num_priors(self) -> int:
        try:
            return len(prior_sizes(*(self._kw[k] for k in ("min_size", "max_size", "aspect_ratio", "flip"))))
        except ValueError as e:
            raise GraphError(f"layer '{self.name}' (PriorBox): {e}") from None

    def backward(self, top_diffs, propagate_down, bottoms, tops):
        """The priors depend on shapes only: Caffe's Backward_cpu writes no diff at all."""
        return [None] * len(bottoms)


@register("DetectionOutput")
class DetectionOutputLayer(OpLayer):
    """Caffe reports ``(1, 1, 1, 7)`` at reshape; forward returns the real ``(1, 1, K, 7)``."""

    num_bottoms = 3
    shape_from_forward = True
    op = staticmethod(DetectionOutput)
    param = "detection_output_param"
    keys = ("num_classes", "share_location", "background_label_id", "nms_param", "code_type",
            "variance_encoded_in_target", "keep_top_k", "confidence_threshold")

    def reshape(self, bottom_shapes):
        try:
            _check_detection_shapes(*bottom_shapes, self._kw.get("num_classes"), self._kw["share_location"])
        except ValueError as e:
            raise GraphError(f"layer '{self.name}' (DetectionOutput): {e}") from None
        return [(1, 1, 1, 7)]

    def forward(self, bottoms):
        if self._kw["share_location"] and self._kw["background_label_id"] == -1:
            # bbox_util.cpp's DecodeBBoxesAll skips label -1 (the shared locations) as background,
            # then Forward_cpu (not the setup: a later layer Caffe refuses at setup is refused
            # first) aborts: "Could not find location predictions for label -1".
            raise GraphError(f"layer '{self.name}' (DetectionOutput): share_location with "
                             "background_label_id -1 is refused by Caffe (the shared location predictions "
                             "have label -1 and are skipped as background)")
        return super().forward(bottoms)
