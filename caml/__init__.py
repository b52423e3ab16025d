"""CAML: correlation-aware mutual learning for semi-supervised 3D segmentation, built on caml_ops."""
