"""Per-op channel rules. Importing this package registers every rule (one module per op family)."""

from onnxprune.channels import conv, elementwise, fused, linear, norm, pooling, qdq, reshape, shape_ops  # noqa: F401
from onnxprune.channels.registry import Block, Dim, Link, lookup, registered_ops

__all__ = ["Block", "Dim", "Link", "lookup", "registered_ops"]
