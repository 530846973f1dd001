"""Built-in graph passes; importing this package registers them."""

from graphopt.passes.dce import DeadCodeElimination
from graphopt.passes.dedup import Deduplicate
from graphopt.passes.sdpa import AttentionToSDPA

__all__ = ["DeadCodeElimination", "Deduplicate", "AttentionToSDPA"]
