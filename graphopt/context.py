"""The PassContext: everything a pass needs besides the graph.

One typed, immutable object handed to every pass and instrumentation, so nothing travels
through ``program.meta``, pass constructors or pass attributes, and a crash reproducer can
save it whole (:mod:`graphopt.reproducer`):

- ``calibration``: input batches from the training side of the data, for passes that fit
  something (static quantization ranges, GPTQ, sensitivity, pruning importance and
  re-fitting); ``training_texts``: training sentences, for distillation;
- ``verification``: input batches from the verification side, disjoint from the former by
  content, on which the manager measures every pass (the budget);
- ``tokenizer``, ``teacher`` (the original program, for distillation), ``artifacts`` (a
  folder for reports, curves and reproducers), ``target`` (where the model will run) and
  ``services`` (hooks the top layer provides, such as timing a block on the target runtime).

Held-out data is not here on purpose: it is what reports and gates quote, and no pass may
see it. :mod:`graphopt.datasets` builds contexts from text or from a program's shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from graphopt.program import Program

Batch = tuple[tuple, dict]  # (args, kwargs) for one call of the program


def detect_isa() -> str:
    """The CPU's vector ISA as PyTorch reports it (e.g. ``AVX512``, ``AVX2``)."""
    return str(torch.backends.cpu.get_cpu_capability())


@dataclass(frozen=True)
class Target:
    """Where the optimized model will run: ORT provider, intra-op threads, CPU ISA, precision."""

    provider: str = "cpu"
    threads: int | None = None
    isa: str = field(default_factory=detect_isa)
    precision: str = "fp32"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Services:
    """Capabilities the top layer lends to passes without passes importing it.

    ``block_timer(provider, threads, tokens)`` returns an object with ``ms(block, width)``
    that times a block of matmuls on the target runtime (latency-aware pruning); graphopt's
    build step and ``optimize()`` plug in the ONNX Runtime one."""

    block_timer: Callable[..., Any] | None = None


@dataclass(frozen=True)
class PassContext:
    calibration: tuple[Batch, ...] = ()
    calibration_source: str = ""
    training_texts: tuple[str, ...] = ()
    verification: tuple[Batch, ...] = ()
    verification_source: str = ""
    tokenizer: Any = None
    teacher: Program | None = None
    artifacts: Path | None = None
    target: Target = field(default_factory=Target)
    services: Services = field(default_factory=Services)

    def replace(self, **changes: Any) -> PassContext:
        return dataclasses.replace(self, **changes)

    def calibration_batches(self, program: Program, limit: int | None = None) -> tuple[list[Batch], str]:
        """Up to ``limit`` calibration batches and where they came from; the program's
        example inputs (one batch, and the description says so) when the context has none."""
        if self.calibration:
            batches = list(self.calibration[:limit] if limit is not None else self.calibration)
            return batches, f"{len(batches)} calibration batches ({self.calibration_source or 'given'})"
        return [(tuple(program.args), dict(program.kwargs))], "the example inputs (the context has no calibration data)"

    def artifact_path(self, name: str) -> Path:
        """``name`` inside the artifacts folder (created), or the working directory."""
        folder = self.artifacts if self.artifacts is not None else Path.cwd()
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name
