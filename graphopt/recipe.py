"""Recipes: a pipeline plus its budget, export target, runtime settings and gates (TOML).

```toml
name = "lossless"
pipeline = "dce,dedup,sdpa"          # or a list of [[passes]] tables
on_failure = "continue"              # continue | stop | raise

[budget]                             # how far lossy passes may drift in total
min_cosine = 0.99

[export]
opset = 18

[runtime]
provider = "cpu"
threads = 2
disabled_optimizers = "auto"         # or ["SkipLayerNormFusion"], or [] for ORT's defaults

[gates]                              # a build step fails (exit code 1) when one is missed
min_heldout_cosine = 0.999
min_speedup = 1.0

[data]                               # what the build calibrates, verifies and gates on
source = "reviews.jsonl"             # "stdlib" (default), a .txt / .jsonl / .csv file or a
field = "body"                       #   datasets save_to_disk folder; field: JSONL field / column
calibration = 64                     # training texts for calibrated passes
verification = 64                    # texts the budget is measured on (at least 32)
heldout = 64                         # texts the report and the gates quote
max_length = 128                     # tokens per text
passage_tokens = 512                 # optional: join each part's texts into passages this long
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from graphopt.errors import ConfigError
from graphopt.instrument import Instrumentation, default_instrumentations
from graphopt.manager import PassManager
from graphopt.pipeline import create_pass, parse_pipeline
from graphopt.verify import Budget

RECIPE_DIR = Path(__file__).parent / "recipes"


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ExportSettings(_Strict):
    opset: int = Field(18, ge=17, le=24)
    external_data: bool | Literal["auto"] = "auto"
    parity: bool = True
    parity_atol: float = Field(1e-4, gt=0)
    parity_rtol: float = Field(1e-4, ge=0)
    strip_metadata: bool = Field(False, description="drop the exporter's per-node metadata (stack traces) from the file")
    skip_norm: bool = Field(False, description="decoders on ORT kernels: each residual Add and the RMSNorm after it as one "
                            "SkipSimplifiedLayerNormalization (exact; off by default: measured slower than the pair on an AVX2 CPU)")


class RuntimeSettings(_Strict):
    provider: str = Field("cpu", description="ORT execution provider ('cpu', 'cuda', ...); 'openvino' runs OpenVINO's runtime when ORT has no OpenVINO EP")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32", description="inference precision of the runtime: 'bf16' needs provider 'openvino' and a CPU with bf16 instructions; "
        "'auto' is bf16 on OpenVINO where the CPU has it and fp32 elsewhere, resolved when the build starts and recorded in "
        "the bundle; parity is still checked at fp32 on that runtime, and the held-out gates measure the run at the precision used")
    threads: int | None = Field(None, ge=1)
    graph_optimization: Literal["all", "extended", "basic", "disabled"] = "all"
    save_optimized: bool = False
    disabled_optimizers: Literal["auto"] | tuple[str, ...] | None = Field(
        "auto",
        description="ORT graph transformers to leave out of the deployed session: 'auto' measures, on the built "
        "model, each fusion known to be slow on the provider and leaves out those that are; a list names them; "
        "None keeps ORT's defaults",
    )


    @model_validator(mode="after")
    def _precision_needs_openvino(self) -> RuntimeSettings:
        if self.precision == "bf16" and self.provider.lower() not in ("openvino", "openvinoexecutionprovider", "openvinoruntime"):
            raise ValueError(f"runtime.precision = {self.precision!r} needs runtime.provider = 'openvino' (onnxruntime's "
                             f"{self.provider!r} provider has no bf16 kernels for MatMul, Gemm or Add on x86)")
        return self

class InstrumentSettings(_Strict):
    """Which instrumentations run around every pass (verification and rollback always do)."""

    flops: bool = Field(True, description="count FLOPs before and after every pass (one run on the example)")
    print_after_change: str | None = Field(None, description="folder to write the program's code to after every pass that changed it")
    extra: tuple[str, ...] = Field((), description="'module:Class' of user instrumentations, constructed without arguments, run outermost")


class Gates(_Strict):
    min_cosine: float | None = Field(None, description="final outputs vs original on the example inputs")
    min_heldout_cosine: float | None = Field(None, description="mean cosine of mean-pooled embeddings on held-out sentences")
    min_speedup: float | None = Field(None, description="ORT latency speed-up over PyTorch eager fp32 (decoders: decode tokens/s over PyTorch's cached generate)")
    max_latency_ms: float | None = Field(None, description="ORT p50 latency on the benchmark input (decoders: prefill of the benchmark prompt)")
    max_size_mb: float | None = Field(None, description="exported model size on disk")
    min_token_agreement: float | None = Field(None, ge=0.0, le=1.0, description="decoders: held-out next-token (top-1) agreement with PyTorch fp32")
    max_perplexity_ratio: float | None = Field(None, gt=0.0, description="decoders: held-out perplexity over PyTorch fp32's")
    require_parity: bool = True


class Measured(_Strict):
    """What a preset's description quotes, as numbers: a slow test rebuilds the preset and
    holds it to them (tests/test_presets.py), so the description cannot drift from the code."""

    heldout_mean_cosine: float = Field(..., ge=-1.0, le=1.0, description="held-out mean cosine of mean-pooled embeddings on MiniLM")
    heldout_texts: int = Field(256, ge=8, description="held-out texts it was measured on")
    source: str = Field("", description="the command and date of the measurement")


class DataSettings(_Strict):
    """The text a build calibrates and distills on, verifies on and gates on (text models).

    Split three ways by content hash (:func:`graphopt.data.split`), the standard library's
    text or the user's own file; ``graphopt optimize --data`` overrides ``source``/``field``."""

    source: str = Field("stdlib", min_length=1, description="'stdlib', or a .txt (one text per line), .jsonl, .csv/.tsv file or a datasets save_to_disk folder; relative to the recipe file")
    field: str | None = Field(None, min_length=1, validation_alias=AliasChoices("field", "column"), description="JSONL field, CSV column or dataset column (default 'text'; also spelled 'column')")
    calibration: int = Field(64, ge=1, description="training texts the calibrated passes see (quantize ranges, prune importance)")
    verification: int = Field(64, ge=32, description="verification texts the budget is measured on (at most; at least 32)")
    heldout: int = Field(64, ge=8, description="held-out texts the report and the gates quote (at most)")
    max_length: int = Field(128, ge=8, le=8192, description="tokens per text (longer texts are truncated)")
    passage_tokens: int | None = Field(
        None, ge=16, le=8192, description="join consecutive texts of each part into passages of at least this many tokens (long-input builds; the benchmark runs at this length)"
    )
    fractions: tuple[float, float, float] = Field((0.7, 0.1, 0.2), description="shares of the training, verification and held-out parts")
    seed: int = Field(0, description="salt of the split hash: another seed, another split")

    @model_validator(mode="after")
    def _passages_fit(self):
        if self.passage_tokens is not None and self.max_length < self.passage_tokens:
            raise ValueError(f"max_length {self.max_length} would truncate the {self.passage_tokens}-token passages: set max_length >= passage_tokens")
        return self

    @field_validator("fractions")
    @classmethod
    def _fractions_sum_to_one(cls, value):
        if any(not 0.0 <= f <= 1.0 for f in value) or abs(sum(value) - 1.0) > 1e-9 or min(value[1:]) <= 0.0:
            raise ValueError("three shares (training, verification, held-out) in [0, 1] that sum to 1, verification and held-out above 0")
        return value


