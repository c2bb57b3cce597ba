"""compare_model: the accuracy report of a quantized model against its float model (ours, beyond the guide).

It runs the FP32 and the quantized model (fake-quant or deploy) on the same data in the embedded
executor, compares every blob they share (:mod:`.compare`) and writes ``report.json``,
``report.html`` and the plots into ``output_dir`` (:mod:`.report`).
"""

from __future__ import annotations

import logging
import os

from tqdm import tqdm

from amct_caffe import log
from amct_caffe.api.compare import compare_batches
from amct_caffe.api.report import write_report
from amct_caffe.data import given_feeds
from amct_caffe.io.paths import checked_path, reading
from amct_caffe.runtime.memory import few_forwards

_LOG = logging.getLogger(__name__)


@few_forwards
def compare_model(model_file, weights_file, quant_model_file, quant_weights_file, data, output_dir,
                  batch_size: int = 0, batch_num: int = 1, preprocess=None, progress: bool = True,
                  dump: bool = False) -> dict:
    """Compare the FP32 and the quantized model blob by blob and write the report into ``output_dir``.

    ``data``: a data path as ``amct-caffe calibrate --data`` takes (then ``batch_size`` (0: the
    model's), ``batch_num`` and ``preprocess`` (a :class:`~amct_caffe.data.Preprocess` or its
    fields as a dict) apply), or a sequence of {input blob: array} batches (the first ``batch_num``
    are used; 0: all; one mapping is one batch). ``dump``: also every blob of both models for the
    first sample of the first batch, ``fp32_blobs.npz`` and ``quant_blobs.npz`` (the guide's
    dump_layer_outputs; keys are the blob names, intermediate values of in-place chains included).
    Returns ``{"json", "html", <plot>.png: path}`` (``fp32_blobs`` / ``quant_blobs`` with ``dump``)
    plus ``"summary"``.
    """
    log.setup()
    checked_path(output_dir, "output_dir")
    data_path = data if isinstance(data, (str, os.PathLike)) else None
    with reading(model_file=model_file, weights_file=weights_file, quant_model_file=quant_model_file,
                 quant_weights_file=quant_weights_file, data=data_path):
        feeds = given_feeds(data, model_file, "compare_model", batch_size, batch_num, preprocess)
        bar = tqdm(feeds, desc="compare", unit="batch", disable=not progress)
        reports, summary, comparison = compare_batches(model_file, weights_file, quant_model_file,
                                                       quant_weights_file, bar, every_blob=dump)
        paths = write_report(output_dir, reports, summary, comparison, feeds[0],
                             {"fp32": str(model_file), "quant": str(quant_model_file)}, dump=dump)
    _LOG.info("accuracy report written to %s (worst output cosine %s)", paths["html"],
              summary["worst_output_cosine"])
    return {**paths, "summary": summary}
