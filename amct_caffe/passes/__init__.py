"""The quantization pipeline as graph passes (see docs/architecture.md).

* :mod:`.prepare` — BN fusion, BN+Scale+Bias acceleration and the choice of targets
  (:func:`~amct_caffe.passes.prepare.prepare`, ``prepare_from_record`` for convert_model);
* :mod:`.weights` — ARQ / SNQ weight quantization returning typed factors, update_bn's refresh;
* :mod:`.calibration` — the calibration graph (IFMR and BNUpdate layers);
* :mod:`.quantized_models` — the fake-quant and deploy graphs, the canonical record, quant.json;
* :mod:`.retrain` — the retrain (QAT) layers: inserted for training, stripped before saving.

The building blocks edit a graph in place and check it (:func:`fuse_bn_scale`,
:func:`accelerate_bn_scale_bias`, :func:`~amct_caffe.passes.calibration.insert_calibration_layers`);
the pipeline's passes copy the graph they are given and return new values. Passes never import the
executor (:mod:`amct_caffe.runtime`) and never touch files.
"""

from amct_caffe.passes.bn_acceleration import accelerate_bn_scale_bias
from amct_caffe.passes.fusion import fuse_bn_scale

__all__ = ["accelerate_bn_scale_bias", "fuse_bn_scale"]
