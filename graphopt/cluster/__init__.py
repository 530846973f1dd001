"""Weight clustering: 1-D k-means codebooks, bit-packed codes, and the decode op.

A clustered tensor is stored as packed codes (uint8) plus a codebook, and read through
``torch.ops.graphopt.clustered_weight`` which rebuilds the dense tensor. In ONNX the decode
is a handful of bit operations and a ``GatherElements`` on initializers only, which ONNX
Runtime constant-folds when the session loads: the file is small, inference runs on the
dense tensor.
"""

from graphopt.cluster import ops  # noqa: F401  (defines torch.ops.graphopt.clustered_weight)
from graphopt.cluster.kmeans import Clustering, kmeans_1d
from graphopt.cluster.packing import pack_codes, packed_bytes, planes, unpack_codes
from graphopt.lowerings import declare_lowerings

declare_lowerings("graphopt.cluster.lowering")  # its ONNX lowering, imported by graphopt.export

__all__ = ["Clustering", "kmeans_1d", "pack_codes", "packed_bytes", "planes", "unpack_codes"]
