"""``amct-caffe calibrate`` (post-training quantization) and ``amct-caffe convert`` (from a record)."""

from __future__ import annotations

import itertools
import logging

from amct_caffe.cli.compare import compared_instead
from amct_caffe.cli.options import (DATA_HELP, add_data_options, api, check_file, check_files, check_output,
                                    config_values, cosine, non_negative, open_data, positive, print_outputs)

_LOG = logging.getLogger(__name__)
MIN_CALIBRATION_SAMPLES = 32  # fewer: warn that the activation ranges are unreliable


def cmd_calibrate(args) -> int:
    from amct_caffe.data import model_inputs, time_major_inputs

    check_files(model=args.model, weights=args.weights)
    for flag, path in (("--config", args.config), ("--cfg", args.cfg), ("--preprocess", args.preprocess)):
        if path:
            check_file(flag, path)
    check_output(args.output)
    batch_num, offset, bn_iterations = config_values(args)
    source, _, batch_size = open_data(args, args.data, model_inputs(args.model), args.batch_size,
                                      time_major=time_major_inputs(args.model))
    # checks there is enough data before any work (a --config / --cfg sets the number of batches, not --batch-num)
    given = args.config or args.cfg
    source.batches(batch_num, f"--batch-size, or batch_num in {given}" if given else "--batch-size / --batch-num")
    # update_bn on a model with a BatchNorm to refresh runs bn_update_iterations forwards if more: the batches
    # are drawn as the calibration asks for them, up to that many (it says so if the data holds fewer)
    batches = source.batches(min(max(batch_num, bn_iterations), len(source)))
    # Decoding the first batch now finds an unreadable image, a bad LMDB record or a size mismatch
    # before the model is prepared, not minutes into the calibration.
    batches = itertools.chain([next(batches)], batches)
    _LOG.info("calibrating on %d batch(es) of %d from %s", batch_num, batch_size, source.describe())
    if batch_num * batch_size < MIN_CALIBRATION_SAMPLES:
        where = f"--batch-size, or batch_num in {args.config or args.cfg}" if args.config or args.cfg else \
            "--batch-num or --batch-size"
        _LOG.warning("calibrating on %d samples (%d batch(es) of %d): activation ranges from fewer than %d samples "
                     "are unreliable; give more with %s", batch_num * batch_size, batch_num, batch_size,
                     MIN_CALIBRATION_SAMPLES, where)
    if args.cfg:  # the .cfg's values apply; the defaults keep create_quant_config from warning again
        batch_num, offset = 1, True
    if args.target_cosine is not None:
        return _calibrate_with_fallback(args, batches, batch_num, offset)
    calibrate = api("amct_caffe.api.workflow", "calibrate")
    # the calibration shows its one progress bar (batches), ending at 100%
    result = calibrate(args.model, args.weights, batches, args.output, batch_num, config_file=args.config,
                       config_defination=args.cfg, activation_offset=offset, progress=args.progress)
    print_outputs(result, args.output)
    if args.summary:
        _summary(args, source.batch(0), result)
    return 0


def _summary(args, first_batch, result) -> None:
    """FP32 vs fake-quant INT8 on the first calibration batch: each output's cosine, the 3 layers adding the most
    error (amct_caffe.api.compare). ``first_batch`` is read again from the source: calibration consumed its
    iterator."""
    compare_batches = api("amct_caffe.api.compare", "compare_batches")
    _, summary, _ = compare_batches(args.model, args.weights, result["fake_quant_model"],
                                    result["fake_quant_weights"], [first_batch])
    print(f"FP32 vs INT8 on the first calibration batch ({summary['samples']} samples):")
    for line in compared_instead(summary):
        print(f"  {line}")
    for name, output in summary["outputs"].items():
        top1 = output["top1_agreement"]
        agreement = "" if top1 is None else f", top-1 agreement {100 * top1:.2f}%"
        print(f"  output {name}: cosine {output['cosine']:.10f}{agreement}")
    worst = summary["most_sensitive_layers"][:3]
    print("  layers adding the most error (rise in 1 - cosine): "
          + ", ".join(f"{w['layer']} {w['error_added']:.3e}" for w in worst))
    print("  every layer, on more data: amct-caffe compare (see its --help)")


