"""Examples printed in the user guide that several caffe_patch tests use."""

# The guide's custom.proto example (安装后处理, proto合并前提条件), as printed, leading blanks included.
GUIDE_CUSTOM_PROTO = """message LayerParameter {
   optional ReLU6Parameter relu6_param = 2060;
   optional ROIPoolingParameter roi_pooling_param = 8266711;
 }

 message ReLU6Parameter {
   optional float negative_slope = 1 [default = 0];
 }

 message ROIPoolingParameter {
   // Pad, kernel size, and stride are all given as a single value for equal
   // dimensions in height and width or as Y, X pairs.
   optional uint32 pooled_h = 1 [default = 0]; // The pooled output height
   optional uint32 pooled_w = 2 [default = 0]; // The pooled output width
   // Multiplicative spatial scale factor to translate ROI coords from their
   // input scale to the scale used when pooling
   optional float spatial_scale = 3 [default = 1];
 }
"""
