"""The lowering registry as the exporter sees it (the registry lives in graphopt.lowerings).

Besides the op packages' own lowerings, the exporter overrides torch.onnx's lowering of
some ATen ops where it differs from PyTorch (graphopt.export.sdpa_lowering).
"""

from graphopt.lowerings import declare_lowerings, lowering_table, register_lowering

declare_lowerings("graphopt.export.sdpa_lowering")

__all__ = ["declare_lowerings", "lowering_table", "register_lowering"]
