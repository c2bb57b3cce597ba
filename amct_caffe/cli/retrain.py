"""``amct-caffe retrain``: label-free quantization-aware training (:mod:`amct_caffe.api.label_free`).

The quantized network learns to reproduce the float network's outputs on unlabelled data, then the
files ``calibrate`` writes are written.
"""

from __future__ import annotations

import argparse
import logging

from amct_caffe.cli.options import (DATA_HELP, add_data_options, api, check_file, check_files, check_output, finite,
                                    open_data, positive, print_outputs)
from amct_caffe.errors import AmctError

_LOG = logging.getLogger(__name__)
MIN_SAMPLES = 32  # fewer: warn that the network will fit these samples, not the data they stand for


def non_negative_rate(text: str) -> float:
    value = finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def cmd_retrain(args) -> int:
    from amct_caffe.data import model_inputs, time_major_inputs

    check_files(model=args.model, weights=args.weights)
    if args.preprocess:
        check_file("--preprocess", args.preprocess)
    check_output(args.output)
    # The FP32 targets and the calibration run in batches of the model's own size (a deploy prototxt may fix
    # it, e.g. in a Reshape); --batch-size is the training batch.
    source, _, model_batch = open_data(args, args.data, model_inputs(args.model), 0,
                                       time_major=time_major_inputs(args.model))
    samples = source.num_samples
    if len(source) == 0:
        raise AmctError(f"--data: {source.holds()}, fewer than one batch of the model's {model_batch}: give more "
                        "data, or a smaller batch with --input-shape")
    if samples % model_batch:
        _LOG.warning("%d of the %d samples do not fill a batch of %d and are left out", samples % model_batch,
                     samples, model_batch)
        samples -= samples % model_batch
    if args.batch_size and args.batch_size > samples:
        raise AmctError(f"--batch-size {args.batch_size} is larger than the {samples} sample(s) of {args.data}")
    # Decoding the first batch now finds an unreadable image or a size mismatch before any work.
    source.batch(0)
    if samples < MIN_SAMPLES:
        _LOG.warning("retraining on %d samples: with fewer than %d the quantized network fits these samples rather "
                     "than the data they stand for; give more with --data / --select", samples, MIN_SAMPLES)
    _LOG.info("label-free retraining on %d sample(s) from %s", samples, source.describe())
    retrain = api("amct_caffe.api.label_free", "label_free_retrain")
    result = retrain(args.model, args.weights, source, args.output, iterations=args.iterations,
                     batch_size=args.batch_size, clip_lr=args.clip_lr, weight_lr=args.weight_lr,
                     equalize=args.equalize, rounding=args.rounding, per_sample_loss=args.per_sample_loss,
                     progress=args.progress)
    print_outputs(result.outputs, args.output)
    ratio = ("the mean over samples of |INT8 - FP32|^2 / |FP32|^2" if args.per_sample_loss
             else "mean |INT8 - FP32|^2 / mean |FP32|^2 over the samples")
    print(f"distilled: {', '.join(result.targets)}")
    run = len(result.losses)  # fewer than asked when training diverged (a warning said where)
    counted = (f"{run} iterations" if run == result.iterations else
               f"the {run} iteration(s) before training diverged (of {result.iterations})")
    if run:
        print(f"distillation loss (sum over those blobs of {ratio}), mean of the first / last tenth of "
              f"{counted} of {result.batch_size} sample(s): {result.loss_start:.4e} -> {result.loss_end:.4e}")
    else:
        print(f"distillation loss: training diverged at its first iteration (of {result.iterations})")
    losses = [("PTQ", result.data_loss_ptq), ("training start", result.data_loss_before),
              ("trained", result.data_loss_after)]  # PTQ's is measured only when the rounding gives another start
    print(f"saved: the {'PTQ' if result.kept == 'ptq' else result.kept} model (distillation loss over the data: "
          + ", ".join(f"{name} {value:.4e}" for name, value in losses if value == value) + ")")
    return 0


# label_free_retrain's defaults, repeated for --help: the parser must not import the API (numpy...) before
# the command takes charge of Ctrl-C; tests/test_cli_retrain.py checks that they agree.
CLIP_LR, WEIGHT_LR, DEFAULT_EPOCHS, MIN_ITERATIONS = 5e-3, 5e-2, 3, 200


def add_parser(sub, common) -> None:
    ret = sub.add_parser("retrain", parents=[common],
                         help="quantization-aware training without labels: the INT8 model learns the FP32 outputs",
                         description="Label-free quantization-aware training: starting from the calibrated (PTQ) "
                                     "model, the INT8 weights are rounded layer by layer towards the float "
                                     "network's outputs and the activation clips are trained to reproduce them on "
                                     "--data, which needs no labels. "
                                     "Writes the files calibrate writes: <output>_fake_quant_model.prototxt, "
                                     "<output>_deploy_model.prototxt, their weights and the record.")
    ret.add_argument("--model", required=True, help="float deploy network definition (.prototxt)")
    ret.add_argument("--weights", required=True, help="trained weights (.caffemodel)")
    ret.add_argument("--data", required=True, help=DATA_HELP + " (no labels needed)")
    ret.add_argument("--batch-size", type=positive, default=0,
                     help="samples per training iteration (default: the model's)")
    ret.add_argument("--iterations", type=positive, metavar="N",
                     help=f"training iterations (default: {DEFAULT_EPOCHS} passes over the data, at least "
                          f"{MIN_ITERATIONS})")
    ret.add_argument("--clip-lr", type=non_negative_rate, default=CLIP_LR, metavar="R",
                     help=f"largest step of a clip per iteration, relative to its calibrated range (default "
                          f"{CLIP_LR:g}; 0 freezes the clips)")
    ret.add_argument("--weight-lr", type=non_negative_rate, default=None, metavar="R",
                     help="largest step of a weight per iteration, in INT8 weight steps (default: 0 after the "
                          f"learned rounding, which keeps weights and biases on their learned codes; {WEIGHT_LR:g} "
                          "with --no-rounding; 0 freezes weights and biases)")
    ret.add_argument("--no-equalize", dest="equalize", action="store_false",
                     help="do not equalize the channel ranges before depthwise convolutions")
    ret.add_argument("--no-rounding", dest="rounding", action="store_false",
                     help="start training from ARQ's nearest weight codes, not from the learned rounding")
    ret.add_argument("--no-per-sample-loss", dest="per_sample_loss", action="store_false",
                     help="divide the distillation error by the outputs' mean energy over the data, not by each "
                          "sample's own (larger outputs then count more)")
    add_data_options(ret, "training")
    ret.add_argument("--output", required=True, help="prefix of the files written (e.g. out/model)")
    ret.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    ret.set_defaults(func=cmd_retrain)
