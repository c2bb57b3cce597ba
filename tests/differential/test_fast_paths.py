"""The float executor's fast paths against official Caffe, on random mid-size networks.

The random nets of test_differential.py are tiny (maps of at most 9 pixels a side, at most 6 channels),
so the paths a float model takes at real sizes rarely run there: Convolution -> BatchNorm -> Scale ->
ReLU chains folded into one affine map (runtime/fold.py), Winograd F(2x2) / F(4x4) for 3x3 stride-1
convolutions, the pointwise kernel for 1x1 ones, the depthwise and direct kernels, a residual Eltwise SUM
and its ReLU fused into the chain before it. Here every net is a stack of such blocks on maps of 5 to 60
pixels and 8 to 160 channels. Caffe fills the weights (tests/differential/caffe_runner.py: BatchNorm with
positive variance, statistics that do not normalize), and every blob of the executor's default Net must be
within 1e-4 of its largest value from Caffe's, after the first forward and after the prepared second one
(test_differential.compare_net).

No TanH / Sigmoid / ReLU6 here: with such weights, pre-activations grow to hundreds, and a squashing layer
turns float32 rounding that differs from Caffe's by an ulp (in any layer, folded or not) into more than
1e-4 of its [-1, 1] output, as Caffe differs from float64 by as much. A chain squashed straight away runs
EXACT (runtime/fold.py; tests/runtime/test_fold.py).

``AMCT_FAST_NETS`` sets the number of nets (default 40, about 5 s with Caffe's forwards).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.differential.test_differential import compare_net, run_caffe_on, write_net

pytestmark = pytest.mark.real_caffe

NETS = int(os.environ.get("AMCT_FAST_NETS", "40"))
SEED = 2026


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


class _Stack:
    """A prototxt built block by block, tracking the current blob and its (N, C, H, W)."""

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int, int, int]):
        self.rng, self.shape, self.lines, self.count = rng, shape, [], 0
        n, c, h, w = shape
        self.lines.append(f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: {n} '
                          f'dim: {c} dim: {h} dim: {w} }} }} }}')
        self.top = "data"

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def conv(self, out: int, k: int, stride: int = 1, pad: int = 0, group: int = 1, dilation: int = 1,
             bottom: str | None = None, shape=None) -> str:
        n, c, h, w = shape or self.shape
        top = self.name("conv")
        bias = "" if self.rng.random() < 0.8 else " bias_term: false"
        dil = f" dilation: {dilation}" if dilation > 1 else ""
        grp = f" group: {group}" if group > 1 else ""
        self.lines.append(f'layer {{ name: "{top}" type: "Convolution" bottom: "{bottom or self.top}" top: "{top}" '
                          f'convolution_param {{ num_output: {out} kernel_size: {k} stride: {stride} pad: {pad}'
                          f'{dil}{grp}{bias} }} }}')
        self.top = top
        self.shape = (n, out, _conv_out(h, k, stride, pad, dilation), _conv_out(w, k, stride, pad, dilation))
        return top

    def in_place(self, affine: bool, activation: str | None) -> None:
        t = self.top
        if affine:
            # a BatchNorm writing a top of its own (MobileNet-v2's "conv1" -> "conv1/bn"), the rest in place on it
            bottom, t = t, (self.name("bnout") if self.rng.random() < 0.3 else t)
            self.lines.append(f'layer {{ name: "{self.name("bn")}" type: "BatchNorm" bottom: "{bottom}" top: "{t}" '
                              'batch_norm_param { use_global_stats: true } }')
            self.top = t
            if self.rng.random() < 0.85:  # a BatchNorm without its Scale folds too
                self.lines.append(f'layer {{ name: "{self.name("scale")}" type: "Scale" bottom: "{t}" top: "{t}" '
                                  'scale_param { bias_term: true } }')
        if activation:
            self.lines.append(f'layer {{ name: "{self.name(activation.lower())}" type: "{activation}" '
                              f'bottom: "{t}" top: "{t}" }}')

    def residual(self) -> None:
        """x -> 3x3 chain -> 3x3 or 1x1 chain without activation -> Eltwise SUM with x -> ReLU in place."""
        x, shape = self.top, self.shape
        self.conv(shape[1], 3, pad=1)
        self.in_place(True, "ReLU")
        k = int(self.rng.choice([1, 3]))
        self.conv(shape[1], k, pad=k // 2)
        self.in_place(True, None)
        top = self.name("sum")
        self.lines.append(f'layer {{ name: "{top}" type: "Eltwise" bottom: "{x}" bottom: "{self.top}" top: "{top}" }}')
        self.lines.append(f'layer {{ name: "{self.name("relu")}" type: "ReLU" bottom: "{top}" top: "{top}" }}')
        self.top = top

    def block(self) -> None:
        rng = self.rng
        _, c, h, w = self.shape
        kind = rng.choice(["conv", "conv", "pointwise", "depthwise", "residual", "pool"])
        if kind == "residual" and min(h, w) >= 3:
            self.residual()
            return
        if kind == "pool" and min(h, w) >= 6:
            top = self.name("pool")
            pool = "MAX" if rng.random() < 0.6 else "AVE"
            self.lines.append(f'layer {{ name: "{top}" type: "Pooling" bottom: "{self.top}" top: "{top}" '
                              f'pooling_param {{ pool: {pool} kernel_size: 2 stride: 2 }} }}')
            n = self.shape[0]
            self.top, self.shape = top, (n, c, -(-(h - 2) // 2) + 1, -(-(w - 2) // 2) + 1)
            return
        stride = 2 if min(h, w) >= 12 and rng.random() < 0.3 else 1
        if kind == "pointwise":
            self.conv(int(rng.choice([8, 16, 24, 32, 64, 96, 128, 129, 160])), 1, stride=stride)
        elif kind == "depthwise":
            self.conv(c * int(rng.choice([1, 1, 2])), 3, stride=stride, pad=1, group=c)
        else:
            k = int(rng.choice([3, 3, 3, 5, 7])) if min(h, w) >= 7 else 3
            dilation = 2 if k == 3 and min(h, w) >= 9 and rng.random() < 0.15 else 1
            group = 2 if c % 2 == 0 and rng.random() < 0.15 else 1
            out = int(rng.integers(4, 49)) * group
            self.conv(out, k, stride=stride, pad=int(rng.integers(0, k // 2 + 2)),
                      group=group, dilation=dilation)
            if min(self.shape[2:]) < 1:
                raise ValueError("map vanished")
        self.in_place(rng.random() < 0.85, str(rng.choice(["ReLU", "ReLU", "ReLU", "PReLU", ""])) or None)


def generate(seed: int, index: int) -> tuple[str, dict[str, np.ndarray]]:
    """One random net of 3 to 7 blocks and its input (standard normal values, or raw 0..255 pixels)."""
    rng = np.random.default_rng((seed, index))
    while True:
        shape = (int(rng.choice([1, 1, 2, 4])), int(rng.choice([3, 3, 8, 16, 32, 48])), int(rng.integers(5, 61)),
                 int(rng.integers(5, 61)))
        stack = _Stack(rng, shape)
        try:
            for _ in range(int(rng.integers(3, 8))):
                stack.block()
        except ValueError:  # a map shrank to nothing: draw another net
            continue
        if min(stack.shape[2:]) >= 1:
            break
    x = rng.standard_normal(shape) if rng.random() < 0.7 else np.floor(rng.uniform(0, 256, shape))
    return "\n".join(stack.lines) + "\n", {"data": x.astype(np.float32)}


def test_mid_size_nets_on_the_fast_paths_agree_with_caffe(tmp_path):
    entries, texts = [], {}
    for i in range(NETS):
        text, inputs = generate(SEED, i)
        name = f"fast{i}"
        texts[name] = text
        entries.append(write_net(tmp_path, name, text, inputs, seed=i))
    results = run_caffe_on(tmp_path, entries)
    failures = []
    for name, text in texts.items():
        if results[name]["status"] != "ok":
            failures.append(f"{name}: Caffe refused it: {results[name]['log'][-300:]}")
            continue
        failures += [f"{name}: {p}" for p in compare_net(tmp_path, name, text)]
    assert not failures, "\n".join(failures[:20]) + f"\n(prototxts in {tmp_path})"
