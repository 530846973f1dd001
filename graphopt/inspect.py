"""What a captured program holds: ops, parameters, attention blocks."""

from __future__ import annotations

import torch

from graphopt.program import Program

_FUSED_ATTENTION = {torch.ops.aten.scaled_dot_product_attention.default}


def attention_blocks(program: Program) -> list[dict]:
    """Every attention block the graph holds: fused (SDPA) ones, eager ones the sdpa pass
    can fuse, and softmaxes that look like attention but do not match (with the reason)."""
    from graphopt.passes.sdpa import SOFTMAX, match_attention

    blocks = []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        module = node.meta.get("graphopt_module_path", "")
        if node.target in _FUSED_ATTENTION:
            blocks.append({"module": module, "node": node.name, "kind": "fused (scaled_dot_product_attention)"})
        elif node.target in SOFTMAX and program.ir == "aten":
            match = match_attention(node)
            kind = "eager (fusable by the sdpa pass)" if match else f"softmax, not fusable: {match}"
            blocks.append({"module": module, "node": node.name, "kind": kind})
    return blocks


def inspect_program(program: Program) -> dict:
    return {
        **program.parameter_stats(),
        "nodes": program.node_count(),
        "ir": program.ir,
        "ops": program.op_histogram(),
        "attention": attention_blocks(program),
    }
