"""Input layers."""

from __future__ import annotations

from amct_caffe.errors import GraphError
from amct_caffe.runtime.layer import Layer
from amct_caffe.ops import register


@register("Input")
class Input(Layer):
    """Declares the net's input blobs; shapes from ``input_param.shape`` (one for all or one per top)."""

    num_bottoms = 0
    num_tops = (1, None)

    def reshape(self, bottom_shapes):
        shapes = self.lp.input_param.shape
        n = len(self.lp.top)
        if len(shapes) not in (1, n):
            wanted = "1 shape" if n == 1 else f"1 shape or one per top ({n})"
            give = " (input_param { shape { dim: N dim: C ... } })" if not shapes else ""
            raise GraphError(f"layer '{self.name}' (Input): input_param must give {wanted}, it gives "
                             f"{len(shapes)}{give}")
        return [tuple(int(d) for d in shapes[0 if len(shapes) == 1 else i].dim) for i in range(n)]

    def forward(self, bottoms):  # the Net never calls it: inputs are set by the user
        return []
