"""The pass manager: runs a pipeline of passes and notifies its instrumentations.

The manager is itself a pass (pipelines nest; ``fixpoint(...)`` repeats its passes until
none changes anything). For each pass it creates the report record, calls every
instrumentation before the pass, runs the pass under its contract (:meth:`Pass.__call__`:
IR check, result type, ``unchanged`` must not change anything, clean-up after a change),
and calls the instrumentations after it. A pass that raises, or whose result an
instrumentation rejects (:class:`graphopt.instrument.PassRejected`), is a failure: the
instrumentations' ``after_failure`` hooks run, the rollback's snapshot becomes the program,
and ``on_failure`` decides whether the pipeline continues, stops, or raises
:class:`PassFailedError`. Verification, rollback, reproducers, statistics, timing and
progress are instrumentations (:mod:`graphopt.instrument`); the manager knows none of them.

A pass the pipeline names that never changed the program (unchanged or skipped on every
run) is a failure in the report, unless the pipeline marks it optional (``dce?``): a
requested compression that did not happen must not look like a success.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict

from graphopt.context import PassContext
from graphopt.decoder import cache_layout, replay_steps
from graphopt.errors import PassFailedError
from graphopt.instrument import Instrumentation, PassRejected, RunState, default_instrumentations
from graphopt.passbase import Pass, PassConfig, PassInfo, PassResult, Status, format_options
from graphopt.program import Program
from graphopt.report import PassRecord, Report, environment
from graphopt.verify import Budget

OnFailure = Literal["continue", "stop", "raise"]


class ManagerConfig(PassConfig):
    fixpoint: bool = False
    max_iterations: int = 8


class ManagerInfo(PassInfo):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    report: Report


class PassManager(Pass):
    """An ordered pipeline of passes, run with instrumentation (verification, rollback, ...)."""

    name: ClassVar[str] = "pipeline"
    Config: ClassVar[type[PassConfig]] = ManagerConfig
    Info: ClassVar[type[PassInfo]] = ManagerInfo
    config: ManagerConfig  # Pass.__init__ makes it an instance of Config

    def __init__(
        self,
        passes: Iterable[Pass] = (),
        config: ManagerConfig | None = None,
        *,
        budget: Budget | None = None,
        on_failure: OnFailure = "continue",
        instrumentations: Sequence[Instrumentation] | None = None,
        optional: bool = False,
        **options: Any,
    ):
        super().__init__(config, optional=optional, **options)
        self.passes: list[Pass] = list(passes)
        for p in self.passes:
            if not isinstance(p, Pass):
                raise TypeError(f"pipeline items must be passes, got {type(p).__name__}")
        self.budget = budget or Budget()
        if on_failure not in ("continue", "stop", "raise"):
            raise ValueError(f"on_failure must be 'continue', 'stop' or 'raise', got {on_failure!r}")
        self.on_failure: OnFailure = on_failure
        self.instrumentations = list(instrumentations) if instrumentations is not None else None
        self.report: Report | None = None

    @property
    def exact(self) -> bool:
        return all(p.exact for p in self.passes)

    def text(self) -> str:
        inner = ",".join(p.text() for p in self.passes)
        options = {k: v for k, v in self.options().items() if k != "fixpoint"}
        mark = "?" if self.optional else ""
        if self.config.fixpoint:
            return f"fixpoint({inner}){format_options(options)}{mark}"
        if options or self.optional:
            return f"pipeline({inner}){format_options(options)}{mark}"
        return inner

    def leaves(self) -> list[Pass]:
        return [leaf for p in self.passes for leaf in (p.leaves() if isinstance(p, PassManager) else [p])]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PassManager) and self.config == other.config and self.passes == other.passes and self.optional == other.optional

    def __hash__(self) -> int:
        return hash((self.config, tuple(self.passes), self.optional))

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.name, "config": self.config.model_dump(mode="json"), "optional": self.optional, "passes": [p.to_dict() for p in self.passes]}

    # ---- running ------------------------------------------------------------------------
    def run(self, program: Program, ctx: PassContext) -> PassResult:
        report = Report(pipeline=self.text(), model=program.meta.get("model_class", ""), environment=environment())
        hooks = self.instrumentations if self.instrumentations is not None else default_instrumentations()
        run = RunState(ctx=ctx, report=report, budget=self.budget, instrumentations=hooks)
        report.budget = self.budget.model_dump(mode="json")
        for hook in hooks:
            hook.before_pipeline(program, run)
        result = self._run_passes(program, run, self)
        for hook in hooks:
            hook.after_pipeline(result, run)
        _drop_snapshot(run)  # the export that follows needs the memory
        report.failures.extend(_unchanged_requests(run, self.leaves()))
        self.report = report
        # A rolled-back pass hands back a copy: the program object changed even if its numbers did not.
        changed = result is not program or any(r.status == Status.APPLIED.value for r in report.passes)
        return PassResult(result, Status.APPLIED if changed else Status.UNCHANGED, ManagerInfo(report=report))

    def _run_passes(self, program: Program, run: RunState, settings: PassManager) -> Program:
        for _ in range(self.config.max_iterations if self.config.fixpoint else 1):
            changed = False
            for p in self.passes:
                if run.stopped:
                    return program
                if isinstance(p, PassManager):
                    before = len(run.report.passes)
                    program = p._run_passes(program, run, settings)
                    changed |= any(r.status == Status.APPLIED.value for r in run.report.passes[before:])
                else:
                    program, applied = settings._run_one(p, program, run)
                    changed |= applied
            if not changed:
                break
        return program

    def _run_one(self, p: Pass, program: Program, run: RunState) -> tuple[Program, bool]:
        record = PassRecord(name=p.name, text=p.text(), exact=p.exact, status="running", optional=p.optional)
        run.report.passes.append(record)
        run.records.setdefault(id(p), []).append(record)
        _drop_snapshot(run)
        try:
            for hook in run.instrumentations:
                hook.before_pass(p, program, run, record)
            layout = cache_layout(program)  # before the pass: passes rewrite the program in place
            result = p(program, run.ctx)
            record.status, record.reason = result.status.value, result.reason
            record.info = result.info.model_dump(mode="json")
            run.following = _follow_cache(run.ctx, layout, result.program) if result.modified else run.ctx
            for hook in reversed(run.instrumentations):
                hook.after_pass(p, result, run, record)
            run.ctx = run.following
        except Exception as exc:  # noqa: BLE001 - any failure of a pass is reported and, with a rollback, undone
            return self._failed(p, program, exc, run, record), False
        return result.program, result.modified

    def _failed(self, p: Pass, program: Program, error: Exception, run: RunState, record: PassRecord) -> Program:
        restored = None
        for hook in reversed(run.instrumentations):
            restored = hook.after_failure(p, program, error, run, record) or restored
        record.status, record.reason = "rolled-back", _describe(error)
        message = f"pass '{record.text}' {'rolled back' if restored is not None else 'failed'}: {record.reason}"
        run.report.failures.append(message + (f" (reproducer: {record.reproducer})" if record.reproducer else ""))
        if self.on_failure == "raise" or restored is None:
            raise PassFailedError(run.report.failures[-1]) from error
        run.stopped = self.on_failure == "stop"
        return restored


def _drop_snapshot(run: RunState) -> None:
    """Free the previous pass's copy of the program now. An fx GraphModule is full of reference
    cycles (graph <-> nodes <-> module), so only the cycle collector frees a dropped copy, and
    left to its own schedule one copy per pass piled up (a 0.5B decoder: 2 GB each; a 12-pass
    recipe grew from 10 GB to past 24 GB and was killed)."""
    if run.snapshot is not None:
        run.snapshot = None
        gc.collect()


def _follow_cache(ctx: PassContext, layout: tuple[int, int] | None, program: Program) -> PassContext:
    """The context later passes get: when a decoder pass changed the cache's ``layout`` (a
    kv-head cut), its calibration and verification steps, whose caches the old program
    built, are replayed on the new ``program``'s own cache (the same ids and masks)."""
    if cache_layout(program) == layout:
        return ctx
    return ctx.replace(
        calibration=replay_steps(program, ctx.calibration) if ctx.calibration else ctx.calibration,
        verification=replay_steps(program, ctx.verification) if ctx.verification else ctx.verification,
    )


def _describe(error: BaseException) -> str:
    return str(error) if isinstance(error, PassRejected) else f"{type(error).__name__}: {error}"


def _unchanged_requests(run: RunState, leaves: list[Pass]) -> list[str]:
    """A failure for each pass the pipeline requires that changed nothing on any run."""
    failures = []
    for p in leaves:
        if p.optional:
            continue
        records = run.records.get(id(p), [])
        if records and not any(r.status in (Status.APPLIED.value, "rolled-back") for r in records):
            last = records[-1]
            why = f": {last.reason}" if last.reason else ""
            failures.append(f"pass '{p.text()}' was requested but {'was skipped' if last.status == Status.SKIPPED.value else 'left the program unchanged'}{why} (mark it optional with '{p.text()}?' if that is acceptable)")
    return failures
