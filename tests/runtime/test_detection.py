"""Detection layers against scalar loop transcriptions of the C++ (prior_box_layer.cpp,
detection_output_layer.cpp + bbox_util.cpp, py-faster-rcnn / R-FCN / Caffe2 ROI kernels), and
PriorBox / DetectionOutput bit for bit on the hyperlpr golden blobs."""

import itertools
import shutil
import subprocess

import numpy as np
import pytest
from google.protobuf import text_format

from tests.runtime.layer_harness import make_layer, run_layer
from amct_caffe.errors import GraphError
from amct_caffe.io.schema import caffe_pb
from amct_caffe.runtime.layers import detection as D
from amct_caffe.runtime.registry import layer_class
from tests.golden import CASES_BY_NAME

f32, f64 = np.float32, np.float64
RNG = np.random.default_rng(11)


make = make_layer


def run(text, *bottoms):
    layer = make(text)
    if layer.shape_from_forward:  # the top's row count is only known after forward
        shapes = layer.reshape([b.shape for b in bottoms])
        (top,) = layer.forward(list(bottoms))
        assert top.dtype == np.float32
        return top, shapes[0]
    (top,), shapes = run_layer(layer, bottoms)
    return top, shapes[0]


# ------------------------------------------------------------------------ PriorBox
def prior_box_reference(lh, lw, ih, iw, mins, maxs, ars, flip, clip, variances, step=None, offset=0.5):
    """prior_box_layer.cpp as written, scalar by scalar (int min/max sizes, float sqrt(ar),
    double corner arithmetic)."""
    ar_list = [f32(1)]
    for a in map(f32, ars):
        if all(abs(float(a) - float(b)) >= 1e-6 for b in ar_list):
            ar_list.append(a)
            if flip:
                ar_list.append(f32(1.0 / float(a)))
    sw, sh = (f32(step[1]), f32(step[0])) if step else (f32(iw) / f32(lw), f32(ih) / f32(lh))
    out = []
    for h in range(lh):
        for w in range(lw):
            cx, cy = f32(f32(w + f32(offset)) * sw), f32(f32(h + f32(offset)) * sh)
            for s, mn in enumerate(mins):
                m = int(f32(mn))
                boxes = [(f32(m), f32(m))]
                if maxs:
                    boxes.append((f32(np.sqrt(float(m * int(f32(maxs[s]))))),) * 2)
                boxes += [(f32(m) * np.sqrt(a), f32(m) / np.sqrt(a))
                          for a in ar_list if abs(float(a) - 1) >= 1e-6]
                for bw, bh in boxes:
                    out += [f32((float(cx) - float(bw) / 2.0) / iw), f32((float(cy) - float(bh) / 2.0) / ih),
                            f32((float(cx) + float(bw) / 2.0) / iw), f32((float(cy) + float(bh) / 2.0) / ih)]
    out = np.array(out, f32)
    if clip:
        out = np.minimum(np.maximum(out, f32(0)), f32(1))
    var = np.tile(np.array(variances or [0.1], f32), len(out) // (4 if len(variances) == 4 else 1))
    return np.stack([out, var])[None]


@pytest.mark.parametrize("param, img, step", [
    ("min_size: 30 max_size: 60 aspect_ratio: 2 flip: true clip: true variance: 0.1", None, None),
    ("min_size: 20.7 min_size: 41.3 max_size: 41.3 max_size: 80.5 aspect_ratio: 2 aspect_ratio: 3 "
     "aspect_ratio: 2.0000001 flip: true clip: false variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 "
     "img_size: 300 step: 32 offset: 0.25", (300, 300), (32, 32)),
    ("min_size: 16 aspect_ratio: 0.5 flip: false clip: false img_h: 90 img_w: 120 step_h: 9 step_w: 11",
     (90, 120), (9, 11)),
])
def test_prior_box_variants(param, img, step):
    feat, image = np.zeros((1, 8, 5, 7), f32), np.zeros((1, 3, 70, 100), f32)
    top, shape = run(f'type: "PriorBox" bottom: "f" bottom: "i" top: "p" prior_box_param {{ {param} }}',
                     feat, image)
    p = text_format.Parse(param, caffe_pb().PriorBoxParameter())
    ih, iw = img or (70, 100)
    ref = prior_box_reference(5, 7, ih, iw, list(p.min_size), list(p.max_size), list(p.aspect_ratio), p.flip,
                              p.clip, list(p.variance), step, p.offset)
    assert top.shape == shape == ref.shape
    np.testing.assert_array_equal(top, ref)


def test_prior_box_errors():
    for param, match in (("max_size: 5", "min_size"), ("min_size: 8 max_size: 4", "max_size"),
                         ("min_size: 8 variance: 0.1 variance: 0.2", "variances"),
                         ("min_size: 8 img_size: 3 img_h: 3", "not both"),
                         # (an OverflowError came out of the int conversion of inf)
                         ("min_size: 8 max_size: inf", r"must be finite and below 2\^31"),
                         ("min_size: 3e9", r"must be finite and below 2\^31")):
        with pytest.raises(GraphError, match=match):
            run(f'type: "PriorBox" bottom: "f" bottom: "i" top: "p" prior_box_param {{ {param} }}',
                np.zeros((1, 1, 2, 2), f32), np.zeros((1, 1, 8, 8), f32))


def hyperlpr():
    from amct_caffe import io

    c = CASES_BY_NAME["hyperlpr_mininet_ssd"]
    if not c.golden.exists() or not c.prototxt.exists():
        pytest.skip(f"{c.golden} missing")
    net, _ = io.load_model(str(c.prototxt), None, io.TEST)
    return net, np.load(c.golden)


def test_prior_box_golden_bit_exact():
    net, z = hyperlpr()
    layers = [lp for lp in net.layer if lp.type == "PriorBox"]
    assert len(layers) == 6
    for lp in layers:
        layer = layer_class(lp.type)(lp)
        bottoms = [np.zeros(z[f"shape:{b}"], f32) for b in lp.bottom]  # only the shapes matter
        assert layer.reshape([b.shape for b in bottoms])[0] == tuple(z[f"shape:{lp.top[0]}"])
        np.testing.assert_array_equal(layer.forward(bottoms)[0], z[f"blob:{lp.top[0]}"])


# ------------------------------------------------------------------------ DetectionOutput
def decode_reference(p, v, t, code, var_in_target):
    """DecodeBBox for one box with float32 scalars (double where the C++ divides by 2.)."""
    if var_in_target:
        v = [f32(1)] * 4
    if code == "CORNER":
        return [p[k] + (t[k] if var_in_target else v[k] * t[k]) for k in range(4)]
    pw, ph = p[2] - p[0], p[3] - p[1]
    if code == "CORNER_SIZE":
        return [p[k] + (t[k] if var_in_target else v[k] * t[k]) * (pw, ph)[k % 2] for k in range(4)]
    pcx, pcy = f32((float(p[0] + p[2])) / 2.0), f32((float(p[1] + p[3])) / 2.0)
    tx, ty = (t[0], t[1]) if var_in_target else (v[0] * t[0], v[1] * t[1])
    tw, th = (t[2], t[3]) if var_in_target else (v[2] * t[2], v[3] * t[3])
    cx, cy = tx * pw + pcx, ty * ph + pcy
    w, h = f32(np.exp(float(tw))) * pw, f32(np.exp(float(th))) * ph
    return [f32(float(cx) - float(w) / 2.0), f32(float(cy) - float(h) / 2.0),
            f32(float(cx) + float(w) / 2.0), f32(float(cy) + float(h) / 2.0)]


def size_reference(b):
    return f32(0) if b[2] < b[0] or b[3] < b[1] else (b[2] - b[0]) * (b[3] - b[1])


def jaccard_reference(a, b):
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return f32(0)
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if iw > 0 and ih > 0:
        inter = iw * ih
        return inter / (size_reference(a) + size_reference(b) - inter)
    return f32(0)


def nms_reference(boxes, scores, thresh, nms_thresh, eta, top_k):
    cand = sorted((i for i in range(len(scores)) if scores[i] > f32(thresh)), key=lambda i: -scores[i])
    cand = cand[:top_k] if top_k > -1 else cand
    kept, adaptive = [], f32(nms_thresh)
    for i in cand:
        if all(jaccard_reference(boxes[i], boxes[k]) <= adaptive for k in kept):
            kept.append(i)
            if eta < 1 and adaptive > 0.5:
                adaptive = f32(adaptive * f32(eta))
    return kept


def detection_reference(loc, conf, prior, C, share, bg, nms, code, var_in_target, keep_top_k, thresh):
    n, P = loc.shape[0], prior.shape[2] // 4
    L = 1 if share else C
    pr, var = prior[0, 0].reshape(P, 4), prior[0, 1].reshape(P, 4)
    rows = []
    for i in range(n):
        lo, cf = loc[i].reshape(P, L, 4), conf[i].reshape(P, C)
        dec = {lab: [decode_reference(pr[p], var[p], lo[p, lab], code, var_in_target) for p in range(P)]
               for lab in range(L)}
        picked = {}
        for c in range(C):
            if c == bg:
                continue
            boxes = dec[0 if share else c]
            picked[c] = list(range(P)) if nms is None else nms_reference(boxes, cf[:, c], thresh, *nms)
        if -1 < keep_top_k < sum(map(len, picked.values())):
            pairs = sorted(((cf[j, c], c, j) for c in picked for j in picked[c]), key=lambda t: -t[0])
            pairs = pairs[:keep_top_k]
            picked = {c: [j for _, cc, j in pairs if cc == c] for c in sorted({c for _, c, _ in pairs})}
        for c, idx in picked.items():
            rows += [[i, c, cf[j, c], *dec[0 if share else c][j]] for j in idx]
    if not rows:
        return np.array([[i] + [-1] * 6 for i in range(n)], f32)[None, None]
    return np.array(rows, f32)[None, None]


def detection_inputs(n, P, C, share, loc_scale=0.5):
    L = 1 if share else C
    xy = RNG.uniform(0, 0.8, (P, 2)).astype(f32)
    wh = RNG.uniform(0.1, 0.3, (P, 2)).astype(f32)
    prior = np.stack([np.concatenate([xy, xy + wh], 1).ravel(),
                      np.tile(np.array([0.1, 0.1, 0.2, 0.2], f32), P)])[None]
    loc = (RNG.standard_normal((n, P * L * 4)) * loc_scale).astype(f32)
    logits = RNG.standard_normal((n, P, C)).astype(f32) * 2
    conf = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(f32).reshape(n, P * C)
    return loc, conf, prior


@pytest.mark.parametrize("share, bg, nms, code, vit, keep, thresh, loc_scale", [
    (True, 0, (0.45, 1.0, 400), "CENTER_SIZE", False, 100, 0.01, 0.5),
    (True, 0, (0.45, 1.0, 5), "CENTER_SIZE", False, -1, 0.01, 0.5),
    (False, -1, (0.5, 1.0, -1), "CORNER", False, -1, 0.2, 20),  # many inverted (size 0) boxes
    (True, 0, (0.3, 1.0, 10), "CENTER_SIZE", False, 7, 0.05, 0.5),
    (False, -1, (0.5, 0.8, -1), "CORNER", False, -1, 0.2, 0.5),
    (False, 1, (0.4, 1.0, 20), "CORNER_SIZE", True, 12, 0.1, 0.05),
    (True, 0, (0.6, 0.9, 15), "CENTER_SIZE", True, 5, None, 0.5),
    (True, 0, None, "CENTER_SIZE", False, 9, None, 0.5),  # no nms_param: every prior, unthresholded
])
def test_detection_output_against_reference(share, bg, nms, code, vit, keep, thresh, loc_scale):
    n, P, C = 2, 40, 4
    loc, conf, prior = detection_inputs(n, P, C, share, loc_scale)
    nms_text = "" if nms is None else \
        f"nms_param {{ nms_threshold: {nms[0]} eta: {nms[1]} {'' if nms[2] < 0 else f'top_k: {nms[2]}'} }}"
    text = (f'type: "DetectionOutput" bottom: "l" bottom: "c" bottom: "p" top: "d" detection_output_param {{ '
            f"num_classes: {C} share_location: {str(share).lower()} background_label_id: {bg} {nms_text} "
            f"code_type: {code} variance_encoded_in_target: {str(vit).lower()} keep_top_k: {keep} "
            f"{'' if thresh is None else f'confidence_threshold: {thresh}'} }}")
    top, shape = run(text, loc, conf, prior)
    assert shape == (1, 1, 1, 7) and make(text).shape_from_forward
    ref = detection_reference(loc, conf, prior, C, share, bg, nms, code, vit, keep,
                              -np.finfo(f32).max if thresh is None else thresh)
    assert top.shape[2] > 1
    np.testing.assert_array_equal(top, ref)


def test_detection_output_nothing_detected():
    loc, conf, prior = detection_inputs(3, 10, 3, True)
    top, _ = run('type: "DetectionOutput" bottom: "l" bottom: "c" bottom: "p" top: "d" '
                 "detection_output_param { num_classes: 3 nms_param { nms_threshold: 0.5 } "
                 "confidence_threshold: 1.5 }", loc, conf, prior)
    want = np.full((3, 7), -1, f32)
    want[:, 0] = [0, 1, 2]
    np.testing.assert_array_equal(top, want[None, None])


def test_detection_output_tie_orders():
    """Equal scores: NMS keeps index order (stable_sort); the keep_top_k cut follows g++'s std::sort."""
    P = 20
    scores = np.array([0.5, 0.3, 0.7] * 6 + [0.5, 0.3], f32)
    xy = np.stack(np.meshgrid(np.arange(5), np.arange(4)), -1).reshape(-1, 2).astype(f32) / 5
    prior = np.stack([np.concatenate([xy, xy + f32(0.1)], 1).ravel(), np.full(P * 4, 0.1, f32)])[None]
    conf = np.stack([1 - scores, scores], 1).reshape(1, -1)
    text = ('type: "DetectionOutput" bottom: "l" bottom: "c" bottom: "p" top: "d" detection_output_param { '
            "num_classes: 2 nms_param { nms_threshold: 0.45 } code_type: CENTER_SIZE keep_top_k: {} }")
    top, _ = run(text.replace("{}", "-1"), np.zeros((1, P * 4), f32), conf, prior)
    nms_order = [2, 5, 8, 11, 14, 17, 0, 3, 6, 9, 12, 15, 18, 1, 4, 7, 10, 13, 16, 19]
    np.testing.assert_array_equal(top[0, 0, :, 2], scores[nms_order])
    np.testing.assert_allclose(top[0, 0, :, 3], prior[0, 0, 0::4][nms_order], atol=1e-6)  # decoded ~ prior
    top, _ = run(text.replace("{}", "18"), np.zeros((1, P * 4), f32), conf, prior)
    gxx_perm = [1, 2, 3, 4, 5, 0, 10, 12, 11, 9, 8, 7, 6, 13, 14, 15, 16, 17, 18, 19]  # g++'s std::sort
    kept = [nms_order[i] for i in gxx_perm[:18]]
    np.testing.assert_allclose(top[0, 0, :, 3], prior[0, 0, 0::4][kept], atol=1e-6)


def test_detection_output_errors():
    loc, conf, prior = detection_inputs(1, 10, 3, True)
    with pytest.raises(GraphError, match="num_classes"):
        run('type: "DetectionOutput" bottom: "l" bottom: "c" bottom: "p" top: "d"', loc, conf, prior)
    with pytest.raises(GraphError, match="priors do not match"):
        run('type: "DetectionOutput" bottom: "l" bottom: "c" bottom: "p" top: "d" '
            "detection_output_param { num_classes: 4 }", loc, conf, prior)
    # bbox_util.cpp's DecodeBBoxesAll skips the shared locations (label -1) as background when
    # background_label_id is -1; Forward_cpu then aborts "Could not find location predictions"
    with pytest.raises(GraphError, match="background_label_id -1"):
        run('type: "DetectionOutput" bottom: "l" bottom: "c" bottom: "p" top: "d" '
            "detection_output_param { num_classes: 3 background_label_id: -1 }", loc, conf, prior)
    run('type: "DetectionOutput" bottom: "l" bottom: "c" bottom: "p" top: "d" '
        "detection_output_param { num_classes: 3 background_label_id: 1 }", loc, conf, prior)


def test_detection_output_golden_bit_exact():
    net, z = hyperlpr()
    (lp,) = [lp for lp in net.layer if lp.type == "DetectionOutput"]
    layer = layer_class(lp.type)(lp)
    bottoms = [z[f"blob:{b}"] for b in lp.bottom]
    layer.reshape([b.shape for b in bottoms])
    np.testing.assert_array_equal(layer.forward(bottoms)[0], z["blob:detection_out"])


# ------------------------------------------------------------------------ std::sort emulation
def test_libstdcxx_sort_known_tie_order():
    # g++ 12 / libstdc++: std::sort of these keys with `a > b` leaves this permutation
    keys = [3, 1, 3, 2, 3, 1, 3, 2, 3, 1, 3, 2, 3, 1, 3, 2, 3, 1, 3, 2, 0, 3]
    assert D.libstdcxx_sort_desc(keys) == [21, 2, 4, 18, 6, 16, 8, 10, 0, 12, 14, 11, 19, 15, 7, 3, 13, 9,
                                           17, 5, 1, 20]


@pytest.mark.parametrize("n", [0, 1, 5, 16, 17, 100, 1000])
def test_libstdcxx_sort_sorts(n):
    keys = RNG.integers(0, 7, n).tolist()
    perm = D.libstdcxx_sort_desc(keys)
    assert sorted(perm) == list(range(n))
    assert all(keys[a] >= keys[b] for a, b in zip(perm[:-1], perm[1:], strict=True))


def test_libstdcxx_sort_matches_gxx(tmp_path):
    """Random tie-heavy keys and a median-of-3 killer (heapsort fallback) against g++'s std::sort."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("no g++")
    src = tmp_path / "s.cpp"
    src.write_text("#include <algorithm>\n#include <cstdio>\n#include <vector>\n"
                   "int main(){int n;std::vector<float> k;std::vector<int> p;\n"
                   "while(scanf(\"%d\",&n)==1){k.resize(n);p.resize(n);\n"
                   "for(int i=0;i<n;i++){scanf(\"%f\",&k[i]);p[i]=i;}\n"
                   "std::sort(p.begin(),p.end(),[&](int a,int b){return k[a]>k[b];});\n"
                   "for(int i=0;i<n;i++)printf(\"%d \",p[i]);printf(\"\\n\");}}\n")
    exe = tmp_path / "s"
    subprocess.run([gxx, "-O1", "-o", str(exe), str(src)], check=True)
    cases = [RNG.integers(0, int(RNG.integers(1, 6)), int(RNG.integers(0, 200))).tolist() for _ in range(60)]
    cases.append(killer_sequence(1500))
    text = "".join(f"{len(c)} " + " ".join(map(str, c)) + "\n" for c in cases)
    out = subprocess.run([str(exe)], input=text, capture_output=True, text=True, check=True).stdout
    out = out.splitlines()
    for keys, line in zip(cases, out, strict=True):
        assert D.libstdcxx_sort_desc(keys) == [int(v) for v in line.split()]


def killer_sequence(n):
    """McIlroy's adversary run against our sort: keys that drive introsort into heapsort."""
    gas, val, state = n, [n] * n, {"cand": 0, "solid": 0}

    class Key:
        def __init__(self, i):
            self.i = i

        def __gt__(self, other):
            x, y = self.i, other.i
            if val[x] == gas and val[y] == gas:
                frozen = x if x == state["cand"] else y
                val[frozen], state["solid"] = state["solid"], state["solid"] + 1
            if val[x] == gas:
                state["cand"] = x
            elif val[y] == gas:
                state["cand"] = y
            return val[x] < val[y]

    D.libstdcxx_sort_desc([Key(i) for i in range(n)])
    return [-(v if v != gas else n + i) for i, v in enumerate(val)]


# ------------------------------------------------------------------------ ROI family
def c_round(v):
    return float(np.sign(v) * np.floor(abs(v) + 0.5))


def roi_pool_reference(x, rois, ph_n, pw_n, scale):
    out = np.zeros((len(rois), x.shape[1], ph_n, pw_n), f32)
    H, W = x.shape[2:]
    for r, (b, *c) in enumerate(rois):
        x0, y0, x1, y1 = (int(c_round(f32(v) * f32(scale))) for v in c)
        bh, bw = f32(max(y1 - y0 + 1, 1)) / f32(ph_n), f32(max(x1 - x0 + 1, 1)) / f32(pw_n)
        for ph, pw in itertools.product(range(ph_n), range(pw_n)):
            hs = min(max(int(np.floor(f32(ph) * bh)) + y0, 0), H)
            he = min(max(int(np.ceil(f32(ph + 1) * bh)) + y0, 0), H)
            ws = min(max(int(np.floor(f32(pw) * bw)) + x0, 0), W)
            we = min(max(int(np.ceil(f32(pw + 1) * bw)) + x0, 0), W)
            if he > hs and we > ws:
                out[r, :, ph, pw] = x[int(b), :, hs:he, ws:we].max(axis=(1, 2))
    return out


def test_roi_pooling():
    x = RNG.standard_normal((2, 3, 12, 14)).astype(f32)
    rois = np.array([[0, 0, 0, 100, 100], [1, 16, 24, 90, 60], [0, 40, 40, 40, 40], [1, -20, 8, 300, 30],
                     [0, 8, 8, 23.9, 40]], f32)
    top, shape = run('type: "ROIPooling" bottom: "x" bottom: "r" top: "y" '
                     "roi_pooling_param { pooled_h: 3 pooled_w: 4 spatial_scale: 0.125 }", x, rois)
    assert top.shape == shape == (5, 3, 3, 4)
    np.testing.assert_array_equal(top, roi_pool_reference(x, rois, 3, 4, 0.125))
    with pytest.raises(GraphError, match="batch"):
        run('type: "ROIPooling" bottom: "x" bottom: "r" top: "y" '
            "roi_pooling_param { pooled_h: 1 pooled_w: 1 }", x, np.array([[2, 0, 0, 1, 1]], f32))


def psroi_reference(x, rois, D_, G, scale):
    out = np.zeros((len(rois), D_, G, G), f32)
    H, W = x.shape[2:]
    for r, (b, *c) in enumerate(rois):  # psroi_pooling_layer.cu, PSROIPoolingForward
        xs, ys = f32(c_round(c[0])) * f32(scale), f32(c_round(c[1])) * f32(scale)
        xe, ye = f32(c_round(c[2]) + 1.0) * f32(scale), f32(c_round(c[3]) + 1.0) * f32(scale)
        bh, bw = max(ye - ys, f32(0.1)) / f32(G), max(xe - xs, f32(0.1)) / f32(G)
        for d, ph, pw in itertools.product(range(D_), range(G), range(G)):
            hs = min(max(int(np.floor(f32(ph) * bh + ys)), 0), H)
            he = min(max(int(np.ceil(f32(ph + 1) * bh + ys)), 0), H)
            ws = min(max(int(np.floor(f32(pw) * bw + xs)), 0), W)
            we = min(max(int(np.ceil(f32(pw + 1) * bw + xs)), 0), W)
            if he > hs and we > ws:
                out[r, d, ph, pw] = x[int(b), (d * G + ph) * G + pw, hs:he, ws:we].astype(f64).mean()
    return out


def test_psroi_pooling():
    x = RNG.standard_normal((2, 2 * 3 * 3, 10, 11)).astype(f32)
    rois = np.array([[0, 0, 0, 150, 150], [1, 17.5, 30, 95, 70], [0, 60, 60, 60, 60],
                     [1, -30, 5, 250, 20]], f32)
    top, shape = run('type: "PSROIPooling" bottom: "x" bottom: "r" top: "y" '
                     "psroi_pooling_param { spatial_scale: 0.0625 output_dim: 2 group_size: 3 }", x, rois)
    assert top.shape == shape == (4, 2, 3, 3)
    np.testing.assert_allclose(top, psroi_reference(x, rois, 2, 3, 0.0625), rtol=1e-5, atol=1e-6)
    with pytest.raises(GraphError, match="channels"):
        run('type: "PSROIPooling" bottom: "x" bottom: "r" top: "y" '
            "psroi_pooling_param { spatial_scale: 1 output_dim: 3 group_size: 3 }", x, rois)


def bilinear_reference(img, y, x):
    """Caffe2's bilinear_interpolate (roi_align_op.cc), one point."""
    H, W = img.shape[1:]
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return np.zeros(img.shape[0])
    y, x = max(y, f32(0)), max(x, f32(0))
    yl, xl = int(y), int(x)
    if yl >= H - 1:
        yh = yl = H - 1
        y = f32(yl)
    else:
        yh = yl + 1
    if xl >= W - 1:
        xh = xl = W - 1
        x = f32(xl)
    else:
        xh = xl + 1
    ly, lx = y - yl, x - xl
    hy, hx = 1 - ly, 1 - lx
    return (hy * hx * img[:, yl, xl] + hy * lx * img[:, yl, xh]
            + ly * hx * img[:, yh, xl] + ly * lx * img[:, yh, xh])


def roi_align_reference(x, rois, ph_n, pw_n, scale, ratio, end_mode):
    out = np.zeros((len(rois), x.shape[1], ph_n, pw_n))
    for r, (b, *c) in enumerate(rois):
        sx, sy = c[0] * f32(scale), c[1] * f32(scale)
        ex, ey = (c[2] + f32(end_mode)) * f32(scale), (c[3] + f32(end_mode)) * f32(scale)
        rw, rh = max(ex - sx, f32(1)), max(ey - sy, f32(1))
        bh, bw = rh / f32(ph_n), rw / f32(pw_n)
        gh = ratio if ratio > 0 else int(np.ceil(rh / f32(ph_n)))
        gw = ratio if ratio > 0 else int(np.ceil(rw / f32(pw_n)))
        for ph, pw in itertools.product(range(ph_n), range(pw_n)):
            acc = 0
            for iy, ix in itertools.product(range(gh), range(gw)):
                yy = sy + f32(ph) * bh + (f32(iy) + f32(0.5)) * bh / f32(gh)
                xx = sx + f32(pw) * bw + (f32(ix) + f32(0.5)) * bw / f32(gw)
                acc = acc + bilinear_reference(x[int(b)], yy, xx)
            out[r, :, ph, pw] = acc / (gh * gw)
    return out


@pytest.mark.parametrize("ratio, end_mode", [(-1, 0), (2, 0), (0, 1), (3, 1)])
def test_roi_align(ratio, end_mode):
    x = RNG.standard_normal((2, 3, 9, 12)).astype(f32)
    rois = np.array([[0, 0, 0, 60, 40], [1, 13.3, 7.1, 70.2, 66.6], [0, 30, 30, 30.5, 31],
                     [1, -40, -20, 120, 99], [0, 80, 60, 95, 71]], f32)
    top, shape = run('type: "ROIAlign" bottom: "x" bottom: "r" top: "y" roi_align_param { pooled_h: 2 '
                     f"pooled_w: 3 spatial_scale: 0.125 sampling_ratio: {ratio} roi_end_mode: {end_mode} }}",
                     x, rois)
    assert top.shape == shape == (5, 3, 2, 3)
    want = roi_align_reference(x, rois, 2, 3, 0.125, ratio, end_mode)
    np.testing.assert_allclose(top, want, rtol=1e-5, atol=1e-5)


def test_a_negative_aspect_ratio_makes_nan_priors_silently(tmp_path):
    """Caffe takes a negative aspect ratio and computes NaN box sizes (sqrt); the net is built, and the shapes
    inferred, without numpy's RuntimeWarnings."""
    import warnings

    from amct_caffe.io.graph_io import graph_from_net
    from amct_caffe.runtime import TEST, Net
    from amct_caffe.runtime.shapes import infer_shapes

    text = '''
layer { name: "data" type: "Input" top: "data" top: "feat"
        input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } shape { dim: 1 dim: 4 dim: 4 dim: 4 } } }
layer { name: "pb" type: "PriorBox" bottom: "feat" bottom: "data" top: "pb"
        prior_box_param { min_size: 8 aspect_ratio: -2 } }
'''
    p = tmp_path / "pb.prototxt"
    p.write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net = Net(str(p), TEST)
        out = net.forward(data=np.zeros((1, 3, 32, 32), np.float32), feat=np.zeros((1, 4, 4, 4), np.float32))
        from amct_caffe import io
        graph = graph_from_net(io.load_prototxt(p))
        infer_shapes(graph)
    assert np.isnan(out["pb"][0, 0]).any() and graph.blobs["pb"].shape == out["pb"].shape


@pytest.mark.skipif(D.NMS_KERNEL is None, reason="the C++ kernels are not built")
@pytest.mark.parametrize("seed", range(40))
def test_nms_kernel_keeps_the_boxes_the_numpy_loop_keeps(seed):
    """csrc/src/nms.cpp against nms_reference: overlapping, inverted, zero-size and NaN boxes, tied scores,
    fixed and adaptive thresholds."""
    rng = np.random.default_rng(seed)
    p = int(rng.integers(1, 400))
    xy = rng.uniform(0, 1, (p, 2)).astype(f32)
    wh = rng.uniform(-0.05, 0.4, (p, 2)).astype(f32) * (rng.random((p, 1)) < 0.95)  # some inverted, some points
    boxes = np.concatenate([xy, xy + wh], 1).astype(f32)
    boxes[rng.random(p) < 0.03, int(rng.integers(4))] = np.nan
    scores = np.round(rng.random(p), int(rng.integers(1, 4))).astype(f32)  # ties
    for eta, thr, top_k in [(1.0, 0.45, -1), (0.9, 0.7, 200), (0.5, 0.55, -1), (1.0, 0.0, 50), (1.0, 1.0, -1)]:
        got = D.nms_fast(boxes, scores, 0.05, thr, eta, top_k)
        cand = np.flatnonzero(scores > f32(0.05))
        cand = cand[np.argsort(-scores[cand], kind="stable")]
        cand = cand[:top_k] if top_k > -1 else cand
        want = D.nms_reference(boxes, D._bbox_size(boxes), cand, thr, eta)
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.int64


@pytest.mark.skipif(D.SORT_KERNEL is None, reason="the C++ kernels are not built")
@pytest.mark.parametrize("seed", range(30))
def test_std_sort_kernel_leaves_the_permutation_of_the_python_introsort(seed):
    """The keep_top_k cut sorts (score, (label, index)) pairs with libstdc++'s unstable std::sort: the kernel
    sorts indices by the same comparisons, so it must leave libstdcxx_sort_desc's permutation, ties included."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 3000))
    keys = np.round(rng.random(n), int(rng.integers(1, 3))).astype(f32)  # many ties
    got = D.SORT_KERNEL(keys)
    assert got.tolist() == D.libstdcxx_sort_desc(keys.tolist())


def test_prior_boxes_are_made_once_per_shape_and_handed_out_as_copies(monkeypatch):
    layer = make_layer('type: "PriorBox" bottom: "f" bottom: "i" top: "p" prior_box_param { min_size: 30 '
                       'aspect_ratio: 2 variance: 0.1 }')
    calls = []
    real = D.PriorBox
    monkeypatch.setattr(D.PriorBoxLayer, "op", staticmethod(lambda *a, **k: calls.append(1) or real(*a, **k)))
    feature, image = np.zeros((1, 2, 5, 6), f32), np.zeros((1, 3, 60, 72), f32)
    (first,) = layer.forward([feature, image])
    first[...] = -1  # a script writing into the top's array
    (second,) = layer.forward([feature, image])
    np.testing.assert_array_equal(second, real(feature, image, min_size=(30,), aspect_ratio=(2,), variance=(0.1,)))
    assert len(calls) == 1
    layer.forward([np.zeros((1, 2, 3, 3), f32), image])
    assert len(calls) == 2
