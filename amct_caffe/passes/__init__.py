"""Graph passes: each takes a Graph, edits it in place, checks it and returns whether it changed.

* :func:`fuse_bn_scale` — BN fusion (Conv / DepthwiseConv / Deconv / InnerProduct + BatchNorm
  [+ Scale] [+ Bias]); the weight math lives apart in :mod:`amct_caffe.passes.fold_math`.
* :func:`accelerate_bn_scale_bias` — leftover BatchNorm / Scale / Bias chains whose quantization
  is enabled become a DepthwiseConv.
"""

from amct_caffe.passes.bn_acceleration import accelerate_bn_scale_bias
from amct_caffe.passes.fusion import fuse_bn_scale

__all__ = ["accelerate_bn_scale_bias", "fuse_bn_scale"]
