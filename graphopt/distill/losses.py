"""Distillation losses, over real tokens only (the attention mask), averaged per sample.

The final hidden state and every mapped block output: MSE + (1 - cosine) per token; for an
LM head the logits: KL at a temperature (scaled by T², Hinton et al.); optionally the
sentence embedding: 1 - cosine of the mask-mean-pooled final state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from graphopt.distill.config import DistillConfig


def token_mask(inputs: dict, like: torch.Tensor) -> torch.Tensor:
    """The batch's attention mask as weights of ``like``'s ``[batch, seq]`` (all ones without one)."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.shape != like.shape[:2]:
        return torch.ones(like.shape[:2], dtype=like.dtype)
    return mask.to(like.dtype)


def per_sample_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # values [B, S]: mean over the valid tokens of each sample, then over samples
    return ((values * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def pooled_cosine_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - cosine between mask-mean-pooled [B, S, H] states: the sentence-embedding objective."""
    weights = mask[..., None] / mask.sum(1, keepdim=True)[..., None].clamp(min=1)
    return (1 - F.cosine_similarity((student * weights).sum(1), (teacher * weights).sum(1), dim=-1)).mean()


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, mse_weight: float, cosine_weight: float) -> torch.Tensor:
    loss = student.new_zeros(())
    if student.dim() == 2:  # [B, H] outputs (pooled): one "token" per sample
        student, teacher, mask = student[:, None], teacher[:, None], mask[:, :1]
    if mse_weight:
        loss = loss + mse_weight * per_sample_mean((student - teacher).pow(2).mean(-1), mask)
    if cosine_weight:
        loss = loss + cosine_weight * per_sample_mean(1 - F.cosine_similarity(student, teacher, dim=-1), mask)
    return loss


def logits_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="none").sum(-1)
    return per_sample_mean(kl, mask) * t * t


def distillation_loss(s_out: Sequence[torch.Tensor], t_out: Sequence[torch.Tensor], s_taps: Sequence[torch.Tensor],
                      t_taps: Sequence[torch.Tensor], mask: torch.Tensor, config: DistillConfig, is_logits: bool) -> torch.Tensor:
    """The whole objective of one batch: outputs (logits or hidden states) and block outputs."""
    loss = s_out[0].new_zeros(())
    for index, (s_value, t_value) in enumerate(zip(s_out, t_out)):
        if not s_value.is_floating_point():
            continue
        if index == 0 and is_logits and config.logits_kl:
            loss = loss + config.logits_kl * logits_loss(s_value, t_value, mask, config.temperature)
        elif s_value.shape == t_value.shape:
            loss = loss + hidden_loss(s_value, t_value, mask, config.hidden_mse, config.hidden_cosine)
            if index == 0 and config.pooled_cosine and s_value.dim() == 3:
                loss = loss + config.pooled_cosine * pooled_cosine_loss(s_value, t_value, mask)
    for s_tap, t_tap in zip(s_taps, t_taps):
        loss = loss + config.layers / max(1, len(s_taps)) * hidden_loss(s_tap, t_tap, mask, config.hidden_mse, config.hidden_cosine)
    return loss
