"""``import caffe.proto.caffe_pb2`` for scripts run with ``import amct_caffe.runtime as caffe``: every attribute
is the one of the caffe.proto in use (:func:`amct_caffe.io.schema.caffe_pb`), looked up at each use."""

from amct_caffe.io.schema import caffe_pb


def __getattr__(name: str):
    return getattr(caffe_pb(), name)
