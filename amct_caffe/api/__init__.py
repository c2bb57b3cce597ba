"""The public functions, grouped by workflow (re-exported by ``amct_caffe``)."""
