"""pycaffe's ``caffe.proto``: ``caffe_pb2`` is the caffe.proto in use (:func:`amct_caffe.io.schema.caffe_pb`, ours or
the user's from :func:`amct_caffe.set_caffe_proto`), whose message classes are attributes (``caffe_pb2.BlobProto()``,
``caffe_pb2.NetParameter.FromString(data)``)."""

from amct_caffe.io.schema import caffe_pb

__all__ = ["caffe_pb2"]


def __getattr__(name: str):
    if name == "caffe_pb2":  # looked up at each use: set_caffe_proto may change it
        return caffe_pb()
    raise AttributeError(f"module 'caffe.proto' has no attribute {name!r}")
