"""The pass contract: typed configs and results, the pass registry, the text form of a pass.

A pass is a class with a ``name``, a one-line docstring (``graphopt passes`` shows it), a
typed ``Config`` (pydantic: validated on construction, frozen, unknown keys rejected), a
typed ``Info`` for what it reports, ``is_exact(config)``, and
``run(program, ctx) -> PassResult``. Calling a pass (``p(program, ctx)``) is the one way
any caller, the manager included, runs it; the call enforces the contract:

- a pass that needs torch.export's ATen graph is skipped, with the reason, on another IR;
- the result must be a :class:`PassResult` carrying the pass's own ``Info`` type;
- a result that is not ``applied`` must leave the program untouched (its fingerprint: the
  graph code and every tensor's identity and in-place version);
- after an ``applied`` result the graph is cleaned up (dead nodes, unread tensors, lint,
  recompile: :func:`graphopt.surgery.cleanup`), so no pass ends with its own clean-up and a
  pass called by hand cannot leave a stale module behind; cached analyses are dropped
  except those the result marks preserved.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from graphopt.errors import ConfigError, PassContractError
from graphopt.program import Program
from graphopt.surgery import cleanup

if TYPE_CHECKING:
    from graphopt.context import PassContext


class PassConfig(BaseModel):
    """Base of every pass config: frozen, validated, no unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)
    version: ClassVar[int] = 1


class NoConfig(PassConfig):
    pass


class PassInfo(BaseModel):
    """Base of every pass's typed report: validated, serialisable, no unknown keys."""

    model_config = ConfigDict(extra="forbid")


class NoInfo(PassInfo):
    pass


class Status(str, enum.Enum):
    APPLIED = "applied"  # the program changed
    UNCHANGED = "unchanged"  # the pass ran and found nothing to do
    SKIPPED = "skipped"  # the pass could not run here (wrong IR, missing data, ...)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the program, whether it changed, why not, and typed figures."""

    program: Program
    status: Status
    info: PassInfo
    reason: str = ""  # why the pass left the program unchanged or skipped it
    preserved: frozenset[str] = frozenset()  # cached analyses still valid after this pass

    @property
    def modified(self) -> bool:
        return self.status is Status.APPLIED

    @classmethod
    def applied(cls, program: Program, info: PassInfo | None = None, *, preserved: tuple[str, ...] = ()) -> PassResult:
        return cls(program, Status.APPLIED, info if info is not None else NoInfo(), "", frozenset(preserved))

    @classmethod
    def unchanged(cls, program: Program, info: PassInfo | None = None, reason: str = "") -> PassResult:
        return cls(program, Status.UNCHANGED, info if info is not None else NoInfo(), reason)

    @classmethod
    def skipped(cls, program: Program, reason: str, info: PassInfo | None = None) -> PassResult:
        if not reason:
            raise PassContractError("a skipped pass must say why (PassResult.skipped(program, reason))")
        return cls(program, Status.SKIPPED, info if info is not None else NoInfo(), reason)

    @classmethod
    def of(cls, program: Program, changed: bool, info: PassInfo | None = None, reason: str = "") -> PassResult:
        """``applied`` when ``changed``, else ``unchanged`` with ``reason``."""
        return cls.applied(program, info) if changed else cls.unchanged(program, info, reason)


