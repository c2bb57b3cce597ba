"""``amct-caffe inspect`` (a model's layers and what quantization does to each) and ``amct-caffe
create-config`` (the config to edit, then give to ``calibrate --config``)."""

from __future__ import annotations

import json
import shlex

from pathlib import Path

from amct_caffe.cli.options import api, check_file, check_files, check_output_file, config_values, positive

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


def cmd_create_config(args) -> int:
    check_files(model=args.model, weights=args.weights)
    if args.cfg:
        check_file("--cfg", args.cfg)
    check_output_file("--output", args.output, ".json")
    batch_num, offset, _ = config_values(args)
    if args.cfg:  # the .cfg's values apply; the defaults keep create_quant_config from warning again
        batch_num, offset = 1, True
    create_quant_config = api("amct_caffe.api.calibration", "create_quant_config")
    create_quant_config(args.output, args.model, args.weights, batch_num=batch_num, activation_offset=offset,
                        config_defination=args.cfg)
    config = json.loads(Path(args.output).read_text(encoding="utf-8"))
    layers = {name: entry for name, entry in config.items() if isinstance(entry, dict) and "quant_enable" in entry}
    on = [name for name, entry in layers.items() if entry["quant_enable"]]
    print(f"config: {args.output}")
    print(f"{len(on)} layer(s) quantized, {len(layers) - len(on)} listed with quant_enable false; batch_num "
          f"{config.get('batch_num', 1)}, activation_offset {str(config.get('activation_offset', True)).lower()}")
    command = ["amct-caffe", "calibrate", "--model", args.model, "--weights", args.weights, "--config", args.output]
    print(f"next: edit it, then {shlex.join(command)} --data DATA --output PREFIX")
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

    cc = sub.add_parser("create-config", parents=[common],
                        help="write the quantization config (JSON) to edit and give to calibrate --config",
                        description="Write the full quantization config of a model (the guide's "
                                    "create_quant_config): one entry per quantizable layer with quant_enable and "
                                    "its parameters. Edit it (switch layers off or on, change the parameters), "
                                    "then calibrate with it: amct-caffe calibrate --config FILE.")
    cc.add_argument("--model", required=True, help="network definition (.prototxt)")
    cc.add_argument("--weights", required=True, help="trained weights (.caffemodel)")
    cc.add_argument("--output", required=True, metavar="CONFIG.json", help="the config file to write")
    cc.add_argument("--cfg", help="simple quantization config (.cfg, AMCTConfig text proto) to build it from; "
                                  "its batch_num and activation_offset win over the flags")
    cc.add_argument("--batch-num", type=positive, help="the config's batch_num (default 1)")
    cc.add_argument("--no-activation-offset", dest="activation_offset", action="store_false",
                    help="activation_offset false: symmetric activation quantization")
    cc.set_defaults(func=cmd_create_config)
