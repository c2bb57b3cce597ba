"""``amct-caffe inspect`` (a model's layers and what quantization does to each) and ``amct-caffe
create-config`` (the config to edit, then give to ``calibrate --config``)."""

from __future__ import annotations

import json

from amct_caffe.cli.options import api, check_files

KIND = {"weights_and_data": "weights+data", "data_only": "data only", None: "no"}


def _shape(shape) -> str:
    return "?" if shape is None else "x".join(map(str, shape))


def _table(rows: list[list[str]]) -> list[str]:
    """``rows`` (the first is the header) as left-aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def cmd_inspect(args) -> int:
    check_files(model=args.model, **({"weights": args.weights} if args.weights else {}))
    layers = api("amct_caffe.api.model_info", "describe_layers")(args.model, args.weights)
    if args.json:  # one layer a line
        print("[\n" + ",\n".join(f"  {json.dumps(layer)}" for layer in layers) + "\n]")
        return 0
    rows = [["LAYER", "TYPE", "OUTPUT SHAPE", "PARAMS", "QUANTIZABLE", "BY DEFAULT", "NOTE"]]
    for layer in layers:
        kind = layer["type"] if layer["config_type"] == layer["type"] else f"{layer['type']} ({layer['config_type']})"
        note = layer["note"] or ("switch on in the config" if layer["quantizable"] and not layer["by_default"]
                                 else "")
        rows.append([layer["name"], kind, ", ".join(_shape(s) for s in layer["top_shapes"]),
                     "?" if layer["params"] is None else f"{layer['params']:,}", KIND[layer["quant_kind"]],
                     ("yes" if layer["by_default"] else "no") if layer["quantizable"] else "-", note])
    for line in _table(rows):
        print(line)
    on = [layer for layer in layers if layer["by_default"]]
    weighted = sum(layer["quant_kind"] == "weights_and_data" for layer in on)
    off = sum(layer["quantizable"] and not layer["by_default"] for layer in layers)
    known = [layer["params"] for layer in layers if layer["params"] is not None]
    params = f"{sum(known):,}{'+' if len(known) < len(layers) else ''}"
    print(f"{len(layers)} layers, {params} parameters; quantized by default: {len(on)} ({weighted} weights+data, "
          f"{len(on) - weighted} data only); {off} more can be switched on (quant_enable in the config)")
    if not args.weights:
        print("without --weights the defaults come from the table of layer types; give --weights for the "
              "generated config's choice")
    return 0


def add_parsers(sub, common) -> None:
    ins = sub.add_parser("inspect", parents=[common],
                         help="list a model's layers, output shapes, parameters and what is quantized",
                         description="List the layers of a model in order: type, output shapes, parameter count, "
                                     "and whether each is quantizable (weights and data, or data only) and "
                                     "quantized by default. With --weights, shapes are checked against the "
                                     "weights and 'by default' is what create-config would write.")
    ins.add_argument("--model", required=True, help="network definition (.prototxt)")
    ins.add_argument("--weights", help="trained weights (.caffemodel); optional")
    ins.add_argument("--json", action="store_true",
                     help="print a JSON list, one object per layer: name, type, config_type, bottoms, tops, "
                          "top_shapes, params, quantizable, quant_kind, by_default, note")
    ins.set_defaults(func=cmd_inspect)
