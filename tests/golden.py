"""Access to ../shared/golden: what official Caffe computed on the shared models.

Each case names a prototxt, a caffemodel and a golden .npz (layout in ../shared/golden/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = SHARED / "models"
GOLDEN = SHARED / "golden"


@dataclass(frozen=True)
class Case:
    name: str
    prototxt: Path
    weights: Path

    @property
    def golden(self) -> Path:
        return GOLDEN / f"{self.name}.npz"


CASES = [
    Case("lenet_mnist", MODELS / "lenet_mnist/lenet.prototxt", MODELS / "lenet_mnist/lenet_iter_10000.caffemodel"),
    Case("open_nsfw", MODELS / "open_nsfw/deploy.prototxt", MODELS / "open_nsfw/resnet_50_1by2_nsfw.caffemodel"),
    *[Case(f"mtcnn_det{i}", MODELS / f"mtcnn/det{i}.prototxt", MODELS / f"mtcnn/det{i}.caffemodel")
      for i in (1, 2, 3, 4)],
    Case("mtcnn_det1_large", MODELS / "mtcnn/det1.prototxt", MODELS / "mtcnn/det1.caffemodel"),
    Case("ultraface_slim320", MODELS / "ultraface_slim320/slim-320.prototxt",
         MODELS / "ultraface_slim320/slim-320.caffemodel"),
    Case("ultraface_rfb320", MODELS / "ultraface_rfb320/RFB-320.prototxt",
         MODELS / "ultraface_rfb320/RFB-320.caffemodel"),
    Case("hyperlpr_mininet_ssd", MODELS / "hyperlpr_mininet_ssd/mininet_ssd_v1.prototxt",
         MODELS / "hyperlpr_mininet_ssd/mininet_ssd_v1.caffemodel"),
    Case("squeezenet_v1.1_random", MODELS / "prototxt_only/SqueezeNet_v1.1_deploy.prototxt",
         GOLDEN / "squeezenet_v1.1_random.caffemodel"),
    Case("mobilenet_v2_random", MODELS / "prototxt_only/mobilenet_v2_deploy.prototxt",
         GOLDEN / "mobilenet_v2_random.caffemodel"),
]
CASES_BY_NAME = {c.name: c for c in CASES}


def inputs(z) -> dict[str, np.ndarray]:
    return {k.split(":", 1)[1]: z[k] for k in z.files if k.startswith("input:")}


def golden_blob_names(z) -> list[str]:
    """Blobs Caffe reported, minus the copies its automatic Split layers make."""
    names = [k.split(":", 1)[1] for k in z.files if k.startswith("shape:")]
    return [n for n in names if "_split_" not in n]


def compare(name: str, ours: np.ndarray, z) -> tuple[float, float]:
    """(max abs error, allowed) of our blob against the golden, on the stored elements.

    Allowed error is 1e-4 * max(1, max|golden|) (the README's agreement rule).
    """
    shape = tuple(z[f"shape:{name}"])
    assert ours.shape == shape, f"blob '{name}': shape {ours.shape}, Caffe has {shape}"
    stats = z[f"stats:{name}"]
    peak = max(abs(float(stats[3])), abs(float(stats[4])))
    allowed = 1e-4 * max(1.0, peak)
    flat = ours.reshape(-1)
    if f"blob:{name}" in z.files:
        ref = z[f"blob:{name}"].reshape(-1)
        got = flat
    else:
        ref = z[f"sample:{name}"]
        step = max(1, flat.size // 4096)
        got = flat[::step][:4096]
    err = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
    # The stats cover every element, so they also catch errors outside the stored sample.
    sum_err = abs(float(np.sum(flat, dtype=np.float64)) - float(stats[0]))
    sum_allowed = allowed * max(1, flat.size) ** 0.5 + 1e-5 * abs(float(stats[1]))
    assert sum_err <= sum_allowed, f"blob '{name}': sum {np.sum(flat)} vs Caffe {stats[0]}"
    return err, allowed


def run_case(case: Case):
    """Run our executor on a golden case; returns (net, npz)."""
    from amct_caffe.runtime import Net, TEST

    z = np.load(case.golden)
    net = Net(str(case.prototxt), str(case.weights), TEST)
    net.forward(**inputs(z))
    return net, z
