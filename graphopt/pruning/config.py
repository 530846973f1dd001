"""What the prune pass is told (:class:`PruneConfig`) and what it reports (:class:`PruneInfo`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from graphopt.passbase import PassConfig, PassInfo

Ratio = Field(0.0, ge=0.0, lt=1.0)


class PruneConfig(PassConfig):
    heads: float = Ratio  # fraction of query heads removed (per kv group under GQA)
    kv_heads: float = Ratio  # fraction of kv heads removed, each with its query heads (GQA)
    ffn: float = Ratio  # fraction of FFN channels removed
    hidden: float = Ratio  # fraction of the residual stream's width removed
    importance: Literal["l1", "l2", "taylor", "activation"] = "l2"
    scope: Literal["layer", "global"] = "layer"  # rank within each group, or across groups of a kind
    multiple: int = Field(8, ge=1)  # channel counts (ffn, hidden) are rounded to this multiple
    min_keep: int = Field(1, ge=1)  # never keep fewer units than this in a group
    allow_output_change: bool = False  # allow cutting spaces that reach a graph output
    calibration_batches: int = Field(8, ge=1)  # at most this many batches of ctx.calibration
    # A parameter budget: keep this fraction of the program's parameters. The kind ratios
    # then only give the proportions; one factor scaling them all is found by bisection.
    target_params: float | None = Field(None, gt=0.0, lt=1.0)
    # Latency-aware widths: time each group's matmuls on the target runtime (the context's
    # block timer) from the planned width up; keep the widest no slower than the plan, and
    # skip cuts that are not measurably faster.
    latency_aware: bool = False
    latency_tolerance: float = Field(0.03, ge=0.0, le=1.0)
    latency_tokens: int = Field(128, ge=1)  # rows of the timed matmuls (batch x sequence)
    latency_threads: int = Field(1, ge=1)
    latency_provider: str = "cpu"
    # Re-fit the matmuls that read cut channels on the calibration inputs (least squares);
    # the ridge term, a fraction of the mean input energy, pulls the kept weights to their old values.
    reconstruct: bool = False
    reconstruct_damp: float = Field(0.01, gt=0.0)

    def ratios(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("heads", "kv_heads", "ffn", "hidden") if getattr(self, k) > 0}


class _Figures(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GroupLatency(_Figures):
    """Measured block milliseconds of one group: unpruned, at the planned and the chosen width."""

    full: float
    planned: float
    chosen: float
    planned_width: int
    measured: dict[str, float]  # width -> ms, every width timed


class GroupReport(_Figures):
    """One dependency group: what was kept, and what that did to its tensors."""

    kind: str
    module_path: str
    size: int
    kept: int
    kept_indices: list[int]
    params_before: int = 0
    params_after: int = 0
    latency_ms: GroupLatency | None = None  # with latency_aware (None: the group has no 2-D weight)
    reconstructed: bool | None = None  # with reconstruct: whether a consumer was re-fitted
    reconstruction_error: float | None = None  # ‖y'-y‖/‖y‖ of the re-fitted consumers
    pruning_error: float | None = None  # the same with the cut columns simply dropped


class NotPrunable(_Figures):
    space: int
    kind: str
    size: int
    module_path: str
    reason: str


class TargetFit(_Figures):
    """How the ratios were scaled to meet ``target_params``."""

    target_params: int
    predicted_params: int
    reachable: bool
    ratios: dict[str, float]


class LatencySummary(_Figures):
    provider: str
    tokens: int
    threads: int
    predicted_full_ms: float
    predicted_planned_ms: float
    predicted_chosen_ms: float


class ReconstructionSummary(_Figures):
    data: str  # where the calibration inputs came from (ctx.calibration_batches)
    batches: int
    damp: float


class PruneInfo(PassInfo):
    groups: list[GroupReport] = []
    not_prunable: list[NotPrunable] = []  # groups with weights the analysis cannot cut, and why
    kinds_without_groups: list[str] = []
    calibration: str = ""  # the data the importance and the re-fit ran on, when they need data
    target: TargetFit | None = None
    latency: LatencySummary | None = None
    reconstruction: ReconstructionSummary | None = None
    params_before: int = 0
    params_after: int = 0
    cache_kv_heads: int | None = None  # a decoder's new DecoderSpec.kv_heads, when its cache's kv heads were cut
