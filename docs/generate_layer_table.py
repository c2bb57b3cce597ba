"""Write docs/layers.md from the layer-type table (amct_caffe/ops.py) and the executor's registered layers.

    python docs/generate_layer_table.py          # rewrites docs/layers.md

tests/test_docs.py regenerates the page and fails when the committed one differs, so the table
cannot drift from the code.
"""

from __future__ import annotations

import sys
from pathlib import Path

HEADER = """# Layer types

Generated from the code by `python docs/generate_layer_table.py` (do not edit by hand): the layer-type
table `amct_caffe/ops.py` and the layers the embedded executor registers. *Quantization* is the user
guide's 支持量化的算子列表: weights and data (INT8 weights, Quant before and DeQuant after the layer) or data
only (Quant before, AntiQuant after); *default* says whether a generated config enables it
(`quant_enable: true`) or lists it disabled for you to switch on. A type the executor does not run can
still be quantized for a Caffe of your own (the guide's file flow), but not calibrated in the executor.
*Backward* is what training through the type does: *yes* (Caffe's Backward_cpu, tested against real
Caffe), *empty* (Caffe's backward is an empty body: no gradient crosses it, here as there), *-* (none:
a net that needs a gradient through it is refused, as Caffe aborts on it, or the type has no input).

| type | executor | backward | quantization | default | notes |
|---|---|---|---|---|---|
"""


def table() -> str:
    from amct_caffe import ops
    from amct_caffe.runtime import known_types, layer_class
    from amct_caffe.runtime.layer import EmptyBackward

    executor = set(known_types())
    names = list(ops.quantizable_types()) + sorted(executor - set(ops.quantizable_types()))
    rows = []
    for name in names:
        row = ops.layer_type(name)
        notes = []
        if row.per_tensor_only:
            notes.append("weights per tensor only")
        if row.snq:
            notes.append("SNQ (INT4) weights")
        if row.fusion_target:
            notes.append("BN fusion target")
        if row.recurrent:
            notes.append("recurrent")
        if row.quant_inputs is not None:
            notes.append("quantized input(s): " + ", ".join(str(i) for i in row.quant_inputs))
        if row.inserted:
            notes.append("inserted by amct_caffe")
        if name == ops.DEPTHWISE:
            notes.append("a Convolution with group = channels = num_output")
        kind = {ops.QuantKind.WEIGHTS_AND_DATA: "weights and data", ops.QuantKind.DATA_ONLY: "data only"}.get(
            row.quant, "-")
        default = ("on" if row.quant_by_default else "off") if row.quantizable else "-"
        runs = "yes" if name in executor or name == ops.DEPTHWISE else "no"
        backward = "-"
        if name in executor or name == ops.DEPTHWISE:
            cls = layer_class("Convolution" if name == ops.DEPTHWISE else name)
            backward = ("empty" if issubclass(cls, EmptyBackward) else "yes") if cls.has_backward() else "-"
        rows.append(f"| {name} | {runs} | {backward} | {kind} | {default} | {'; '.join(notes)} |")
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    out = Path(__file__).with_name("layers.md")
    out.write_text(table(), encoding="utf-8")
    sys.stdout.write(f"wrote {out}\n")
