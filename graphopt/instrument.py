"""Instrumentations: what runs around every pass, in the manner of MLIR's PassInstrumentation.

The manager only sequences passes; everything it used to do inside one function is an
instrumentation a recipe, the CLI or a user selects:

- :class:`Verify`: measure the program after each change on the verification data, hold
  exact passes to 1e-5 at every position and on every shape, lossy ones to the budget
  against the original outputs on real positions; reject a pass that breaks its tolerance;
- :class:`Rollback`: snapshot before each pass, restore it when the pass fails;
- :class:`Reproducer`: on a crash, write the program, the pass and the context to a folder
  that ``graphopt repro`` re-runs;
- :class:`Statistics`: nodes, parameters, bytes and FLOPs before and after;
- :class:`Timing`: wall time of each pass;
- :class:`Progress`: a progress bar;
- :class:`PrintAfterChange`: the program's code after every pass that changed it.

Hooks run in list order before a pass and in reverse order after it (or after its
failure), so the last instrumentation in the list sits closest to the pass: :class:`Timing`
is put last and times the pass alone. A hook that rejects the pass raises
:class:`PassRejected`; the manager then calls every ``after_failure``, and the program the
rollback returns is the one the pipeline continues with.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from graphopt.context import Batch, PassContext
from graphopt.datasets import program_context
from graphopt.decoder import cache_layout, replay_steps
from graphopt.errors import VerificationError
from graphopt.passbase import Pass, PassResult
from graphopt.program import Program
from graphopt.report import PassRecord, ProgramStats, Report
from graphopt.verify import Budget, Drift, Outputs, decoder_unread, drift_many, perturbed, real_positions


class PassRejected(VerificationError):
    """An instrumentation refused a pass's result (it broke its tolerance)."""


@dataclass
class RunState:
    """What one pipeline run shares with its instrumentations."""

    ctx: PassContext
    report: Report
    budget: Budget
    instrumentations: Sequence[Instrumentation]
    snapshot: Program | None = None  # the program before the current pass, once someone asked
    following: PassContext | None = None  # the context the passes after the current one get (graphopt.manager)
    stopped: bool = False
    records: dict[int, list[PassRecord]] = field(default_factory=dict)  # id(pass) -> its records

    def take_snapshot(self, program: Program) -> Program:
        """The program as it is before the current pass (one copy per pass, shared)."""
        if self.snapshot is None:
            self.snapshot = program.clone()
        return self.snapshot


class Instrumentation:
    """Base class: every hook does nothing. Subclass and override what you need."""

    name: ClassVar[str] = "instrumentation"

    def before_pipeline(self, program: Program, run: RunState) -> None:
        pass

    def before_pass(self, p: Pass, program: Program, run: RunState, record: PassRecord) -> None:
        pass

    def after_pass(self, p: Pass, result: PassResult, run: RunState, record: PassRecord) -> None:
        pass

    def after_failure(self, p: Pass, program: Program, error: BaseException, run: RunState, record: PassRecord) -> Program | None:
        """Called when the pass raised or a hook rejected it; may return the program to go on with."""
        return None

    def after_pipeline(self, program: Program, run: RunState) -> None:
        pass


