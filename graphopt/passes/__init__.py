"""Built-in graph passes; importing this package registers them."""

from graphopt.passes.approx_attention import ApproxAttention
from graphopt.passes.attention_transfer import AttentionTransfer
from graphopt.passes.bias_gelu import BiasGelu
from graphopt.passes.cluster import Cluster
from graphopt.passes.dce import DeadCodeElimination
from graphopt.passes.dedup import Deduplicate
from graphopt.passes.distill import Distill
from graphopt.passes.fused_attention import FusedAttention
from graphopt.passes.gqa_attention import GqaAttention
from graphopt.passes.gqa_rotary import GqaRotary
from graphopt.passes.int8_attention import Int8Attention
from graphopt.passes.pack_linears import PackLinears
from graphopt.passes.prune import Prune
from graphopt.passes.quantize import Quantize
from graphopt.passes.refine_head import RefineHead
from graphopt.passes.rms_norm import RmsNorm
from graphopt.passes.rotary import Rotary
from graphopt.passes.sdpa import AttentionToSDPA
from graphopt.passes.share_layers import ShareLayers
from graphopt.passes.smooth import Smooth
from graphopt.passes.window_attention import WindowAttention

__all__ = ["ApproxAttention", "AttentionToSDPA", "AttentionTransfer", "BiasGelu", "Cluster", "DeadCodeElimination", "Deduplicate", "Distill", "FusedAttention", "GqaAttention", "GqaRotary", "Int8Attention", "PackLinears", "Prune", "Quantize", "RefineHead", "RmsNorm", "Rotary", "ShareLayers", "Smooth", "WindowAttention"]
