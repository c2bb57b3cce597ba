"""StagedRun (api/staged_run.py): a graph run over fixed batches in passes that each go further,
every pass starting from the blobs kept where the last one left off, must read what a whole
forward of the current weights reads, batch by batch (a short last batch included)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from amct_caffe.api.session import load_float_graph
from amct_caffe.api.staged_run import StagedRun, live_blobs
from amct_caffe.runtime import TEST, Net

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "mnist"


def _lenet():
    return load_float_graph(str(SAMPLE / "lenet.prototxt"), str(SAMPLE / "lenet_iter_10000.caffemodel"))


def test_live_blobs_are_made_before_and_read_after():
    graph = _lenet()
    index = {node.name: i for i, node in enumerate(graph.nodes)}
    pool1_out = graph.node("pool1").tops[0]
    assert live_blobs(graph, index["conv2"]) == [pool1_out]
    assert live_blobs(graph, 0) == []


def test_passes_read_what_a_whole_forward_reads():
    graph = _lenet()
    rng = np.random.default_rng(0)
    data = rng.random((20, 1, 28, 28)).astype(np.float32)
    batches = [data[i:i + 8] for i in range(0, 20, 8)]  # 8, 8, 4
    index = {node.name: i for i, node in enumerate(graph.nodes)}
    # (nodes to read at, the next pass's start); between passes ip2's weights change (after every start)
    passes = [(["conv1", "pool1"], index["conv2"]), (["conv2", "ip1"], index["ip2"]), (["ip2"], None)]
    run = StagedRun(lambda: graph.copy())
    for number, (reads, keep) in enumerate(passes):
        run.open(max(index[r] for r in reads), keep)
        for b, x in enumerate(batches):
            run.begin(b, {"data": x})
            got = {}
            for r in reads:
                run.advance(index[r])
                got[r] = run.blob(graph.node(r).tops[0]).copy()
            run.finish()
            full = Net.from_graph(graph, TEST)
            full.forward(data=x)
            for r in reads:
                np.testing.assert_array_equal(got[r], full.blobs[graph.node(r).tops[0]].data, err_msg=f"{r}, batch {b}")
        run.close()
        ip2 = graph.node("ip2")
        ip2.params = [ip2.params[0] * np.float32(1.5 + number), *ip2.params[1:]]
    assert run.start == index["ip2"]


def test_an_input_declared_after_other_layers_is_fed_in_its_pass():
    """A prototxt may declare an input after other layers; the pass holding its Input layer must
    set it from the batch, or the layers reading it would see zeros."""
    from tests.passes.helpers import model

    text = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 } } }
layer { name: "fc1" type: "InnerProduct" bottom: "data" top: "fc1" inner_product_param { num_output: 3 } }
layer { name: "fc2" type: "InnerProduct" bottom: "fc1" top: "fc2" inner_product_param { num_output: 3 } }
layer { name: "extra" type: "Input" top: "extra" input_param { shape { dim: 2 dim: 5 } } }
layer { name: "cat" type: "Concat" bottom: "fc2" bottom: "extra" top: "cat" }
layer { name: "fc3" type: "InnerProduct" bottom: "cat" top: "fc3" inner_product_param { num_output: 2 } }
"""
    graph, _ = model(text)
    index = {node.name: i for i, node in enumerate(graph.nodes)}
    rng = np.random.default_rng(1)
    batches = [{"data": rng.random((2, 4), dtype=np.float32), "extra": rng.random((2, 5), dtype=np.float32)}
               for _ in range(2)]
    run = StagedRun(lambda: graph.copy())
    for reads, keep in ((["fc1"], index["fc2"]), (["fc3"], None)):
        run.open(max(index[r] for r in reads), keep)
        for b, feed in enumerate(batches):
            run.begin(b, feed)
            for r in reads:
                run.advance(index[r])
                full = Net.from_graph(graph, TEST)
                full.forward(**feed)
                np.testing.assert_array_equal(run.blob(r), full.blobs[r].data, err_msg=f"{r}, batch {b}")
            run.finish()
        run.close()