# ---- verification ------------------------------------------------------------------------
class Verify(Instrumentation):
    """Hold every changed program to its tolerance on the verification data.

    Exact passes: against the program before the pass, at every position (padding too; a
    decoder step's logits at padding and cache entries of padding slots, which nothing
    reads, only for being finite), on the example inputs and every verification batch (several shapes per dynamic axis),
    ``max_rel <= budget.exact_rtol``. Lossy passes: against the original program's outputs
    on the verification batches, real positions only, within the budget.

    A decoder pass that changes the cache's layout (a kv-head cut) cannot run on steps whose
    caches the old program built: its verification runs are replayed on its own cache
    (:func:`graphopt.decoder.replay_steps`, the same ids and masks), and across layouts only
    the logits are compared; later passes are verified on the replayed steps."""

    name: ClassVar[str] = "verify"

    def before_pipeline(self, program: Program, run: RunState) -> None:
        ctx = run.ctx if run.ctx.verification else program_context(program)
        self.example: Batch = (tuple(program.args), dict(program.kwargs))
        self.batches: list[Batch] = list(ctx.verification)
        self.from_context = bool(run.ctx.verification)  # then the manager's replayed context holds these runs, replayed
        self.source = ctx.verification_source or f"{len(self.batches)} batches"
        batches = self.batches
        self.decoder = "decoder" in program.meta
        self.layout = self.original_layout = cache_layout(program)
        self.reference = self._outputs(program, self.example, batches)
        # a decoder step's padding logits and padding cache slots are read by nothing
        self.unread = self._unread(self.example, batches, self.reference)
        self.current = self.reference
        self.current_example, self.current_batches = self.example, list(batches)  # what the current program runs on
        self.floor = self.rounding_floor(program)
        run.report.verification = {"source": self.source, "batches": len(batches), "samples": _samples(batches),
                                   "rounding_floor": self.floor, "exact_tolerance": run.budget.exact_tolerance(self.floor)}

    @staticmethod
    def _outputs(program: Program, example: Batch, batches: Sequence[Batch]) -> list[Outputs]:
        return [program.run(args, kwargs) for args, kwargs in [example, *batches]]

    def _unread(self, example: Batch, batches: Sequence[Batch], outputs: list[Outputs]) -> list:
        return [decoder_unread(kwargs, out) if self.decoder else None for (_, kwargs), out in zip([example, *batches], outputs)]

    def rounding_floor(self, program: Program, copies: int = 2) -> float:
        """max_rel of the program against copies whose fp32 tensors moved by one ulp, on the
        same data: how far rounding alone moves these outputs (see verify.EXACT_FLOOR_FACTOR)."""
        floor = 0.0
        for seed in range(copies):
            moved = drift_many(self.reference, self._outputs(perturbed(program, seed), self.example, self.batches), unread=self.unread)
            floor = max(floor, moved.max_rel if not moved.problem else 0.0)
        return floor

    def after_pass(self, p: Pass, result: PassResult, run: RunState, record: PassRecord) -> None:
        if not result.modified:
            return
        layout = cache_layout(result.program)
        example, batches = self.current_example, self.current_batches
        try:
            if layout != self.layout:  # the old steps' caches do not fit: the candidate's own runs and example
                replayed = run.following.verification if self.from_context and run.following is not None else replay_steps(result.program, self.batches)
                example, batches = (tuple(result.program.args), dict(result.program.kwargs)), list(replayed)
            outputs = self._outputs(result.program, example, batches)
        except Exception as exc:  # a program that no longer runs is a rejected pass
            raise PassRejected(f"the program no longer runs after the pass: {type(exc).__name__}: {exc}") from exc
        unread = self._unread(example, batches, outputs)
        # across cache layouts only the logits compare
        shared = _logits if layout != self.layout else list
        step = drift_many(shared(self.current), shared(outputs), unread=shared(unread))
        total = self.total(outputs, layout)
        record.drift_step, record.drift_total = step.to_dict(), total.to_dict()
        # Lossy passes are measured on real positions, but a value that turned non-finite
        # anywhere (padding included: a masked mean-pool still turns NaN into NaN) is no drift.
        reason = run.budget.check_exact(step, self.floor) if record.exact else (run.budget.check(total) or step.problem)
        if reason:
            kind = "exact pass" if record.exact else "lossy pass"
            raise PassRejected(f"{kind} '{p.name}' broke its tolerance: {reason}")
        self.current, self.layout = outputs, layout
        self.current_example, self.current_batches = example, batches

    def total(self, outputs: list[Outputs], layout: tuple[int, int] | None = None) -> Drift:
        """Drift from the original on the verification batches, real positions only (the
        logits only, when the cache ``layout`` of ``outputs`` is not the original's)."""
        valids = [real_positions(kwargs) for _, kwargs in self.batches]
        if (layout if layout is not None else self.layout) != self.original_layout:
            return drift_many(_logits(self.reference[1:]), _logits(outputs[1:]), valids, _logits(self.unread[1:]))
        return drift_many(self.reference[1:], outputs[1:], valids, self.unread[1:])

    def after_pipeline(self, program: Program, run: RunState) -> None:
        run.report.final_drift = self.total(self.current).to_dict()


def _logits(per_batch: Sequence) -> list:
    """The first output of every batch (a decoder's logits): what two cache layouts share."""
    return [None if outputs is None else outputs[:1] for outputs in per_batch]


