"""The pass manager: runs a pipeline, verifies every step, rolls back what breaks.

The manager is itself a pass (so pipelines nest). For each pass it

1. snapshots the program and fingerprints it,
2. runs the pass (an exception is caught, a reproducer folder is written),
3. enforces the contract: ``modified=False`` must leave the fingerprint unchanged,
4. re-runs the program and measures drift against the program before the pass (exact
   passes: within ``budget.exact_rtol``) and against the original model (lossy passes:
   within the budget, on the positions the example's attention mask marks as real),
5. records wall time, node / parameter / byte / FLOP counts and drift in the report,
6. on any failure restores the snapshot and, by ``on_failure``, continues, stops the
   pipeline, or raises :class:`PassFailedError`.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any, ClassVar, Iterable, Literal

import torch

from graphopt.errors import PassContractError, PassFailedError
from graphopt.passbase import Pass, PassConfig, PassResult
from graphopt.program import Program
from graphopt.report import PassRecord, ProgramStats, Report, environment
from graphopt.verify import Budget, drift

OnFailure = Literal["continue", "stop", "raise"]


class ManagerConfig(PassConfig):
    fixpoint: bool = False
    max_iterations: int = 8


class PassManager(Pass):
    """An ordered pipeline of passes, run with verification and instrumentation."""

    name: ClassVar[str] = "pipeline"
    Config: ClassVar[type[PassConfig]] = ManagerConfig

    def __init__(
        self,
        passes: Iterable[Pass] = (),
        config: ManagerConfig | None = None,
        *,
        budget: Budget | None = None,
        on_failure: OnFailure = "continue",
        reproducer_dir: str | Path | None = None,
        instrument: bool = True,
        progress: bool = False,
        **options: Any,
    ):
        super().__init__(config, **options)
        self.passes: list[Pass] = list(passes)
        for p in self.passes:
            if not isinstance(p, Pass):
                raise TypeError(f"pipeline items must be passes, got {type(p).__name__}")
        self.budget = budget or Budget()
        if on_failure not in ("continue", "stop", "raise"):
            raise ValueError(f"on_failure must be 'continue', 'stop' or 'raise', got {on_failure!r}")
        self.on_failure = on_failure
        self.reproducer_dir = Path(reproducer_dir) if reproducer_dir else Path.cwd()
        self.instrument = instrument
        self.progress = progress
        self.report: Report | None = None

    # A pipeline is exact when every pass in it is.
    @property
    def exact(self) -> bool:  # type: ignore[override]
        return all(p.exact for p in self.passes)

    def text(self) -> str:
        inner = ",".join(str(p) for p in self.passes)
        options = {k: v for k, v in self.options().items() if k != "fixpoint"}
        from graphopt.pipeline import format_options

        if self.config.fixpoint:
            return f"fixpoint({inner}){format_options(options)}"
        if options:
            return f"pipeline({inner}){format_options(options)}"
        return inner

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PassManager) and self.config == other.config and self.passes == other.passes

    def __hash__(self) -> int:
        return hash((self.config, tuple(self.passes)))

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.name, "config": self.config.model_dump(mode="json"), "passes": [p.to_dict() for p in self.passes]}

    def _needs_teacher(self) -> bool:
        return any(p._needs_teacher() if isinstance(p, PassManager) else getattr(p, "needs_teacher", False) for p in self.passes)

    # ---- running ------------------------------------------------------------------------
    def run(self, program: Program) -> PassResult:
        report = Report(pipeline=self.text(), model=program.meta.get("model_class", ""))
        report.environment = environment()
        if self.instrument:
            report.initial = ProgramStats.of(program)
        if program.teacher is None and self._needs_teacher():
            program.teacher = program.clone()
        state = _RunState(outputs=program.run(), report=report)
        initial_fingerprint = program.fingerprint()
        program = self._run_passes(program, state, self)
        final_outputs = state.outputs
        report.final_drift = drift(program.reference_outputs, final_outputs, program.valid_positions()).to_dict() if program.reference_outputs else None
        if self.instrument:
            report.final = ProgramStats.of(program)
        self.report = report
        modified = any(r.status == "applied" for r in report.passes) or program.fingerprint() != initial_fingerprint
        return PassResult(program, modified, {"report": report})

    def _run_passes(self, program: Program, state: "_RunState", settings: "PassManager") -> Program:
        iterations = self.config.max_iterations if self.config.fixpoint else 1
        for _ in range(iterations):
            changed = False
            for p in _progress(self.passes, settings.progress):
                if state.stopped:
                    return program
                if isinstance(p, PassManager):
                    before = len(state.report.passes)
                    program = p._run_passes(program, state, settings)
                    changed |= any(r.status == "applied" for r in state.report.passes[before:])
                    continue
                program, applied = self._run_one(p, program, state, settings)
                changed |= applied
            if not changed:
                break
        return program

    def _run_one(self, p: Pass, program: Program, state: "_RunState", settings: "PassManager") -> tuple[Program, bool]:
        record = PassRecord(name=p.name, text=str(p), exact=p.exact, status="unchanged")
        state.report.passes.append(record)
        if settings.instrument:
            record.before = state.stats or ProgramStats.of(program)
        snapshot = program.clone()
        fingerprint = program.fingerprint()
        start = time.perf_counter()
        try:
            result = p(program)
        except Exception as exc:  # noqa: BLE001 - any crash of a pass is rolled back and reported
            record.wall_s = time.perf_counter() - start
            record.reproducer = str(_write_reproducer_safely(snapshot, p, exc, settings.reproducer_dir))
            return self._fail(record, snapshot, f"{type(exc).__name__}: {exc}", state, settings, exc), False
        record.wall_s = time.perf_counter() - start
        record.info = _public_info(result.info)
        new = result.program
        if not result.modified:
            if new.fingerprint() != fingerprint:
                message = f"pass '{p.name}' returned modified=False but changed the program (graph or tensors)"
                return self._fail(record, snapshot, message, state, settings, PassContractError(message)), False
            if "skipped" in result.info:
                record.status = "skipped"
                record.reason = str(result.info["skipped"])
            record.after = record.before
            return new, False

        new.invalidate()
        try:
            new.module.graph.lint()
            outputs = new.run()
        except Exception as exc:  # noqa: BLE001
            record.reproducer = str(_write_reproducer_safely(snapshot, p, exc, settings.reproducer_dir))
            return self._fail(record, snapshot, f"the program no longer runs after the pass: {type(exc).__name__}: {exc}", state, settings, exc), False
        # Exact passes must hold on every position, padding included; the budget of lossy
        # ones is measured on the positions the attention mask marks as real.
        step = drift(state.outputs, outputs)
        total = drift(new.reference_outputs or state.outputs, outputs, new.valid_positions())
        record.drift_step, record.drift_total = step.to_dict(), total.to_dict()
        reason = settings.budget.check_exact(step) if p.exact else settings.budget.check(total)
        if reason:
            kind = "exact pass" if p.exact else "lossy pass"
            return self._fail(record, snapshot, f"{kind} '{p.name}' broke its tolerance: {reason}", state, settings, None), False
        record.status = "applied"
        state.outputs = outputs
        if settings.instrument:
            record.after = state.stats = ProgramStats.of(new)
        return new, True

    def _fail(self, record: PassRecord, snapshot: Program, reason: str, state: "_RunState", settings: "PassManager", exc: BaseException | None) -> Program:
        record.status = "rolled-back"
        record.reason = reason
        record.after = record.before
        state.report.failures.append(f"pass '{record.text}' rolled back: {reason}" + (f" (reproducer: {record.reproducer})" if record.reproducer else ""))
        if settings.on_failure == "stop":
            state.stopped = True
        elif settings.on_failure == "raise":
            raise PassFailedError(state.report.failures[-1]) from exc
        return snapshot


class _RunState:
    def __init__(self, outputs: tuple[torch.Tensor, ...], report: Report):
        self.outputs = outputs
        self.report = report
        self.stopped = False
        self.stats: ProgramStats | None = None


def _progress(passes: list[Pass], enabled: bool):
    if not enabled:
        return passes
    from tqdm import tqdm

    return tqdm(passes, desc="passes", unit="pass", leave=False)


def _public_info(info: dict) -> dict:
    return {k: v for k, v in info.items() if not k.startswith("_")}


def _write_reproducer_safely(program: Program, p: Pass, exc: BaseException, directory: Path) -> Path | str:
    from graphopt.reproducer import write_reproducer

    try:
        return write_reproducer(program, p, exc, directory)
    except Exception as repro_exc:  # noqa: BLE001 - the original failure matters more
        return f"(could not write reproducer: {type(repro_exc).__name__}: {repro_exc}; {traceback.format_exception_only(exc)[-1].strip()})"


def as_manager(pipeline: Any) -> PassManager:
    """A PassManager from a pipeline string, a PassManager, a pass, or a list of passes."""
    from graphopt.pipeline import parse_pipeline

    if isinstance(pipeline, PassManager):
        return pipeline
    if isinstance(pipeline, Pass):
        return PassManager([pipeline])
    if isinstance(pipeline, str):
        return parse_pipeline(pipeline)
    if isinstance(pipeline, (list, tuple)):
        items = []
        for item in pipeline:
            items.extend(as_manager(item).passes if isinstance(item, str) else [item])
        return PassManager(items)
    raise TypeError(f"a pipeline is a string, a Pass or a list of passes, not {type(pipeline).__name__}")
