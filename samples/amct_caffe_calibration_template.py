"""Post-training quantization template (the user guide's amct_caffe_calibration_template.py).

Fill in the two "user modified" parts: the arguments, and run_caffe_model's data feeding. The
script then runs the guide's workflow:

  create_quant_config -> init -> weights_quantize_model -> activation_quantize_model
  -> run the calibration model batch_num times -> save_model('Both')

Models run in real Caffe when Args.caffe_dir names a pycaffe build patched with
caffe_patch/install.py, otherwise in amct_caffe's embedded executor (same API).
"""

import os
import sys

import amct_caffe as amct


class Args:
    """Arguments of the quantization run."""

    def __init__(self):
        self.model_name = ""       # prefix of the saved models
        self.model_file = ""       # the model's .prototxt
        self.weights_file = ""     # its .caffemodel
        self.caffe_dir = None      # Caffe source tree with pycaffe built; None: embedded executor
        self.pre_test = False      # True: only run the float model, to check the script and data
        self.iterations = 5        # forwards of the final fake-quant model test
        self.batch_num = 2         # calibration batches
        self.cfg_define = None     # simple .cfg (AMCTConfig), or None for the defaults


args = Args()
# ############################ user modified start #########################
# e.g.
# args.model_name = "ResNet50"
# args.model_file = "pre_model/ResNet-50-deploy.prototxt"
# args.weights_file = "pre_model/ResNet-50-model.caffemodel"
# ############################ user modified end ###########################

if args.caffe_dir:
    sys.path.insert(0, os.path.join(args.caffe_dir, "python"))
    import caffe  # noqa: E402
else:
    import amct_caffe.runtime as caffe  # noqa: E402


def run_caffe_model(model_file, weights_file, iterations):
    """Run the model ``iterations`` times on your data (calibration or test)."""
    net = caffe.Net(model_file, weights_file, caffe.TEST)  # noqa: F841 - used by the code you add
    # ############################ user modified start #########################
    # e.g.
    # for _ in range(iterations):
    #     data = get_data()                       # your preprocessed batch, e.g. N x 3 x 224 x 224
    #     blobs_out = net.forward(data=data)      # {output blob name: array}
    #     post_process(blobs_out)                 # optional: accuracy of this batch
    raise NotImplementedError("fill in run_caffe_model's data feeding (see the template's comments)")
    # ############################ user modified end ###########################


def main():
    caffe.set_mode_cpu()
    amct.set_cpu_mode()
    if args.pre_test:
        run_caffe_model(args.model_file, args.weights_file, args.iterations)
        print(f"[AMCT][INFO]Run {args.model_name} without quantize success!")
        return

    config_json_file = "tmp/config.json"
    if args.cfg_define is not None:
        amct.create_quant_config(config_json_file, args.model_file, args.weights_file,
                                 config_defination=args.cfg_define)
    else:
        amct.create_quant_config(config_json_file, args.model_file, args.weights_file, args.batch_num)

    # Phase 0: parse the model and config, create the record file
    scale_offset_record_file = "tmp/scale_offset_record.txt"
    graph = amct.init(config_json_file, args.model_file, args.weights_file, scale_offset_record_file)

    # Phase 1: fuse Conv+BN+Scale, quantize weights, insert the activation calibration layers
    modified_model_file = "tmp/modified_model.prototxt"
    modified_weights_file = "tmp/modified_model.caffemodel"
    amct.weights_quantize_model(graph, modified_model_file, modified_weights_file)
    amct.activation_quantize_model(graph, modified_model_file, modified_weights_file)

    # Phase 2: run the calibration model batch_num times to compute the activation factors
    run_caffe_model(modified_model_file, modified_weights_file, graph.config.batch_num)

    # Phase 3: save the fake-quant model (accuracy in Caffe) and the deploy model (for ATC)
    result_path = f"results/{args.model_name}"
    amct.save_model(graph, "Both", result_path)

    # Phase 4: test the fake-quant model
    run_caffe_model(f"{result_path}_fake_quant_model.prototxt", f"{result_path}_fake_quant_weights.caffemodel",
                    args.iterations)
    print(f"[AMCT][INFO]Run {args.model_name} with quantize success!")


if __name__ == "__main__":
    main()
