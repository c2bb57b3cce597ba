"""Post-training quantization quality: FP32 versus INT8 on real models and real data (issue 4, "Quality").

    python benchmarks/ptq_quality.py [--limit N] [--cases lenet,open_nsfw,...] [--out DIR]
                                     [--skip-types Softmax,Reshape,...] [--skip-layers 188,...]
                                     [--no-offset] [--batch-mult K]
                                     [--no-deploy] [--diagnose]

For every case the model is calibrated with ``amct_caffe.api.workflow.calibrate`` (the guide's
defaults: create_quant_config -> init -> weights / activation quantization -> ``batch_num``
forwards of the calibration model in the embedded executor -> save_model('Both')), then the FP32
model, the fake-quant model and the deploy model (run by the executor in integer arithmetic:
int8 x int8 -> int32 + int32 bias, x deq_scale) see the same evaluation samples. The metric is
computed FP32 vs fake-quant (what the targets apply to) and FP32 vs deploy.

Models come from ``../shared/models`` and data from ``../shared/data`` (beside the repository;
``AMCT_SHARED`` overrides the location).

Cases, calibration / evaluation split and targets:

* ``lenet`` — LeNet on ``mnist_5k.npz`` (sorted by class, 500 per class), pixel x 1/256.
  Calibration: the 64 digits of index ``78 * i`` (i < 64, 6-7 per class), 2 batches of 32.
  Evaluation: the first 400 digits of each class that are not calibration digits (4,000).
  Target: INT8 top-1 >= FP32 top-1 - 0.05 points.
* ``open_nsfw`` — on ``imagenet_samples`` (1,000 photos sorted by file name), BGR, mean
  (104, 117, 123), resize 256x256, centre crop 224. Calibration: the 32 photos whose index is a
  multiple of 30 (a subset of the data README's "multiples of 10" calibration split), 4 batches
  of 8. Evaluation: the other 968 (``--limit N``: N of them, evenly spaced). Targets: mean
  per-image cosine(FP32 prob, INT8 prob) >= 0.9995; mean |p_nsfw(INT8) - p_nsfw(FP32)| <= 0.005.
* ``ultraface`` (slim-320, RGB, (x-127)/128, 240x320), ``det1`` (MTCNN PNet at 12x12),
  ``det1_96x128`` (PNet at the golden det1_large size), ``det2`` (RNet 24x24), ``det3`` (ONet
  48x48); MTCNN: RGB, (x-127.5)/128. Data: the 11 photos of ``misc/``, sorted by name; photos
  0, 3, 6, 9 (cat, mtcnn_test2, voc_000456, voc_001763) are for calibration only, the other 7
  (with the other face photo, mtcnn_test1) for evaluation only, so the two sets share no photo.
  More samples are made deterministically from each photo:

  - scene views (ultraface, det1_96x128), 12 per photo: the whole photo squeezed to the input
    size; the largest centred 4:3 window; four 4:3 windows of 70 % of that size at the corners
    of the photo; and the horizontal mirror of each. 48 calibration / 84 evaluation samples;
    calibration in batches of 1 (ultraface: its Reshape layers fix the batch axis to 1 and its
    Concat joins along axis 1, so only batch 1 keeps samples apart) or 8 (det1_96x128).
  - patches (det1, det2, det3), 27 per photo: square windows of side 12 %, 25 % and 50 % of the
    photo's shorter side, each on a 3x3 grid spread evenly over the photo, resized to the
    input size. 108 calibration (4 batches of 27) / 189 evaluation samples.

  Metric: mean over samples of the cosine between the FP32 and INT8 outputs, with all output
  blobs flattened and concatenated per sample (the target's metric, >= 0.9995), and also per
  output blob. ``det1`` additionally evaluates its 12x12-calibrated model on the 96x128 views
  (PNet runs fully convolutionally on an image pyramid).

Resizing uses Pillow bilinear (amct_caffe.data.Preprocess). Options to investigate a failure:
``--skip-types`` / ``--skip-layers`` write a simple .cfg (``skip_layer_types`` / ``skip_layers``;
names a model does not have are ignored for it) so those layers stay float;
``--no-offset`` calibrates symmetric activations; ``--batch-mult K`` feeds K times as many
calibration batches, never touching evaluation data (LeNet: more digits from the 936 used for
neither set; open_nsfw: other crops / mirrors of the same 32 photos; misc/ cases: the windows of
the calibration photos shrunk by 6 % per step, every other step mirrored vertically);
``--diagnose`` prints, per case and quantized layer, on the first evaluation batch, the cosine
FP32 vs fake-quant of its output end to end, with the layer alone quantized (FP32 input), and
of the worst network output when only that layer were quantized (see :func:`diagnose`);
``--target-cosine C [--max-float-layers N] [--fallback-metric M]`` calibrates with the accuracy-based fallback
(:mod:`amct_caffe.api.fallback`), searching on the calibration samples only.

Prints progress (tqdm, stderr), a final table (case, metric, FP32, INT8 fake-quant, INT8 deploy,
target, PASS/FAIL on fake-quant) and timings. Always exits 0: it is a benchmark.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AMCT_SHARED", ROOT.parent / "shared"))
MODELS, DATA = SHARED / "models", SHARED / "data"
if str(ROOT) not in sys.path:  # run from the checkout (python benchmarks/ptq_quality.py): use its amct_caffe
    sys.path.insert(0, str(ROOT))

CALIB_PHOTOS = (0, 3, 6, 9)  # indices in sorted misc/: calibration only; the rest: evaluation only
COS_TARGET = 0.9995


# ---------------------------------------------------------------------------------------- data
def _misc_photos() -> list[Path]:
    from amct_caffe.data import ImageFolder
    return ImageFolder(DATA / "misc", ["x"]).files()


def _rgb(path: Path) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _scene_boxes(w: int, h: int) -> list[tuple[int, int, int, int]]:
    """Whole photo, the largest centred 4:3 window, and 4 corner 4:3 windows at 70 %."""
    cw, ch = (w, round(w * 3 / 4)) if w * 3 <= h * 4 else (round(h * 4 / 3), h)
    boxes = [(0, 0, w, h), ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)]
    sw, sh = round(cw * 0.7), round(ch * 0.7)
    for x0, y0 in ((0, 0), (w - sw, 0), (0, h - sh), (w - sw, h - sh)):
        boxes.append((x0, y0, x0 + sw, y0 + sh))
    return boxes


def _patch_boxes(w: int, h: int) -> list[tuple[int, int, int, int]]:
    """Square windows of 12 / 25 / 50 % of the shorter side, each on a 3x3 grid."""
    boxes = []
    for frac in (0.12, 0.25, 0.5):
        s = max(1, round(min(w, h) * frac))
        for y0 in np.linspace(0, h - s, 3).round().astype(int):
            for x0 in np.linspace(0, w - s, 3).round().astype(int):
                boxes.append((int(x0), int(y0), int(x0) + s, int(y0) + s))
    return boxes


def _shrink(box, factor: float):
    x0, y0, x1, y1 = box
    dx, dy = round((x1 - x0) * (1 - factor) / 2), round((y1 - y0) * (1 - factor) / 2)
    return x0 + dx, y0 + dy, max(x0 + dx + 1, x1 - dx), max(y0 + dy + 1, y1 - dy)


def photo_samples(photo_ids, kind: str, hw: tuple[int, int], mean: float, scale: float,
                  variant: int = 0) -> np.ndarray:
    """Samples (N, 3, h, w) made from photos ``photo_ids`` of misc/: ``kind`` "scene" or "patch".

    ``variant`` 0 is the standard set; variant v > 0 (extra calibration data, --batch-mult) shrinks
    every window by 6 v % about its centre and, for odd v, mirrors it vertically.
    """
    from amct_caffe.data import Preprocess
    prep = Preprocess(size=hw, channel_order="RGB", mean=(mean,), scale=scale)
    photos = _misc_photos()
    out = []
    for pid in photo_ids:
        img = _rgb(photos[pid])
        h, w = img.shape[:2]
        boxes = _scene_boxes(w, h) if kind == "scene" else _patch_boxes(w, h)
        if variant:
            boxes = [_shrink(b, 1 - 0.06 * variant) for b in boxes]
        crops = [img[y0:y1, x0:x1] for x0, y0, x1, y1 in boxes]
        if kind == "scene":
            crops += [c[:, ::-1] for c in crops]
        if variant % 2:
            crops = [c[::-1] for c in crops]
        out += [prep.apply(np.ascontiguousarray(c)) for c in crops]
    return np.stack(out)


def eval_photo_ids() -> list[int]:
    return [i for i in range(len(_misc_photos())) if i not in CALIB_PHOTOS]


def batched(name: str, x: np.ndarray, batch: int):
    for i in range(0, len(x), batch):
        yield {name: x[i:i + batch]}


# ---------------------------------------------------------------------------------------- cases
@dataclass
class Eval:
    label: str                   # e.g. "" or "@96x128"
    count: int                   # samples
    feeds: object                # callable -> iterable of {input: array}
    batches: int                 # number of feeds


@dataclass
class Case:
    name: str
    model: Path
    weights: Path
    input: str
    kind: str                    # "top1" | "nsfw" | "cosine"
    calib: object                # callable(mult) -> list of feeds
    evals: list[Eval]
    labels: np.ndarray | None = None
    notes: str = ""


def lenet_case(args) -> Case:
    z = np.load(DATA / "mnist_5k.npz")
    images, labels = z["images"], z["labels"]
    x = images[:, None].astype(np.float32) * np.float32(0.00390625)
    calib_idx = np.arange(64) * 78
    calib_set = set(calib_idx.tolist())
    eval_idx = np.concatenate([[i for i in np.flatnonzero(labels == c) if i not in calib_set][:400]
                               for c in range(10)])
    # --batch-mult: more calibration digits, spread over the 936 digits used for neither
    spare = np.array(sorted(set(range(len(x))) - calib_set - set(eval_idx.tolist())))

    def calib(mult):
        more = spare[np.linspace(0, len(spare) - 1, 64 * (mult - 1)).round().astype(int)] if mult > 1 else []
        idx = np.concatenate([calib_idx, more]).astype(int)
        return [{"data": x[idx[i:i + 32]]} for i in range(0, len(idx), 32)]

    ev = x[eval_idx]
    return Case("lenet", MODELS / "lenet_mnist/lenet.prototxt", MODELS / "lenet_mnist/lenet_iter_10000.caffemodel",
                "data", "top1", calib, [Eval("", len(ev), lambda: batched("data", ev, 250), math.ceil(len(ev) / 250))],
                labels=labels[eval_idx])


def nsfw_case(args) -> Case:
    from amct_caffe.data import ImageFolder, Preprocess
    prep = Preprocess(size=(256, 256), crop=(224, 224), channel_order="BGR", mean=(104, 117, 123))
    src = ImageFolder(DATA / "imagenet_samples", {"data": (1, 3, 224, 224)}, prep)
    full = ImageFolder(DATA / "imagenet_samples", {"data": (1, 3, 256, 256)},
                       Preprocess(size=(256, 256), channel_order="BGR", mean=(104, 117, 123)))
    n = src.num_samples
    calib_ids = list(range(0, 30 * 32, 30))
    others = [i for i in range(n) if i not in set(calib_ids)]
    if args.limit and args.limit < len(others):
        pick = np.linspace(0, len(others) - 1, args.limit).round().astype(int)
        others = [others[i] for i in pick]

    def load(ids):
        return np.stack([src.sample("data", i) for i in ids])

    # --batch-mult: more calibration samples from the same 32 photos (the evaluation photos stay
    # unseen): the mirrored centre crop, then the 4 corner 224 crops of the 256x256 image, ...
    views = [(16, 16, False), (16, 16, True), (0, 0, False), (32, 32, False), (0, 32, False), (32, 0, False),
             (0, 0, True), (32, 32, True)]

    def calib(mult):
        for top, left, flip in views[:mult]:
            for i in range(0, len(calib_ids), 8):
                if (top, left, flip) == (16, 16, False):
                    yield {"data": load(calib_ids[i:i + 8])}
                    continue
                x = np.stack([full.sample("data", j) for j in calib_ids[i:i + 8]])[:, :, top:top + 224,
                                                                                  left:left + 224]
                yield {"data": np.ascontiguousarray(x[..., ::-1] if flip else x)}

    def feeds():
        for i in range(0, len(others), 8):
            yield {"data": load(others[i:i + 8])}

    return Case("open_nsfw", MODELS / "open_nsfw/deploy.prototxt",
                MODELS / "open_nsfw/resnet_50_1by2_nsfw.caffemodel", "data", "nsfw", calib,
                [Eval("", len(others), feeds, math.ceil(len(others) / 8))])


def _photo_case(name, model, weights, inp, kind, hw, mean, scale, calib_batch, eval_batch, extra=()) -> Case:
    ev_ids = eval_photo_ids()

    def calib(mult):
        x = np.concatenate([photo_samples(CALIB_PHOTOS, kind, hw, mean, scale, v) for v in range(mult)])
        return [{inp: x[i:i + calib_batch]} for i in range(0, len(x) - calib_batch + 1, calib_batch)]

    evals = []
    for label, k, size, b in ((f"{hw[0]}x{hw[1]}", kind, hw, eval_batch), *extra):
        def feeds(k=k, size=size, b=b):
            return batched(inp, photo_samples(ev_ids, k, size, mean, scale), b)
        count = len(ev_ids) * (12 if k == "scene" else 27)
        evals.append(Eval(label if extra else "", count, feeds, math.ceil(count / b)))
    return Case(name, model, weights, inp, "cosine", calib, evals)


def photo_cases(args) -> list[Case]:
    mt = MODELS / "mtcnn"
    m_mean, m_scale = 127.5, 0.0078125
    return [
        _photo_case("ultraface", MODELS / "ultraface_slim320/slim-320.prototxt",
                    MODELS / "ultraface_slim320/slim-320.caffemodel", "input", "scene", (240, 320), 127.0,
                    1 / 128, 1, 1),
        _photo_case("det1", mt / "det1.prototxt", mt / "det1.caffemodel", "data", "patch", (12, 12), m_mean,
                    m_scale, 27, 27, extra=(("96x128", "scene", (96, 128), 12),)),
        _photo_case("det1_96x128", mt / "det1.prototxt", mt / "det1.caffemodel", "data", "scene", (96, 128),
                    m_mean, m_scale, 8, 12),
        _photo_case("det2", mt / "det2.prototxt", mt / "det2.caffemodel", "data", "patch", (24, 24), m_mean,
                    m_scale, 27, 27),
        _photo_case("det3", mt / "det3.prototxt", mt / "det3.caffemodel", "data", "patch", (48, 48), m_mean,
                    m_scale, 27, 27),
    ]


# ---------------------------------------------------------------------------------------- metrics
def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of the rows of (N, D) arrays in float64 (1 where both rows are zero)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.sum(a * b, axis=1)
    out = np.where((na == 0) & (nb == 0), 1.0, dot / np.maximum(na * nb, 1e-300))
    return out


@dataclass
class Outputs:
    blobs: OrderedDict = field(default_factory=OrderedDict)   # name -> list of (n, D) arrays
    seconds: float = 0.0

    def add(self, out: dict, n: int) -> None:
        for k, v in out.items():
            self.blobs.setdefault(k, []).append(np.array(v, dtype=np.float32).reshape(n, -1))

    def stacked(self) -> OrderedDict:
        return OrderedDict((k, np.concatenate(v)) for k, v in self.blobs.items())


def run_eval(nets: dict, ev: Eval, case: Case, desc: str) -> dict[str, Outputs]:
    outs = {k: Outputs() for k in nets}
    for feed in tqdm(ev.feeds(), total=ev.batches, desc=desc, unit="batch", leave=False, file=sys.stderr):
        n = len(feed[case.input])
        for k, net in nets.items():
            t0 = time.perf_counter()
            out = net.forward(**feed)
            outs[k].seconds += time.perf_counter() - t0
            outs[k].add(out, n)
    return outs


# ---------------------------------------------------------------------------------------- results
ROWS: list[tuple] = []      # (case, metric, fp32, fq, deploy, target, passed)
TIMES: list[tuple] = []     # (case, what, seconds, samples)


def fmt(v, digits=6):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.{digits}f}"


def score(case: Case, ev: Eval, outs: dict[str, Outputs]) -> None:
    name = case.name + (f" {ev.label}" if ev.label else "")
    fp = outs["fp32"].stacked()
    int8 = [k for k in ("fq", "deploy") if k in outs]
    if case.kind == "top1":
        blob = "prob"
        acc = {k: float(np.mean(outs[k].stacked()[blob].argmax(1) == case.labels)) * 100 for k in outs}
        target = acc["fp32"] - 0.05
        ROWS.append((name, f"top-1 % ({ev.count})", fmt(acc["fp32"], 3), fmt(acc["fq"], 3),
                     fmt(acc.get("deploy"), 3), f">= {target:.3f}", acc["fq"] >= target - 1e-9))
        return
    res = {}
    for k in int8:
        q = outs[k].stacked()
        res[k] = {"all": float(np.mean(cosine_rows(np.concatenate(list(fp.values()), 1),
                                                   np.concatenate([q[b] for b in fp], 1))))}
        for b in fp:
            res[k][b] = float(np.mean(cosine_rows(fp[b], q[b])))
        if case.kind == "nsfw":
            res[k]["dp"] = float(np.mean(np.abs(q["prob"][:, 1] - fp["prob"][:, 1])))
            res[k]["p"] = float(np.mean(q["prob"][:, 1]))
            res[k]["min"] = float(np.min(cosine_rows(fp["prob"], q["prob"])))
    g = lambda k, m: res.get(k, {}).get(m)  # noqa: E731
    if case.kind == "nsfw":
        ROWS.append((name, f"mean cos(prob) ({ev.count})", "1 (ref)", fmt(g("fq", "all")), fmt(g("deploy", "all")),
                     f">= {COS_TARGET}", g("fq", "all") >= COS_TARGET))
        ROWS.append((name, "min cos(prob)", "1 (ref)", fmt(g("fq", "min")), fmt(g("deploy", "min")), "-", None))
        ROWS.append((name, "mean |dp_nsfw|", "0 (ref)", fmt(g("fq", "dp")), fmt(g("deploy", "dp")), "<= 0.005",
                     g("fq", "dp") <= 0.005))
        ROWS.append((name, "mean p_nsfw", fmt(float(np.mean(fp["prob"][:, 1]))), fmt(g("fq", "p")),
                     fmt(g("deploy", "p")), "-", None))
        return
    ROWS.append((name, f"mean cos(all outputs) ({ev.count})", "1 (ref)", fmt(g("fq", "all")),
                 fmt(g("deploy", "all")), f">= {COS_TARGET}", g("fq", "all") >= COS_TARGET))
    for b in fp:
        ROWS.append((name, f"  mean cos({b})", "1 (ref)", fmt(g("fq", b)), fmt(g("deploy", b)), f">= {COS_TARGET}",
                     g("fq", b) >= COS_TARGET))


def diagnose(case: Case, fp_model: str, fq_net, quant_json: str, feed: dict) -> None:
    """Per quantized layer, cosine FP32 vs fake-quant of its output on ``feed``:

    * "end-to-end": both nets run on the same input (error accumulated up to that layer);
    * "alone": the fake-quant net's Quant -> layer -> DeQuant / AntiQuant run on the FP32 net's
      input of the layer, i.e. the error this layer's quantization adds by itself;
    * "only it -> outputs": that "alone" output put into the FP32 net, which runs on from there:
      cosine of the network outputs (the worst output blob) when only this layer were quantized.

    The FP32 model is uninplaced first (the fake-quant model is: every blob has one writer), and a
    fused layer (Conv + BN + Scale) is compared with the output of the last layer it absorbed.
    """
    import amct_caffe as amct
    from amct_caffe.runtime import TEST, Net

    with tempfile.TemporaryDirectory() as tmp:
        unin = os.path.join(tmp, "fp32_uninplaced.prototxt")
        amct.uninplace_model(fp_model, unin)
        fp_net = Net(unin, str(case.weights), TEST)
    mapping = json.loads(Path(quant_json).read_text())["layers"]
    fp_ref = {k: v.reshape(len(feed[case.input]), -1).copy() for k, v in fp_net.forward(**feed).items()}
    fq_net.forward(**feed)
    n = len(feed[case.input])
    fp_layers = list(fp_net.top_names)
    fp_saved = {b: blob.data.copy() for b, blob in fp_net.blobs.items()}
    fp_top = {name: tops[0] for name, tops in fp_net.top_names.items() if tops}
    # fake-quant blob -> FP32 blob holding the same quantity
    fq_to_fp: dict[str, str] = {b: b for b in fp_net.inputs}
    final_top: dict[str, str] = {}
    for name, tops in fq_net.top_names.items():
        info = mapping.get(name, {})
        if not tops:
            continue
        owner = info.get("inserted_for")
        if owner is not None:  # Quant / DeQuant / AntiQuant
            if info["type"] in ("DeQuant", "AntiQuant"):
                final_top[owner] = tops[0]
                origin = mapping[owner].get("origin") or [owner]
                if origin[-1] in fp_top:
                    fq_to_fp[tops[0]] = fp_top[origin[-1]]
            continue
        origin = info.get("origin") or [name]
        if origin[-1] in fp_top:
            fq_to_fp[tops[0]] = fp_top[origin[-1]]
            final_top.setdefault(name, tops[0])

    def cos(fq_blob):
        fp_blob = fq_to_fp.get(fq_blob)
        if fp_blob is None or fp_net.blobs[fp_blob].data.shape != fq_net.blobs[fq_blob].data.shape:
            return None
        return cosine_rows(fp_net.blobs[fp_blob].data.reshape(n, -1), fq_net.blobs[fq_blob].data.reshape(n, -1))

    rows = []
    for name in list(fq_net.top_names):
        info = mapping.get(name, {})
        if not info.get("quantized"):
            continue
        top = final_top.get(name)
        e2e = cos(top) if top else None
        alone = only = None
        qname = f"{name}_quant"
        end = next((k for k in (f"{name}_dequant", f"{name}_antiquant") if k in fq_net.top_names), None)
        if qname in fq_net.top_names and end is not None:
            bottom = fq_net.bottom_names[qname][0]
            src = fq_to_fp.get(bottom)
            if src is not None:
                saved = fq_net.blobs[bottom].data.copy()
                fq_net.blobs[bottom].data = fp_net.blobs[src].data.copy()
                fq_net.forward(start=qname, end=end)
                alone = cos(top)
                fq_net.blobs[bottom].data = saved
                origin = info.get("origin") or [name]
                if origin[-1] in fp_top and alone is not None:
                    fp_net.blobs[fp_top[origin[-1]]].data = fq_net.blobs[top].data.copy()
                    if origin[-1] != fp_layers[-1]:
                        fp_net.forward(start=fp_layers[fp_layers.index(origin[-1]) + 1])
                    per_out = [cosine_rows(fp_ref[k], fp_net.blobs[k].data.reshape(n, -1)) for k in fp_ref]
                    only = min(per_out, key=np.mean)
                    for b, d in fp_saved.items():
                        fp_net.blobs[b].data = d.copy()
        fmt_c = lambda c: "       -" if c is None else f"{c.mean():.6f} (min {c.min():.6f})"  # noqa: E731
        rows.append((name, info["type"], fmt_c(e2e), fmt_c(alone), fmt_c(only),
                     None if only is None else float(only.mean())))
    print(f"\n[diagnose] {case.name}: cosine FP32 vs fake-quant per quantized layer on {n} evaluation sample(s)")
    print(f"  {'layer':<24} {'type':<14} {'end-to-end':<28} {'alone':<28} {'only it -> worst output':<28}")
    for name, typ, e2e, alone, only, _ in rows:
        print(f"  {name:<24} {typ:<14} {e2e:<28} {alone:<28} {only:<28}")
    worst = sorted((r for r in rows if r[5] is not None), key=lambda r: r[5])[:6]
    print("  most sensitive (only it quantized -> worst output): "
          + ", ".join(f"{r[0]} ({r[1]}) {r[5]:.6f}" for r in worst))


# ---------------------------------------------------------------------------------------- driver
def write_cfg(path: Path, skip_types, skip_layers, batch_num: int, offset: bool) -> Path:
    lines = [f"batch_num: {batch_num}", f"activation_offset: {'true' if offset else 'false'}"]
    lines += [f'skip_layer_types: "{t}"' for t in skip_types]
    lines += [f'skip_layers: "{t}"' for t in skip_layers]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_case(case: Case, args, out_dir: Path) -> None:
    from amct_caffe import io
    from amct_caffe.api.fallback import calibrate_with_fallback
    from amct_caffe.api.workflow import calibrate
    from amct_caffe.runtime import TEST, Net

    case_dir = out_dir / case.name
    case_dir.mkdir(parents=True, exist_ok=True)
    calib_feeds = list(case.calib(args.batch_mult))
    batch_num = len(calib_feeds)
    model_layers = io.load_prototxt(case.model).layer
    present = {lp.type for lp in model_layers}
    skip = [t for t in args.skip_types if t in present or (t == "DepthwiseConv" and "Convolution" in present)]
    skip_layers = [n for n in args.skip_layers if n in {lp.name for lp in model_layers}]
    cfg = (write_cfg(case_dir / "skip.cfg", skip, skip_layers, batch_num, not args.no_offset)
           if skip or skip_layers else None)
    config_file = case_dir / "config.json"
    if config_file.exists():
        config_file.unlink()
    t0 = time.perf_counter()
    if args.target_cosine:
        # The search evaluates on the calibration samples only: the evaluation data stays unseen.
        result = calibrate_with_fallback(str(case.model), str(case.weights), calib_feeds, str(case_dir / case.name),
                                         batch_num, target_cosine=args.target_cosine,
                                         max_float_layers=args.max_float_layers,
                                         config_defination=str(cfg) if cfg else None,
                                         activation_offset=not args.no_offset, metric=args.fallback_metric,
                                         progress=True)
        paths = result.outputs
        config_file.write_text(Path(paths["fallback_config"]).read_text())
        print(f"[{case.name}] fallback: float layers {result.float_layers}; calibration-set cosine "
              f"{result.cosine_int8:.6f} -> {result.cosine_final:.6f}", flush=True)
    else:
        paths = calibrate(str(case.model), str(case.weights), iter(calib_feeds), str(case_dir / case.name),
                          batch_num, config_file=str(config_file), config_defination=str(cfg) if cfg else None,
                          activation_offset=not args.no_offset, progress=True)
    n_calib = sum(len(f[case.input]) for f in calib_feeds)
    what = "calibrate + fallback search" if args.target_cosine else "calibrate"
    TIMES.append((case.name, f"{what} ({batch_num} batch(es), {n_calib} samples)", time.perf_counter() - t0,
                  n_calib))
    conf = json.loads(config_file.read_text())
    types = {lp.name: lp.type for lp in io.load_prototxt(case.model).layer}
    enabled: dict[str, int] = {}
    for layer, v in conf.items():
        if isinstance(v, dict) and v.get("quant_enable"):
            enabled[types.get(layer, "?")] = enabled.get(types.get(layer, "?"), 0) + 1
    print(f"[{case.name}] quantized layers by type: {enabled}" + (f"; skipped types {skip}" if skip else "")
          + (f"; skipped layers {skip_layers}" if skip_layers else ""), flush=True)

    nets = OrderedDict(fp32=Net(str(case.model), str(case.weights), TEST),
                       fq=Net(paths["fake_quant_model"], paths["fake_quant_weights"], TEST))
    if not args.no_deploy:
        nets["deploy"] = Net(paths["deploy_model"], paths["deploy_weights"], TEST)
    for ev in case.evals:
        label = case.name + (f" {ev.label}" if ev.label else "")
        outs = run_eval(nets, ev, case, f"evaluate {label}")
        for k, o in outs.items():
            TIMES.append((label, f"forward {k} ({ev.count} samples)", o.seconds, ev.count))
        score(case, ev, outs)
        if args.diagnose:
            diagnose(case, str(case.model), nets["fq"], paths["quant_json"], next(iter(ev.feeds())))


def print_table() -> None:
    head = ("case", "metric", "FP32", "INT8 fake-quant", "INT8 deploy", "target", "result")
    rows = [head] + [(c, m, a, b, d, t, {True: "PASS", False: "FAIL", None: ""}[p]) for c, m, a, b, d, t, p in ROWS]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)
    print("\n" + "  ".join(str(h).ljust(w) for h, w in zip(head, widths, strict=True)))
    print(line)
    for r in rows[1:]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)))
    print("\nTimings (wall, shared machine):")
    for case, what, sec, n in TIMES:
        per = f"{sec / n * 1000:9.2f} ms/sample" if n else ""
        print(f"  {case:<20} {what:<44} {sec:9.2f} s {per}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="lenet,open_nsfw,ultraface,det1,det1_96x128,det2,det3")
    ap.add_argument("--limit", type=int, default=0, help="open_nsfw: evaluate N images (evenly spaced), default all")
    ap.add_argument("--out", default="", help="where the quantized models go (default: a temporary directory)")
    ap.add_argument("--skip-types", default="", help="comma-separated layer types left unquantized (a .cfg)")
    ap.add_argument("--skip-layers", default="", help="comma-separated layer names left unquantized (a .cfg)")
    ap.add_argument("--no-offset", action="store_true", help="activation_offset false (symmetric activations)")
    ap.add_argument("--batch-mult", type=int, default=1, help="K times as many calibration batches")
    ap.add_argument("--no-deploy", action="store_true", help="skip the deploy model's integer simulation")
    ap.add_argument("--diagnose", action="store_true", help="per-blob cosine FP32 vs fake-quant")
    ap.add_argument("--target-cosine", type=float, default=0.0,
                    help="accuracy-based fallback (amct_caffe.api.fallback) to this output cosine, searched on "
                         "the calibration samples")
    ap.add_argument("--max-float-layers", type=int, default=16, help="fallback: at most this many float layers")
    ap.add_argument("--fallback-metric", default="worst_output", choices=["worst_output", "all_outputs"],
                    help="fallback: every output blob must reach the target (default), or their concatenation")
    args = ap.parse_args()
    args.skip_types = [t for t in args.skip_types.split(",") if t]
    args.skip_layers = [t for t in args.skip_layers.split(",") if t]
    logging.getLogger().setLevel(logging.WARNING)
    os.environ.setdefault("AMCT_LOG_LEVEL", "WARNING")
    if not SHARED.is_dir():
        print(f"{SHARED} not found (set AMCT_SHARED)")
        return 0
    wanted = [c for c in args.cases.split(",") if c]
    builders = {"lenet": lambda: [lenet_case(args)], "open_nsfw": lambda: [nsfw_case(args)],
                "photos": lambda: photo_cases(args)}
    cases = []
    for c in builders["lenet"]() if "lenet" in wanted else []:
        cases.append(c)
    if "open_nsfw" in wanted:
        cases += builders["open_nsfw"]()
    cases += [c for c in builders["photos"]() if c.name in wanted]
    print(f"ptq_quality: cases {[c.name for c in cases]}; skip types {args.skip_types or 'none'}; "
          f"skip layers {args.skip_layers or 'none'}; "
          f"activation_offset {not args.no_offset}; calibration batches x{args.batch_mult}", flush=True)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ptq_quality_") as tmp:
        out_dir = Path(args.out or tmp)
        for case in tqdm(cases, desc="cases", unit="case", file=sys.stderr):
            t0 = time.perf_counter()
            try:
                run_case(case, args, out_dir)
            except Exception as e:  # a benchmark reports and goes on
                logging.exception("case %s failed", case.name)
                ROWS.append((case.name, "ERROR", "-", f"{type(e).__name__}: {e}"[:60], "-", "-", False))
            TIMES.append((case.name, "case total", time.perf_counter() - t0, 0))
    TIMES.append(("all", "total", time.perf_counter() - t_all, 0))
    print_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
