"""The pass contract, typed configs and the pass registry.

A pass is an object with a ``name``, a typed ``Config`` (pydantic: validated on
construction, frozen, serializable, unknown keys rejected), a declaration of whether it is
``exact``, and ``run(program) -> PassResult``. ``__call__`` is what the manager and users
call; it checks the result's shape. The manager (graphopt.manager) enforces the rest of
the contract: ``modified=False`` must leave the program untouched, exact passes must keep
outputs within 1e-5 relative, lossy ones within the recipe's budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from graphopt.errors import ConfigError, PassContractError, UnknownPassError
from graphopt.program import Program


class PassConfig(BaseModel):
    """Base of every pass config: frozen, validated, no unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)
    version: ClassVar[int] = 1


class NoConfig(PassConfig):
    pass


@dataclass
class PassResult:
    program: Program
    modified: bool
    info: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class of all passes. Subclasses set ``name``, ``exact``, ``Config`` and ``run``."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    Config: ClassVar[type[PassConfig]] = NoConfig
    # Passes that only make sense on torch.export's ATen graph say so; the manager skips
    # them (modified=False, with the reason) on a program captured by symbolic_trace.
    requires_ir: ClassVar[tuple[str, ...]] = ("aten", "fx")

    def __init__(self, config: PassConfig | None = None, **options: Any):
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

    def run(self, program: Program) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, program: Program) -> PassResult:
        if program.ir not in self.requires_ir:
            return PassResult(program, False, {"skipped": f"needs a graph from {'/'.join(self.requires_ir)} capture, got '{program.ir}'"})
        result = self.run(program)
        if not isinstance(result, PassResult) or not isinstance(result.modified, bool):
            raise PassContractError(f"pass '{self.name}' returned {type(result).__name__}, not PassResult(program, modified: bool, info)")
        return result

    # ---- identity and text form ------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """The config fields that differ from their defaults, in declaration order."""
        defaults = self.Config()
        return {
            key: getattr(self.config, key)
            for key in type(self.config).model_fields
            if getattr(self.config, key) != getattr(defaults, key)
        }

    def __str__(self) -> str:
        from graphopt.pipeline import format_pass

        return format_pass(self)

    def __repr__(self) -> str:
        return f"<pass {self}>"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.config == other.config  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.config))

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.name, "version": self.Config.version, "config": self.config.model_dump(mode="json")}


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


# ---- registry ------------------------------------------------------------------------
_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by name to pipelines, recipes and the CLI."""
    if not cls.name:
        raise PassContractError(f"{cls.__qualname__} has no name")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise PassContractError(f"pass name '{cls.name}' already registered by {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_pass(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered_passes() -> dict[str, type[Pass]]:
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def get_pass_class(name: str) -> type[Pass]:
    _load_builtin_passes()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownPassError(f"unknown pass '{name}'; available passes: {', '.join(sorted(_REGISTRY))}") from None


def create_pass(name: str, **options: Any) -> Pass:
    return get_pass_class(name)(**options)


def _load_builtin_passes() -> None:
    import graphopt.passes  # noqa: F401  (registers the built-in passes on import)
