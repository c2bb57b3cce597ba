"""MNIST sample: quantize the bundled LeNet and compare top-1 accuracy before and after.

    python samples/mnist/src/mnist_sample.py [--model_file ...] [--weights_file ...] [--data ...]
                                             [--caffe_dir DIR] [--batch_num 2] [--batch_size 32]

It follows the user guide's workflow: create_quant_config -> init -> weights_quantize_model ->
activation_quantize_model -> run the calibration model batch_num times -> save_model. Models run in
real Caffe when --caffe_dir points at a pycaffe build patched with caffe_patch/install.py, and in
amct_caffe's embedded executor otherwise. Writes tmp/ (config, modified model, record) and results/.
The first batch_num * batch_size digits calibrate; the rest evaluate.
"""

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE = os.path.dirname(HERE)
SCALE = 0.00390625  # LeNet was trained on pixels / 256


def load_caffe(caffe_dir):
    """pycaffe from --caffe_dir, else the embedded executor (same API)."""
    if caffe_dir:
        sys.path.insert(0, os.path.join(caffe_dir, "python"))
        import caffe
    else:
        import amct_caffe.runtime as caffe
    caffe.set_mode_cpu()
    return caffe


def top1(caffe, model_file, weights_file, images, labels, batch_size):
    net = caffe.Net(model_file, weights_file, caffe.TEST)
    hits = 0
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        net.blobs["data"].reshape(*x.shape)
        net.blobs["data"].data[...] = x
        hits += int(np.sum(net.forward()["prob"].argmax(axis=1) == labels[i:i + batch_size]))
    return hits / len(images)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_file", default=os.path.join(SAMPLE, "lenet.prototxt"))
    parser.add_argument("--weights_file", default=os.path.join(SAMPLE, "lenet_iter_10000.caffemodel"))
    parser.add_argument("--data", default=os.path.join(SAMPLE, "mnist_500.npz"),
                        help=".npz with uint8 'images' (N, 28, 28) and 'labels'")
    parser.add_argument("--caffe_dir", default=None, help="Caffe source tree with pycaffe built (optional)")
    parser.add_argument("--batch_num", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()

    caffe = load_caffe(args.caffe_dir)
    import amct_caffe as amct

    amct.set_cpu_mode()
    data = np.load(args.data)
    images = data["images"][:, None].astype(np.float32) * np.float32(SCALE)
    labels = data["labels"]
    n_calib = args.batch_num * args.batch_size
    calib, test_x, test_y = images[:n_calib], images[n_calib:], labels[n_calib:]

    before = top1(caffe, args.model_file, args.weights_file, test_x, test_y, 100)

    os.makedirs("tmp", exist_ok=True)
    config_file = "tmp/config.json"
    amct.create_quant_config(config_file, args.model_file, args.weights_file, batch_num=args.batch_num)
    record_file = "tmp/record.txt"
    graph = amct.init(config_file, args.model_file, args.weights_file, record_file)
    modified_model, modified_weights = "tmp/modified_model.prototxt", "tmp/modified_model.caffemodel"
    amct.weights_quantize_model(graph, modified_model, modified_weights)
    amct.activation_quantize_model(graph, modified_model, modified_weights)
    net = caffe.Net(modified_model, modified_weights, caffe.TEST)
    for b in range(args.batch_num):  # calibration: batch_num forwards
        x = calib[b * args.batch_size:(b + 1) * args.batch_size]
        net.blobs["data"].reshape(*x.shape)
        net.blobs["data"].data[...] = x
        net.forward()
    amct.save_model(graph, "Both", "results/mnist")

    after = top1(caffe, "results/mnist_fake_quant_model.prototxt", "results/mnist_fake_quant_weights.caffemodel",
                 test_x, test_y, 100)
    print(f"******final top1:{after}")
    print(f"[AMCT][INFO] mnist top1 before quantize is {before}, after quantize is {after} "
          f"({len(test_x)} digits)")
    print("[AMCT][INFO]Run mnist sample with quantize success!")


if __name__ == "__main__":
    main()
