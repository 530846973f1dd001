"""refine-head: a low-bit LM head whose k best logits per position are recomputed from int8 rows (lossy).

A decoder's LM head is its largest matrix (Qwen2.5-0.5B: 136M of 494M weights) and, on the
trained instrument of benchmarks/decoder.py, the layer whose 4-bit rounding moves next-token
agreement most (0.933 with it at 4 bits, 0.955 at 8). At 8 bits it streams about 140 MB a
decode step instead of about 75: the accurate head costs a fifth of the step. But the choice
of the next token, and almost all of the softmax mass, lies in a handful of logits.

So the pass, run before ``quantize``, rewrites ``logits = linear(h, W)`` into

    refine_topk_int8(linear(h, W), h, int8(W), row scales, k)

``quantize`` then rounds the head as it rounds every linear (4 bits, say): that coarse head
picks, per position, the ``k`` candidates with the largest logits, and only their rows are
read from an int8 copy of ``W`` (one scale per row) and multiplied with ``h`` in fp32. The
other logits stay the coarse ones. A decode step streams the low-bit head plus ``k`` rows
(``k x hidden`` bytes: 57 KB at the 0.5B shape with ``k=64``), not the 8-bit head.

Since the coarse head only ranks, it can be cheaper than the rest: on the instrument a 2-bit
head (``quantize{bits=2,group_size=64,include=["*lm_head"]}``) refined keeps the 4-bit
refined head's agreement to the token, at half its bytes (benchmarks/README.md).

The int8 copy is :func:`graphopt.quant.schemes.quantize_embedding` of ``W``, which is what
``quantize{embeddings=true,embedding_bits=8}`` stores for an embedding table. A model whose
head is tied to its input embedding (Qwen2.5, Gemma, GPT-2) therefore holds the same int8
table twice after those two passes, and a ``dedup`` after them stores it once: the lookup
and the refinement read one table, on disk and in memory. ``quantize`` stores a tied table
only once nothing else reads it, so the head must be quantized first (or in the same pass).

Exactness: where the coarse head ranks the fp32 head's best token within its top ``k``, the
refined argmax is the int8 head's (at fp32 activations). Logits outside the top ``k`` keep
the coarse head's error, so the perplexity moves less than the agreement gains. The manager
checks the pass as a lossy one, on verification data. Before ``quantize`` the coarse head is
still fp32, so the pass alone moves the logits by the int8 rows' rounding only.

Limits: the head is found as the linear layer that computes the program's ``logits`` output
(through dtype casts); a head with a bias is left alone (no decoder in graphopt's zoo has
one), with the reason in the report.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import fx

from graphopt.analysis.linear import match_linear
from graphopt.context import PassContext
from graphopt.errors import ConfigError
from graphopt.passbase import Pass, PassConfig, PassInfo, PassResult, register_pass
from graphopt.program import Program, module_path
from graphopt.quant import ops  # noqa: F401  (defines torch.ops.graphopt.refine_topk_int8)
from graphopt.quant.schemes import quantize_embedding
from graphopt.rewrite import NoMatch, emit
from graphopt.surgery import add_constant, stamp

aten = torch.ops.aten
_CASTS = (aten.to.dtype, aten._to_copy.default, aten.type_as.default)


class RefineHeadConfig(PassConfig):
    k: int = Field(64, ge=1, le=1024, description="logits per position recomputed from the int8 rows")


class RefineHeadInfo(PassInfo):
    node: str = ""
    module_path: str = ""
    vocab: int = 0
    hidden: int = 0
    k: int = 0
    table_bytes: int = 0  # the int8 rows and their scales


@register_pass
class RefineHead(Pass):
    """LM head: recompute the k largest logits per position from int8 rows (run before quantize)."""

    name: ClassVar[str] = "refine-head"
    Config: ClassVar[type[PassConfig]] = RefineHeadConfig
    Info: ClassVar[type[PassInfo]] = RefineHeadInfo
    config: RefineHeadConfig

    @classmethod
    def is_exact(cls, config: RefineHeadConfig) -> bool:
        return False

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        if "logits" not in program.output_names:
            return PassResult.skipped(program, f"the program has no 'logits' output (outputs: {list(program.output_names)})", RefineHeadInfo())
        output = next(n for n in program.graph.nodes if n.op == "output")
        head = output.args[0][program.output_names.index("logits")]
        while isinstance(head, fx.Node) and head.target in _CASTS:
            head = head.args[0]
        site = match_linear(head) if isinstance(head, fx.Node) else NoMatch("node", "not a node")
        if isinstance(site, NoMatch):
            what = head.target if isinstance(head, fx.Node) else type(head).__name__
            return PassResult.unchanged(program, RefineHeadInfo(), f"'logits' is not a linear layer's output ({what}: {site})")
        if site.bias_name or site.bias_node:
            return PassResult.unchanged(program, RefineHeadInfo(node=site.node), f"the LM head '{site.module_path}' has a bias (not handled)")
        k = self.config.k
        if k >= site.out_features:
            raise ConfigError(f"refine-head k={k} must be smaller than the head's {site.out_features} outputs")
        gm = program.module
        codes, scales = quantize_embedding(site.weight(gm))
        x = head.args[1] if head.target is aten.addmm.default else head.args[0]
        graph = program.graph
        with graph.inserting_after(head):
            table = add_constant(gm, f"refine_{site.node}_table", codes)
        with graph.inserting_after(table):
            row_scales = add_constant(gm, f"refine_{site.node}_scales", scales)
        with graph.inserting_after(row_scales):
            refined = stamp(emit(graph, torch.ops.graphopt.refine_topk_int8.default, (head, x, table, row_scales, k)), self.name, head)
        head.replace_all_uses_with(refined, delete_user_cb=lambda user: user is not refined)
        info = RefineHeadInfo(node=site.node, module_path=site.module_path or module_path(head), vocab=site.out_features, hidden=site.in_features,
                              k=k, table_bytes=codes.numel() + scales.numel() * 4)
        return PassResult.of(program, True, info)
