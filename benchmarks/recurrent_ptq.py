"""Post-training quantization of the recurrent sample models: FP32 against INT8 on held-out digits.

    python benchmarks/recurrent_ptq.py [--cases lstm_mnist,rnn_mnist,crnn_mnist] [--out DIR]

Models: ``samples/recurrent`` (LSTM and RNN reading an MNIST digit row by row, a CRNN reading four
digits side by side; trained in official Caffe, see its SOURCES.md). Every quantizable layer INT8 with
the guide's defaults (the recurrent layer's W_x, W_h and its input and hidden state included), through
:func:`amct_caffe.api.workflow.calibrate`. Calibration: the 500 training digits whose index is a multiple
of 10 (5 batches of 100 rows; for the CRNN 2 batches of 50 strips of them, classes mixed). Evaluation: the
1,000 held-out digits (``i % 5 == 4``), never seen by training or calibration.

Metrics, FP32 against the fake-quant model and against the deploy model (the executor's integer
simulation): held-out accuracy (digits; for the CRNN also whole strips), and the mean over samples of
cosine(FP32 prob, INT8 prob) (a digit's 10 probabilities; a strip's 8 x 10). Targets (issue 14):
accuracy drop <= 0.3 points, cosine >= 0.999.

Measured (2 cores shared with other jobs, load about 10)::

    model       FP32 digits  fake-quant   deploy      cosine fake / deploy     calibrate
    lstm_mnist  957/1000     957/1000     957/1000    0.999889 / 0.999891      0.6 s
    rnn_mnist   946/1000     946/1000     947/1000    0.999742 / 0.999738      5.3 s
    crnn_mnist  984/1000     984/1000     984/1000    0.999983 / 0.999981      1.7 s
                (strips 235/250 in all three)

``tests/api/test_recurrent_models_ptq.py`` asserts the targets with these functions.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "recurrent"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("AMCT_LOG_LEVEL", "WARNING")  # before amct_caffe configures its logging
sys.path.insert(0, str(SAMPLES / "src"))

import mnist_sequences as ms  # noqa: E402

import amct_caffe.runtime as caffe  # noqa: E402
from amct_caffe.api.workflow import calibrate  # noqa: E402

CASES = ("lstm_mnist", "rnn_mnist", "crnn_mnist")


def calibration_batches(model: str) -> list[dict[str, np.ndarray]]:
    """The training digits of index 10 k: 5 batches of 100 rows, or 2 batches of 50 strips (classes mixed)."""
    images, labels = ms.load()
    picked = np.arange(0, len(labels), 10)          # 500 digits, all training digits (i % 5 == 0)
    if model == "crnn_mnist":
        order = picked[np.arange(400) * 337 % 500].reshape(-1, ms.DIGITS)   # 100 strips
        data, _ = ms.strips(images, labels, order)
        return [{"data": data[i:i + 50], "cont": ms.cont(ms.DIGITS * ms.STEPS_PER_DIGIT, 50)} for i in (0, 50)]
    return [{"x": ms.rows(images[picked[i:i + 100]]), "cont": ms.cont(28, 100)} for i in range(0, 500, 100)]


def heldout_outputs(model: str, deploy: str, weights: str) -> np.ndarray:
    """prob for every held-out sample, (samples, ...) in the evaluation's order."""
    images, labels = ms.load()
    heldout = ms.split(len(labels))[1]
    net = caffe.Net(deploy, weights, caffe.TEST)
    out = []
    if model == "crnn_mnist":
        data, _ = ms.strips(images, labels, ms.heldout_order(heldout))
        batch = net.blobs["data"].data.shape[0]
        for i in range(0, len(data), batch):
            prob = net.forward(data=data[i:i + batch], cont=ms.cont(8, batch))["prob"]
            out.append(prob.transpose(1, 0, 2).reshape(batch, -1).copy())
    else:
        batch = net.blobs["x"].data.shape[1]
        for i in range(0, len(heldout), batch):
            out.append(net.forward(x=ms.rows(images[heldout[i:i + batch]]), cont=ms.cont(28, batch))["prob"].copy())
    return np.concatenate(out)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def measure(model: str, out: Path) -> dict:
    deploy, weights = str(SAMPLES / f"{model}_deploy.prototxt"), str(SAMPLES / f"{model}.caffemodel")
    batches = calibration_batches(model)
    start = time.perf_counter()
    calibrate(deploy, weights, batches, str(out / model), len(batches), progress=False)
    seconds = time.perf_counter() - start
    result = {"calibrate_s": seconds, "fp32": ms.heldout_accuracy(caffe, model, deploy, weights)}
    fp32 = heldout_outputs(model, deploy, weights)
    for kind in ("fake_quant", "deploy"):
        files = (str(out / f"{model}_{kind}_model.prototxt"), str(out / f"{model}_{kind}_weights.caffemodel"))
        result[kind] = ms.heldout_accuracy(caffe, model, *files)
        result[f"{kind}_cosine"] = mean_cosine(fp32, heldout_outputs(model, *files))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default=None, help="where the quantized models go (default: a temporary dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        for model in args.cases.split(","):
            r = measure(model, out)
            print(f"{model:11s} FP32 {r['fp32']}  fake-quant {r['fake_quant']} cosine {r['fake_quant_cosine']:.6f}  "
                  f"deploy {r['deploy']} cosine {r['deploy_cosine']:.6f}  calibrate {r['calibrate_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
