"""Make the example report of docs/accuracy.md: LeNet, the bundled sample, quantized and compared.

    python docs/accuracy/generate.py

Calibrates the bundled LeNet on 64 of the bundled MNIST digits (2 batches of 32), then compares the
fake-quant model with the float one on the other 436 digits; keeps report.json and the plots in
docs/accuracy/report/ (report.html, which embeds them, is left out of the repository).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from amct_caffe.api.accuracy import compare_model
    from amct_caffe.api.workflow import calibrate

    sample = ROOT / "samples/mnist"
    model, weights = sample / "lenet.prototxt", sample / "lenet_iter_10000.caffemodel"
    with np.load(sample / "mnist_500.npz") as z:
        x = z["images"][:, None].astype(np.float32) * np.float32(0.00390625)
    out = Path(__file__).with_name("report")
    with tempfile.TemporaryDirectory() as tmp:
        paths = calibrate(str(model), str(weights), [{"data": x[:32]}, {"data": x[32:64]}], f"{tmp}/q/lenet", 2,
                          progress=False)
        held_out = [{"data": x[i:i + 109]} for i in range(64, 500, 109)]
        compare_model(str(model), str(weights), paths["fake_quant_model"], paths["fake_quant_weights"], held_out,
                      f"{tmp}/report", batch_num=0, progress=False)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        for f in sorted(Path(tmp, "report").iterdir()):
            if f.suffix in (".json", ".png"):
                shutil.copy(f, out / f.name)
    sys.stdout.write(f"wrote {out}\n")


if __name__ == "__main__":
    main()
