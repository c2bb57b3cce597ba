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

FOOTER = """
## Python layers

A `type: "Python"` layer runs the class `python_param.layer` of the module `python_param.module`, as
Caffe built with `WITH_PYTHON_LAYER` does: the module must be importable (its directory on
`PYTHONPATH`), and building a Net of the model runs its code, so load such models from sources you
trust. While the Net imports the module and calls it, `import caffe` gives `amct_caffe.runtime` (for every
thread, until the last call ends): its `Layer` is pycaffe's base class, with `Blob`, `Net`, `TRAIN` / `TEST`,
the solvers, `caffe.io` and `caffe.proto.caffe_pb2`, so a layer written against those runs unchanged.
NetSpec is not there: `caffe.layers` is the executor's own package, and `import caffe.net_spec` fails
with an error that says so.

The calls are Caffe's (the class defines `setup` and `reshape`, as Caffe needs, and `forward`): the
object gets `param_str` and `phase`; `setup(bottom, top)` then
`reshape(bottom, top)` when the Net is built (on bottoms holding zeros: what an earlier layer's setup
wrote there, which Caffe would pass on, is not); `reshape` then `forward` on every forward, and `reshape`
on `Net.reshape()`, with the Net's data; `backward(top, propagate_down, bottom)` in training. Blobs have
pycaffe's `data`, `diff`, `reshape(*shape)`, `shape` and `count`; as in pycaffe, the bottoms' and tops'
`data` and `diff` are written into, never rebound. The learned blobs the layer makes
(`self.blobs.add_blob(*shape)` in `setup` or its first `reshape`) are the Net's `params` themselves: read
from and saved to the caffemodel, trained in place by the solvers, and left as the layer made them when
the caffemodel has none for it; one shared by name (`param { name }`) reads and writes its owner's data
and diff, also through the object the layer keeps. `net.layers[i]` and `net.layer_dict[name]` reach the
layer's own attributes and methods (py-faster-rcnn's `set_roidb`, a `_roidb`), except the names the
executor's side has itself (`name`, `blobs`, `phase`, `reshape`, `forward`, `backward`, `param`).
`tests/training/test_python_layer.py` runs such a module (a data layer, learned blobs, an in-place
layer, tops whose size follows the data, a loss) in official Caffe and here: data, diffs and
gradients agree.

Where it differs:

* its tops take the shape its `forward` gives them, so the layers after it run the Net's per-layer
  path. The output figures (the report's worst output, the fallback's target, label-free QAT's loss)
  stand on the blobs before the first Python layer, as for SSD's detection output, since the shapes
  after it may differ between the float and the quantized model (a proposal list); a warning says
  when quantized layers sit in between (`calibrate_with_fallback`'s `compare_blobs` names blobs of
  fixed shape to measure instead). The accuracy report still compares every blob after it while both
  models give it one item per sample (a custom activation does; a selection of rows does not), and leaves
  one out, with a warning, from the first batch where they do not;
* the Net keeps a copy of each top after the forward, so no array it handed out changes later;
* config generation and the guide's file flow never import the module: they quantize the layers
  around it on the prototxt alone, and the Net run for calibration imports it;
* a Python layer without bottoms gets no `backward` call (Caffe makes one under `force_backward`);
* once this runtime has imported a module, official pycaffe cannot build it in the same process (its
  classes derive from our `caffe.Layer`; Boost.Python's error says no converter is registered), and the
  other way round (this runtime's error says so and what to do);
* a module or class that cannot be loaded is an UnsupportedLayerError naming the layer, and an
  exception in its code a GraphError naming the layer and its class, the original chained for its
  traceback.
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
        if name in executor and layer_class(name).runs_user_code:
            notes.append("your module's code, as Caffe's WITH_PYTHON_LAYER runs it (see below)")
        kind = {ops.QuantKind.WEIGHTS_AND_DATA: "weights and data", ops.QuantKind.DATA_ONLY: "data only"}.get(
            row.quant, "-")
        default = ("on" if row.quant_by_default else "off") if row.quantizable else "-"
        runs = "yes" if name in executor or name == ops.DEPTHWISE else "no"
        backward = "-"
        if name in executor or name == ops.DEPTHWISE:
            cls = layer_class("Convolution" if name == ops.DEPTHWISE else name)
            backward = ("empty" if issubclass(cls, EmptyBackward) else "yes") if cls.has_backward() else "-"
        rows.append(f"| {name} | {runs} | {backward} | {kind} | {default} | {'; '.join(notes)} |")
    return HEADER + "\n".join(rows) + "\n" + FOOTER


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    out = Path(__file__).with_name("layers.md")
    out.write_text(table(), encoding="utf-8")
    sys.stdout.write(f"wrote {out}\n")
