"""The guide's PTQ steps up to the calibration model, shared by the API tests."""

from __future__ import annotations

import json

import amct_caffe as amct


def calibration_model(tmp, proto, weights, batch_num: int = 1, edit_config=None, name: str = "modified"):
    """create_quant_config (optionally edited) -> init -> weights/activation quantization, in ``tmp``
    (config.json, record.txt, ``name``.prototxt / .caffemodel).

    Returns ``(graph, model_file, weights_file)`` of the calibration model, to be run
    ``batch_num`` times before save_model.
    """
    config = tmp / "config.json"
    amct.create_quant_config(str(config), str(proto), str(weights), batch_num=batch_num)
    if edit_config is not None:
        content = json.loads(config.read_text())
        edit_config(content)
        config.write_text(json.dumps(content))
    graph = amct.init(str(config), str(proto), str(weights), str(tmp / "record.txt"))
    mm, mw = str(tmp / f"{name}.prototxt"), str(tmp / f"{name}.caffemodel")
    amct.weights_quantize_model(graph, mm, mw)
    amct.activation_quantize_model(graph, mm, mw)
    return graph, mm, mw