class Pass:
    """Base class of all passes; see the module doc for the contract."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[PassConfig]] = NoConfig
    Info: ClassVar[type[PassInfo]] = NoInfo
    # Passes that only make sense on torch.export's ATen graph say so; they are skipped,
    # with the reason, on a program captured by symbolic_trace.
    requires_ir: ClassVar[tuple[str, ...]] = ("aten", "fx")

    def __init__(self, config: PassConfig | None = None, *, optional: bool = False, **options: Any):
        if config is not None and options:
            raise TypeError(f"pass '{self.name}': give either a config object or keyword options, not both")
        if config is None:
            try:
                config = self.Config(**options)
            except ValidationError as exc:
                raise ConfigError(_describe_validation_error(self.name, self.Config, exc)) from None
        elif not isinstance(config, self.Config):
            raise ConfigError(f"pass '{self.name}' expects a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        # A recipe marks a pass optional (``dce?``): leaving the program unchanged is then
        # not a failure of the build. It is part of the pipeline, not of the pass's config.
        self.optional = optional

    @classmethod
    def is_exact(cls, config: Any) -> bool:
        """Whether the pass with ``config`` keeps the outputs exact (within 1e-5 relative).

        Exact passes are held to that at every position and several shapes; the others to
        the recipe's budget. The default is lossy: a pass must claim exactness."""
        return False

    @property
    def exact(self) -> bool:
        return type(self).is_exact(self.config)

    @classmethod
    def summary(cls) -> str:
        """The first line of the docstring: what ``graphopt passes`` shows."""
        return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())

    def run(self, program: Program, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, program: Program, ctx: PassContext | None = None) -> PassResult:
        from graphopt.context import PassContext

        ctx = ctx if ctx is not None else PassContext()
        if program.ir not in self.requires_ir:
            return PassResult.skipped(program, f"needs a graph from {'/'.join(self.requires_ir)} capture, got '{program.ir}'", self.Info.model_construct())
        fingerprint = program.fingerprint()
        result = self.run(program, ctx)
        self._check(result)
        if not result.modified:
            if result.program.fingerprint() != fingerprint:
                raise PassContractError(f"pass '{self.name}' returned {result.status} but changed the program (graph or tensors)")
            return result
        cleanup(result.program.module)
        result.program.invalidate(keep=result.preserved)
        return result

    def _check(self, result: Any) -> None:
        if not isinstance(result, PassResult) or not isinstance(result.status, Status):
            raise PassContractError(f"pass '{self.name}' returned {type(result).__name__}, not a PassResult")
        if not isinstance(result.info, self.Info):
            raise PassContractError(f"pass '{self.name}' reported {type(result.info).__name__}, not its {self.Info.__name__}")

    # ---- identity and text form ------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """The config fields that differ from their defaults, in declaration order."""
        defaults = self.Config()
        return {key: getattr(self.config, key) for key in type(self.config).model_fields if getattr(self.config, key) != getattr(defaults, key)}

    def text(self) -> str:
        return self.name + format_options(self.options()) + ("?" if self.optional else "")

    def __str__(self) -> str:
        return self.text()

    def __repr__(self) -> str:
        return f"<pass {self}>"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.config == other.config and self.optional == other.optional

    def __hash__(self) -> int:
        return hash((type(self), self.config, self.optional))

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.name, "version": self.Config.version, "config": self.config.model_dump(mode="json"), "optional": self.optional}


# ---- text form of option values ----------------------------------------------------------
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/*]*")


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, enum.Enum):
        value = value.value
    text = str(value)
    if WORD.fullmatch(text) and text not in ("true", "false", "inf", "nan"):
        return text
    return json.dumps(text)


def format_options(options: dict[str, Any]) -> str:
    if not options:
        return ""
    return "{" + ",".join(f"{k}={format_value(v)}" for k, v in options.items()) + "}"


def _describe_validation_error(name: str, config_cls: type[PassConfig], exc: ValidationError) -> str:
    problems = []
    allowed = ", ".join(config_cls.model_fields) or "(none)"
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "?"
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown option '{key}' (allowed: {allowed})")
        else:
            problems.append(f"option '{key}': {err['msg']} (got {err.get('input')!r})")
    return f"pass '{name}': " + "; ".join(problems)


# ---- registry ----------------------------------------------------------------------------
_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by name to pipelines, recipes and the CLI."""
    if not cls.name:
        raise PassContractError(f"{cls.__qualname__} has no name")
    if not cls.summary():
        raise PassContractError(f"pass '{cls.name}' ({cls.__qualname__}) has no docstring: its first line is what `graphopt passes` shows")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise PassContractError(f"pass name '{cls.name}' already registered by {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_pass(name: str) -> None:
    _REGISTRY.pop(name, None)


def lookup_pass(name: str) -> type[Pass] | None:
    """The registered pass class of that name, if any. Built-in passes are registered when
    ``graphopt.passes`` is imported; :func:`graphopt.pipeline.get_pass_class` does that."""
    return _REGISTRY.get(name)


def registry_snapshot() -> dict[str, type[Pass]]:
    return dict(sorted(_REGISTRY.items()))
