"""Quantization-aware training of LeNet, after the user guide's ResNet50_retrain.py sample.

    python samples/mnist/src/mnist_retrain.py [--model_file M] [--weights_file W] [--gpu GPU_ID] [--cpu]
        [--caffe_dir CAFFE_DIR] [--train_data LMDB] [--test_data LMDB] [--train_batch 64]
        [--train_iter 100] [--test_batch 50] [--test_iter 2]

The guide's flow: create_quant_retrain_config -> create_quant_retrain_model -> train the modified
model with an SGDSolver (the guide's solver: step policy, test_initialization false, one TEST at
the end, which writes the record) -> save_quant_retrain_model('Both'). Without ``--caffe_dir`` the
training runs in amct_caffe's embedded runtime; with it, in the real Caffe built there (patched by
``caffe_patch/install.py`` so it has the retrain layers); ``--gpu`` runs that Caffe on a GPU
(``--cpu``, the default, on the CPU; the embedded runtime has the CPU only). Defaults: the bundled
LeNet and its train/test prototxt, on LMDBs written from the bundled digits (400 to train, 100 to
test); the guide's ResNet-50 defaults (batch 32, 1000 iterations, 500 test batches of 1) suit
ImageNet, not these 500 digits.

Writes, in the directory it runs from: ``tmp/`` (config.json, modified_model.prototxt /
.caffemodel, record.txt, solver.prototxt, the snapshots), ``results/retrain_results/retrain_*``
(fake-quant and deploy models, quant_param_record, and, as the guide's sample writes,
``retrain_atc_model.prototxt``: the deploy model with its Data layer replaced by an Input of the
test batch's shape and the layers that read the labels (Accuracy, SoftmaxWithLoss) removed, for the
SoC compiler) and ``amct_log/amct_caffe.log``; prints the test accuracy of the float model, of the
fake-quant model and of the deploy model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_file", default=str(HERE / "lenet_train_test.prototxt"),
                    help="TRAIN/TEST prototxt (Data layers named as Caffe's examples/mnist ones are pointed "
                         "at --train_data / --test_data)")
    ap.add_argument("--weights_file", default=str(HERE / "lenet_iter_10000.caffemodel"))
    ap.add_argument("--train_data", help="training LMDB (default: written from the bundled digits)")
    ap.add_argument("--test_data", help="test LMDB (default: written from the bundled digits)")
    ap.add_argument("--train_batch", type=int, default=64)
    ap.add_argument("--train_iter", type=int, default=100)
    ap.add_argument("--test_batch", type=int, default=50)
    ap.add_argument("--test_iter", type=int, default=2)
    ap.add_argument("--caffe_dir", help="train in this (patched) Caffe instead of the embedded runtime")
    device = ap.add_mutually_exclusive_group()
    device.add_argument("--gpu", type=int, metavar="GPU_ID", help="run --caffe_dir's Caffe on this GPU")
    device.add_argument("--cpu", action="store_true", help="run on the CPU (the default)")
    args = ap.parse_args(argv)
    if args.gpu is not None and not args.caffe_dir:
        ap.error("--gpu needs --caffe_dir (a Caffe built with CUDA): the embedded runtime runs on the CPU")
    return args


def data_model(args, tmp: Path) -> Path:
    """The user's TRAIN/TEST prototxt with its Data layers on our LMDBs and batch sizes."""
    if args.train_data is None or args.test_data is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from train_lenet import make_lmdbs  # the same bundled digits as the training sample

        train, test = make_lmdbs(tmp)
        args.train_data = args.train_data or str(train)
        args.test_data = args.test_data or str(test)
    text = Path(args.model_file).read_text()
    text = text.replace("examples/mnist/mnist_train_lmdb", args.train_data)
    text = text.replace("examples/mnist/mnist_test_lmdb", args.test_data)
    text = text.replace("batch_size: 64", f"batch_size: {args.train_batch}")
    text = text.replace("batch_size: 100", f"batch_size: {args.test_batch}")
    out = tmp / "model.prototxt"
    out.write_text(text)
    return out


def test_accuracy(caffe, model: Path, weights: Path, iterations: int) -> tuple[float, tuple[int, ...]]:
    """The mean accuracy over ``iterations`` TEST batches, and the shape of the net's first top (the images)."""
    net = caffe.Net(str(model), str(weights), caffe.TEST)
    accuracy = float(np.mean([float(net.forward()["accuracy"]) for _ in range(iterations)]))
    return accuracy, tuple(next(iter(net.blobs.values())).data.shape)  # blobs in the order the layers make them