def _calibrate_with_fallback(args, batches, batch_num: int, offset: bool) -> int:
    """calibrate, then keep the most quantization-sensitive layers float (amct_caffe.api.fallback)."""
    calibrate_with_fallback = api("amct_caffe.api.fallback", "calibrate_with_fallback")
    feeds = list(batches)  # read twice or three times: calibration, search, final calibration
    result = calibrate_with_fallback(args.model, args.weights, feeds, args.output, batch_num,
                                     target_cosine=args.target_cosine, max_float_layers=args.max_float_layers,
                                     config_file=args.config, config_defination=args.cfg,
                                     activation_offset=offset, metric=args.fallback_metric,
                                     progress=args.progress)
    print_outputs(result.outputs, args.output)
    # (8 decimals, or every digit where those would show a missed target as reached: 0.99999999999965 vs 1)
    digits = ".8f" if result.target_met or f"{result.cosine_final:.8f}" != f"{result.target_cosine:.8f}" else ".17g"
    print(f"output cosine ({args.fallback_metric}, FP32 vs INT8 on the calibration data): "
          f"all layers quantized {result.cosine_int8:{digits}}, "
          f"saved model {result.cosine_final:{digits}}, target {result.target_cosine:{digits}}"
          f"{'' if result.target_met else ' (NOT met)'}")
    print(f"layers the search moved to float: {', '.join(result.float_layers) if result.float_layers else 'none'}")
    if result.sensitivity:
        ranked = sorted(result.sensitivity.items(), key=lambda kv: -kv[1])[:10]
        print("most sensitive layers (1 - output cosine with only that layer quantized): "
              + ", ".join(f"{name} {loss:.3e}" for name, loss in ranked))
    return 0


def cmd_convert(args) -> int:
    check_files(model=args.model, weights=args.weights, record=args.record)
    check_output(args.output)
    convert_model = api("amct_caffe.api.convert", "convert_model")
    result = convert_model(args.model, args.weights, args.record, args.output)
    print_outputs(result, args.output)
    return 0


def add_parser(sub, common) -> None:
    cal = sub.add_parser("calibrate", parents=[common],
                         help="quantize a model, calibrating on images, arrays, an LMDB or a Record",
                         description="Post-training quantization: calibrate on --batch-num batches of "
                                     "--batch-size samples from --data and write the fake-quant and deploy "
                                     "models, <output>_fake_quant_model.prototxt, <output>_deploy_model.prototxt "
                                     "and their weights.")
    cal.add_argument("--model", required=True, help="network definition (.prototxt)")
    cal.add_argument("--weights", required=True, help="trained weights (.caffemodel)")
    cal.add_argument("--data", required=True, help=DATA_HELP)
    cal.add_argument("--batch-size", type=positive, default=0,
                     help="samples per batch (default: the model's)")
    cal.add_argument("--batch-num", type=positive,
                     help="calibration batches (default 1; a --config / --cfg file's batch_num wins)")
    group = cal.add_mutually_exclusive_group()
    group.add_argument("--config", help="quantization config (.json, as create_quant_config writes)")
    group.add_argument("--cfg", help="simple quantization config (.cfg, AMCTConfig text proto)")
    add_data_options(cal, "calibration")
    cal.add_argument("--no-activation-offset", dest="activation_offset", action="store_false",
                     help="symmetric activation quantization (no offset; a --config / --cfg file's "
                          "activation_offset wins)")
    cal.add_argument("--output", required=True, help="prefix of the files written (e.g. out/lenet)")
    fb = cal.add_argument_group("accuracy-based fallback (keeps the most quantization-sensitive layers float)")
    fb.add_argument("--target-cosine", type=cosine, metavar="C",
                    help="search, on the calibration data, for the fewest float layers that bring the mean "
                         "cosine of FP32 and INT8 outputs to C (e.g. 0.9995); writes <output>_fallback_config.json")
    fb.add_argument("--max-float-layers", type=non_negative, default=16, metavar="N",
                    help="at most N layers kept float (default 16)")
    fb.add_argument("--fallback-metric", choices=["worst_output", "all_outputs"], default="worst_output",
                    help="worst_output (default): every output blob's mean cosine must reach C; all_outputs: the "
                         "cosine of all outputs concatenated per sample")
    cal.add_argument("--no-summary", dest="summary", action="store_false",
                     help="do not end with the FP32 vs INT8 summary (output cosines and the layers adding the most "
                          "error on the first calibration batch; not printed with --target-cosine, which prints "
                          "its own)")
    cal.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    cal.set_defaults(func=cmd_calibrate)

    conv = sub.add_parser("convert", parents=[common], help="build quantized models from a scale/offset record",
                          description="Build the fake-quant and deploy models from your own scale/offset record "
                                      "(the guide's convert_model), without calibrating.")
    conv.add_argument("--model", required=True, help="network definition (.prototxt)")
    conv.add_argument("--weights", required=True, help="trained weights (.caffemodel)")
    conv.add_argument("--record", required=True, help="scale/offset record file (text proto)")
    conv.add_argument("--output", required=True, help="prefix of the files written")
    conv.set_defaults(func=cmd_convert)
