"""``amct-caffe compare``: where a quantized model loses accuracy, blob by blob (the accuracy report).

It calls :func:`amct_caffe.api.accuracy.compare_model` on data read as ``calibrate`` reads it and
prints the report's headline figures; report.html in --output has the rest.
"""

from __future__ import annotations

from amct_caffe.cli.options import (DATA_HELP, add_data_options, api, check_file, check_files, check_output_dir,
                                    open_data, positive)


def compared_instead(summary: dict) -> list[str]:
    """One line per output compared through the blobs it is computed from (a detection list), or not at all."""
    return [f"output {name} (its shape may depend on the data) compared through: {', '.join(blobs)}" if blobs else
            f"output {name} does not depend on the input's values (priors): not compared"
            for name, blobs in summary.get("compared_instead", {}).items()]


def headline(summary: dict) -> list[str]:
    """The report's summary in a few lines: worst output cosine, top-1 agreement, the 3 layers adding the most
    error."""
    outputs = summary["outputs"]
    lines = compared_instead(summary)
    if outputs:
        nan_first = api("amct_caffe.api.compare", "nan_first")  # an output gone non-finite is the worst
        worst = min(outputs, key=lambda name: nan_first(outputs[name]["cosine"]))
        lines.append(f"worst output cosine: {outputs[worst]['cosine']:.10f} ({worst})")
    if summary["top1_agreement"] is not None:
        lines.append(f"top-1 agreement: {100 * summary['top1_agreement']:.2f}%")
    ranked = summary["most_sensitive_layers"][:3]
    lines.append("layers adding the most error (rise in 1 - cosine): "
                 + ", ".join(f"{r['layer']} {r['error_added']:.3e}" for r in ranked))
    return lines


def cmd_compare(args) -> int:
    from amct_caffe.data import model_inputs, time_major_inputs

    check_files(model=args.model, weights=args.weights)
    check_file("quantized model file", args.quant_model)
    check_file("quantized weights file", args.quant_weights)
    check_output_dir("--output", args.output)
    source, _, _ = open_data(args, args.data, model_inputs(args.model), args.batch_size,
                             time_major=time_major_inputs(args.model))
    check_output_dir("--output", args.output)  # again: open_data adds the data's per-input sub-folders
    source.batches(args.batch_num)  # enough data? before any work
    compare_model = api("amct_caffe.api.accuracy", "compare_model")
    result = compare_model(args.model, args.weights, args.quant_model, args.quant_weights, source, args.output,
                           batch_num=args.batch_num, progress=args.progress, dump=args.dump)
    summary = result["summary"]
    print(f"FP32 vs quantized on {summary['samples']} samples, {summary['blobs_compared']} blobs compared")
    for line in headline(summary):
        print(line)
    if args.dump:
        print(f"blobs of the first sample: {result['fp32_blobs']}, {result['quant_blobs']}")
    print(f"report: {result['html']} (figures: {result['json']})")
    return 0


def add_parser(sub, common) -> None:
    cmp = sub.add_parser("compare", parents=[common],
                         help="compare a quantized model with its float model, blob by blob (accuracy report)",
                         description="Run the float and the quantized model (fake-quant or deploy, as calibrate "
                                     "wrote it) on the same data and compare every blob they share: cosine, "
                                     "SQNR, errors, top-1 agreement of classifier outputs, the error each layer "
                                     "adds. Prints the headline figures and writes report.json, report.html and "
                                     "plots into --output.")
    cmp.add_argument("--model", required=True, help="the float network definition (.prototxt)")
    cmp.add_argument("--weights", required=True, help="the float weights (.caffemodel)")
    cmp.add_argument("--quant-model", required=True,
                     help="the quantized model, e.g. <prefix>_fake_quant_model.prototxt")
    cmp.add_argument("--quant-weights", required=True,
                     help="its weights, e.g. <prefix>_fake_quant_weights.caffemodel")
    cmp.add_argument("--data", required=True, help=DATA_HELP)
    cmp.add_argument("--batch-size", type=positive, default=0, help="samples per batch (default: the model's)")
    cmp.add_argument("--batch-num", type=positive, default=1, help="batches compared (default 1)")
    add_data_options(cmp, "the comparison")
    cmp.add_argument("--output", required=True, metavar="DIR", help="folder of the report (created if needed)")
    cmp.add_argument("--dump", action="store_true",
                     help="also save every blob of both models for the first sample: fp32_blobs.npz, "
                          "quant_blobs.npz")
    cmp.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    cmp.set_defaults(func=cmd_compare)
