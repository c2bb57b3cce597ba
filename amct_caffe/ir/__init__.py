"""Graph IR (no protobuf here): Graph / Node / Blob in SSA form, and its checker."""

from amct_caffe.ir.checker import check_graph
from amct_caffe.ir.graph import Blob, Graph, Node, check_producers, ssa_rename

__all__ = ["Blob", "Graph", "Node", "check_graph", "check_producers", "ssa_rename"]