def atc_model(caffe_pb2, deploy: Path, out: Path, image_shape: tuple[int, ...]) -> None:
    """The deploy model as the SoC compiler takes it: each Data layer an Input of ``image_shape`` giving its
    first top, and the layers that read a label top (Accuracy, SoftmaxWithLoss) left out."""
    from google.protobuf import text_format

    net = caffe_pb2.NetParameter()
    text_format.Merge(deploy.read_text(), net)
    labels, layers = set(), []
    for lp in net.layer:
        if lp.type == "Data":
            labels.update(lp.top[1:])
            image = caffe_pb2.LayerParameter(name=lp.name, type="Input", top=[lp.top[0]])
            image.input_param.shape.add(dim=list(image_shape))
            layers.append(image)
        elif labels.isdisjoint(lp.bottom):
            layers.append(lp)
    del net.layer[:]
    net.layer.extend(layers)
    out.write_text(text_format.MessageToString(net))


def train(caffe, model_file: Path, weights_file: Path, solver_file: Path, args) -> Path:
    """The guide's solver: step policy, one TEST at the end (it writes the record)."""
    solver_file.write_text(
        f'net: "{model_file}"\ntest_iter: {args.test_iter}\ntest_interval: {args.train_iter}\n'
        f'base_lr: 0.0001\nlr_policy: "step"\nstepsize: {max(1, args.train_iter // 2)}\ngamma: 0.1\n'
        f'momentum: 0.9\nweight_decay: 0.0001\nmax_iter: {args.train_iter}\nsnapshot: {args.train_iter}\n'
        f'snapshot_prefix: "{solver_file.with_suffix("")}"\ntest_initialization: false\n'
        f'solver_mode: {"CPU" if args.gpu is None else "GPU"}\n')
    solver = caffe.SGDSolver(str(solver_file))
    solver.net.copy_from(str(weights_file))
    solver.solve()
    return solver_file.parent / f"{solver_file.stem}_iter_{args.train_iter}.caffemodel"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.caffe_dir:
        sys.path.insert(0, str(Path(args.caffe_dir) / "python"))
        import caffe
        from caffe.proto import caffe_pb2
    else:
        import amct_caffe.runtime as caffe
        from amct_caffe.runtime.proto import caffe_pb2
    import amct_caffe as amct

    if args.gpu is None:
        caffe.set_mode_cpu()
    else:
        caffe.set_mode_gpu()
        caffe.set_device(args.gpu)
    tmp, results = Path("tmp"), Path("results/retrain_results")
    tmp.mkdir(exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    model = data_model(args, tmp)
    float_acc, image_shape = test_accuracy(caffe, model, Path(args.weights_file), args.test_iter)

    config = tmp / "config.json"
    amct.create_quant_retrain_config(str(config), str(model), args.weights_file)
    modified_model, modified_weights = tmp / "modified_model.prototxt", tmp / "modified_model.caffemodel"
    record = tmp / "record.txt"
    amct.create_quant_retrain_model(str(model), args.weights_file, str(config), str(modified_model),
                                    str(modified_weights), str(record))
    retrained = train(caffe, modified_model, modified_weights, tmp / "solver.prototxt", args)
    amct.save_quant_retrain_model(str(modified_model), str(retrained), "Both", str(results / "retrain"),
                                  str(record))

    atc_model(caffe_pb2, results / "retrain_deploy_model.prototxt", results / "retrain_atc_model.prototxt",
              image_shape)
    fake_acc, _ = test_accuracy(caffe, results / "retrain_fake_quant_model.prototxt",
                                results / "retrain_fake_quant_weights.caffemodel", args.test_iter)
    line = (f"Top 1 accuracy of the float model {float_acc:.2%}, of the retrained fake-quant model "
            f"{fake_acc:.2%}")
    if not args.caffe_dir:  # the deploy model's INT8 layers run in the embedded runtime only
        deploy_acc, _ = test_accuracy(caffe, results / "retrain_deploy_model.prototxt",
                                      results / "retrain_deploy_weights.caffemodel", args.test_iter)
        line += f", of the deploy model {deploy_acc:.2%}"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
