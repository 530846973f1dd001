"""The teacher's outputs per training sentence, so later epochs skip its forward pass."""

from __future__ import annotations

import torch

from graphopt.taps import TappedModule


class TeacherCache:
    """The teacher's outputs (and tapped block outputs) per training sentence.

    The teacher is frozen and a sentence's real-token outputs do not depend on the rest of
    its padded batch, so after the first epoch the teacher's forward pass (about 30 % of a
    step's compute when teacher and student are alike) is replaced by reassembling stored
    rows. Per-token outputs (``[batch, seq, width...]``) are stored at the positions the
    attention mask marks as real and are zero at padded positions when reassembled (every
    loss masks those); per-sample outputs (a pooler) row by row. Stores nothing past
    ``limit_bytes``, and nothing for tensor data (no sentence keys), inputs without a 2-D
    attention mask, or left-padded batches.
    """

    def __init__(self, view: TappedModule, limit_bytes: int):
        self.view, self.limit, self.used = view, limit_bytes, 0
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.layout: tuple[int, list[bool]] | None = None  # (number of outputs, per-token flag of each tensor)

    def __call__(self, args: tuple, inputs: dict, keys: list[str] | None) -> tuple[tuple, list]:
        mask = inputs.get("attention_mask")
        usable: tuple[list[str], torch.Tensor] | None = None
        if (
            keys is not None and self.limit > 0 and isinstance(mask, torch.Tensor) and mask.dim() == 2 and len(keys) == mask.shape[0]
            # right padding only: a left-padded sentence's positions (and outputs) move with the batch
            and bool((mask[:, 1:] <= mask[:, :-1]).all())
        ):
            usable = (keys, mask)
        if usable is not None and self.layout is not None and all(k in self.rows for k in usable[0]):
            return self._assemble(usable[0], usable[1].bool())
        with torch.no_grad():
            t_out, t_taps = self.view(*self.view.flatten(args, inputs))
        if usable is not None and self.used < self.limit:
            self._store(usable[0], usable[1].bool(), t_out, t_taps)
        return t_out, t_taps

    def _store(self, keys: list[str], mask: torch.Tensor, t_out, t_taps) -> None:
        batch, seq = mask.shape
        tensors = [*t_out, *t_taps]
        if not all(isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == batch for t in tensors):
            self.limit = 0  # outputs that are not per sample cannot be reassembled
            return
        if any(t.dim() == 2 and t.shape[1] == seq for t in tensors):
            return  # [batch, seq] or [batch, width] with width == seq: ambiguous, keep nothing from this batch
        per_token = [t.dim() >= 3 and t.shape[1] == seq for t in tensors]
        if self.layout is None:
            self.layout = (len(t_out), per_token)
        elif self.layout != (len(t_out), per_token):
            self.limit = 0  # the outputs' structure changed with the batch: stop caching
            return
        for i, key in enumerate(keys):
            if key not in self.rows:
                rows = [t[i][mask[i]].clone() if token else t[i].clone() for t, token in zip(tensors, per_token)]
                self.rows[key] = rows
                self.used += sum(r.numel() * r.element_size() for r in rows)

    def _assemble(self, keys: list[str], mask: torch.Tensor) -> tuple[tuple, list]:
        if self.layout is None:
            raise RuntimeError("TeacherCache._assemble called before any batch was stored")
        count, per_token = self.layout
        tensors = []
        for j, token in enumerate(per_token):
            parts = [self.rows[k][j] for k in keys]
            if token:
                out = parts[0].new_zeros((*mask.shape, *parts[0].shape[1:]))
                for i, part in enumerate(parts):
                    out[i][mask[i]] = part
                tensors.append(out)
            else:
                tensors.append(torch.stack(parts))
        return tuple(tensors[:count]), tensors[count:]
