"""PTQ of the recurrent sample models meets issue 14's targets on the held-out digits.

Every quantizable layer INT8 (the LSTM / RNN with its input, weights and hidden state): accuracy at
most 0.3 points below FP32's and a mean output cosine >= 0.999, for the fake-quant and the deploy
model (benchmarks/recurrent_ptq.py measures the same, with its figures).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.golden import SHARED

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not (SHARED / "data/mnist_5k.npz").exists(),
                                reason="../shared not beside the repository")


def _bench():
    spec = importlib.util.spec_from_file_location("recurrent_ptq", ROOT / "benchmarks" / "recurrent_ptq.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model", ["lstm_mnist", "rnn_mnist", "crnn_mnist"])
def test_int8_recurrent_models_keep_their_accuracy(model, tmp_path):
    bench = _bench()
    result = bench.measure(model, tmp_path)
    fp32 = result["fp32"]["correct"] / result["fp32"]["digits"]
    entry = (tmp_path / f"{model}_quant_param_record.txt").read_text()
    assert "scale_h" in entry and "scale_r" in entry   # the recurrent layer itself was quantized
    for kind in ("fake_quant", "deploy"):
        acc = result[kind]["correct"] / result[kind]["digits"]
        assert acc >= fp32 - 0.003, (kind, result)
        assert result[f"{kind}_cosine"] >= 0.999, (kind, result)
