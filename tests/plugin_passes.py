"""A recipe plugin: registers a lossy pass that damages the weights (for distillation tests)."""

from typing import ClassVar

import torch

from graphopt import Pass, PassConfig, PassResult, register_pass


@register_pass
class Damage(Pass):
    """Adds seeded noise to every matrix: a stand-in for a lossy compression."""

    name: ClassVar[str] = "test-damage"

    class Config(PassConfig):
        scale: float = 0.05

    def run(self, program, ctx):
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in program.module.parameters():
                if p.dim() == 2:
                    p.add_(torch.randn(p.shape, generator=generator) * self.config.scale)
        return PassResult.applied(program)