class Recipe(_Strict):
    name: str = "custom"
    description: str = ""
    plugins: tuple[str, ...] = Field((), description="modules to import first: they register their own passes")
    pipeline: str = ""
    passes: tuple[dict[str, Any], ...] = ()
    on_failure: Literal["continue", "stop", "raise"] = "continue"
    budget: Budget = Budget()
    export: ExportSettings = ExportSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    instrument: InstrumentSettings = InstrumentSettings()
    gates: Gates = Gates()
    data: DataSettings = DataSettings()
    measured: Measured | None = None

    @field_validator("passes")
    @classmethod
    def _passes_have_names(cls, value):
        for i, table in enumerate(value):
            if "name" not in table:
                raise ValueError(f"[[passes]] entry {i + 1} has no 'name'")
        return value

    def manager(self, *, reproducer_dir: str | Path | None = None, progress: bool = False, print_after_change: str | Path | None = None) -> PassManager:
        """The PassManager this recipe describes, with its instrumentations (unknown passes,
        options and instrumentations fail here)."""
        self.load_plugins()
        passes = list(parse_pipeline(self.pipeline).passes) if self.pipeline else []
        for table in self.passes:
            options = {k: v for k, v in table.items() if k not in ("name", "optional")}
            passes.append(create_pass(table["name"], optional=bool(table.get("optional", False)), **options))
        return PassManager(passes, budget=self.budget, on_failure=self.on_failure, instrumentations=self.instrumentations(reproducer_dir=reproducer_dir, progress=progress, print_after_change=print_after_change))

    def instrumentations(self, *, reproducer_dir: str | Path | None = None, progress: bool = False, print_after_change: str | Path | None = None) -> list[Instrumentation]:
        """The recipe's instrumentations: its ``instrument.extra`` ones outermost, then the standard set."""
        settings = self.instrument
        hooks = [_user_instrumentation(spec) for spec in settings.extra]
        folder = print_after_change if print_after_change is not None else settings.print_after_change
        return hooks + default_instrumentations(reproducer_dir=reproducer_dir, progress=progress, print_after_change=folder, flops=settings.flops)

    def load_plugins(self) -> None:
        import importlib

        for module in self.plugins:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise ConfigError(f"recipe plugin '{module}' cannot be imported: {exc}") from None

    def pipeline_text(self) -> str:
        return self.manager().text()

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "recipe") -> Recipe:
        try:
            recipe = cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, source)) from None
        recipe.manager()  # validate pass names and options before anything runs
        return recipe

    @classmethod
    def load(cls, spec: str | Path) -> Recipe:
        """A recipe from a TOML file path or the name of a shipped preset."""
        path = Path(spec)
        if not path.exists() and (RECIPE_DIR / f"{spec}.toml").exists():
            path = RECIPE_DIR / f"{spec}.toml"
        if not path.exists():
            raise ConfigError(f"recipe '{spec}' not found (no such file; presets: {', '.join(presets())})")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        return cls.from_dict(_data_source_beside(data, path.parent), source=str(path))

    def with_data(self, source: str | Path | None = None, field: str | None = None, **counts: Any) -> Recipe:
        """This recipe with its ``[data]`` source (and field) replaced, e.g. by ``--data``."""
        settings = self.data.model_dump()
        if source is not None:
            settings.update(source=str(source), field=field)
        elif field is not None:
            settings["field"] = field
        settings.update({k: v for k, v in counts.items() if v is not None})
        return Recipe.from_dict(self.model_dump() | {"data": settings}, source="--data")


def _data_source_beside(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A relative ``[data] source`` is read beside the recipe file, as a user writing one expects."""
    section = data.get("data")
    if not isinstance(section, dict) or not isinstance(section.get("source"), str) or section["source"] in ("stdlib", ""):
        return data
    source = Path(section["source"]).expanduser()
    return data if source.is_absolute() else data | {"data": section | {"source": str(folder / source)}}


def _user_instrumentation(spec: str) -> Instrumentation:
    import importlib

    module_name, _, name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"instrument.extra: cannot load '{spec}' (give 'module:Class'): {exc}") from None
    hook = cls()
    if not isinstance(hook, Instrumentation):
        raise ConfigError(f"instrument.extra: '{spec}' is a {type(hook).__name__}, not a graphopt.instrument.Instrumentation")
    return hook


def presets() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def _describe(exc: ValidationError, source: str) -> str:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            section = _section_of(err["loc"][:-1])
            allowed = ", ".join(section.model_fields) if section else "?"
            problems.append(f"unknown key '{loc}' (allowed here: {allowed})")
        else:
            problems.append(f"'{loc}': {err['msg']} (got {err.get('input')!r})")
    return f"{source}: " + "; ".join(problems)


def _section_of(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return None
        model = field.annotation
    return model
