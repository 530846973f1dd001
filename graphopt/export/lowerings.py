"""The lowering registry as the exporter sees it (the registry lives in graphopt.lowerings)."""

from graphopt.lowerings import declare_lowerings, lowering_table, register_lowering

__all__ = ["declare_lowerings", "lowering_table", "register_lowering"]