def _samples(batches: list[Batch]) -> int:
    count = 0
    for args, kwargs in batches:
        first = next((v for v in [*args, *kwargs.values()] if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        count += int(first.shape[0]) if first is not None else 1
    return count


# ---- rollback and reproducers --------------------------------------------------------------
class Rollback(Instrumentation):
    """Snapshot before every pass; a failed pass is undone by returning the snapshot."""

    name: ClassVar[str] = "rollback"

    def before_pass(self, p: Pass, program: Program, run: RunState, record: PassRecord) -> None:
        run.take_snapshot(program)

    def after_failure(self, p: Pass, program: Program, error: BaseException, run: RunState, record: PassRecord) -> Program | None:
        return run.snapshot


class Reproducer(Instrumentation):
    """On a crash (not a tolerance failure) write a folder that ``graphopt repro`` re-runs:
    the program before the pass, the pass and its config, and the whole context."""

    name: ClassVar[str] = "reproducer"

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory is not None else None

    def before_pass(self, p: Pass, program: Program, run: RunState, record: PassRecord) -> None:
        run.take_snapshot(program)

    def after_failure(self, p: Pass, program: Program, error: BaseException, run: RunState, record: PassRecord) -> Program | None:
        if isinstance(error, PassRejected) or run.snapshot is None:
            return None
        from graphopt.reproducer import write_reproducer

        directory = self.directory or run.ctx.artifacts or Path.cwd()
        try:
            record.reproducer = str(write_reproducer(run.snapshot, p, error, directory, run.ctx))
        except Exception as repro_exc:  # noqa: BLE001 - the original failure matters more
            record.reproducer = f"(could not write reproducer: {type(repro_exc).__name__}: {repro_exc}; {traceback.format_exception_only(error)[-1].strip()})"
        return None


# ---- figures -------------------------------------------------------------------------------
class Statistics(Instrumentation):
    """Nodes, parameters, parameter bytes and FLOPs (one run on the example) before and after."""

    name: ClassVar[str] = "statistics"

    def __init__(self, flops: bool = True):
        self.flops = flops

    def before_pipeline(self, program: Program, run: RunState) -> None:
        self.stats = ProgramStats.of(program, flops=self.flops)
        run.report.initial = self.stats

    def before_pass(self, p: Pass, program: Program, run: RunState, record: PassRecord) -> None:
        record.before = self.stats

    def after_pass(self, p: Pass, result: PassResult, run: RunState, record: PassRecord) -> None:
        if result.modified:
            self.stats = ProgramStats.of(result.program, flops=self.flops)
        record.after = self.stats

    def after_failure(self, p: Pass, program: Program, error: BaseException, run: RunState, record: PassRecord) -> Program | None:
        record.after = self.stats
        return None

    def after_pipeline(self, program: Program, run: RunState) -> None:
        run.report.final = self.stats


class Timing(Instrumentation):
    """Wall time of each pass (put it last in the list: its hooks then bracket the pass alone)."""

    name: ClassVar[str] = "timing"

    def before_pass(self, p: Pass, program: Program, run: RunState, record: PassRecord) -> None:
        self.start = time.perf_counter()

    def after_pass(self, p: Pass, result: PassResult, run: RunState, record: PassRecord) -> None:
        record.wall_s = time.perf_counter() - self.start

    def after_failure(self, p: Pass, program: Program, error: BaseException, run: RunState, record: PassRecord) -> Program | None:
        if not record.wall_s:
            record.wall_s = time.perf_counter() - self.start
        return None


class Progress(Instrumentation):
    """A tqdm progress bar over the passes."""

    name: ClassVar[str] = "progress"

    def before_pipeline(self, program: Program, run: RunState) -> None:
        from tqdm import tqdm

        self.bar = tqdm(desc="passes", unit="pass", leave=False)

    def before_pass(self, p: Pass, program: Program, run: RunState, record: PassRecord) -> None:
        self.bar.set_postfix_str(p.name)

    def after_pass(self, p: Pass, result: PassResult, run: RunState, record: PassRecord) -> None:
        self.bar.update(1)

    def after_failure(self, p: Pass, program: Program, error: BaseException, run: RunState, record: PassRecord) -> Program | None:
        self.bar.update(1)
        return None

    def after_pipeline(self, program: Program, run: RunState) -> None:
        self.bar.close()


class PrintAfterChange(Instrumentation):
    """After every pass that changed the program, write its code to ``folder/NN-<pass>.py``
    (``graphopt optimize --print-after-change``)."""

    name: ClassVar[str] = "print-after-change"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.count = 0

    def before_pipeline(self, program: Program, run: RunState) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write("00-captured", program)

    def after_pass(self, p: Pass, result: PassResult, run: RunState, record: PassRecord) -> None:
        if result.modified:
            self.count += 1
            self._write(f"{self.count:02d}-{p.name}", result.program)

    def _write(self, stem: str, program: Program) -> None:
        (self.folder / f"{stem}.py").write_text(program.module.code)


def default_instrumentations(*, reproducer_dir: str | Path | None = None, progress: bool = False, print_after_change: str | Path | None = None, flops: bool = True) -> list[Instrumentation]:
    """The standard set, in hook order (see the module doc)."""
    hooks: list[Instrumentation] = [Progress()] if progress else []
    if print_after_change is not None:
        hooks.append(PrintAfterChange(print_after_change))
    hooks += [Reproducer(reproducer_dir), Rollback(), Statistics(flops=flops), Verify(), Timing()]
    return hooks
