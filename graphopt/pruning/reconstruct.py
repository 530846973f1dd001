"""Re-fitting the matmuls that read cut channels: the layer-wise reconstruction of Kwon
et al. 2022, by least squares on calibration inputs of the unpruned program.

For ``y = x Wᵀ + b`` with kept input channels ``S`` and ``Σ = E[[x,1][x,1]ᵀ]`` over all
calibration tokens (padding included) of the unpruned program, the columns ``S' = [S,1]``
of ``[W,b]`` become ``([W,b] Σ[:,S'] + λ[W,b][:,S']) (Σ[S',S'] + λI)⁻¹``, with
``λ = damp · mean(diag Σ[S',S'])``: least squares, pulled towards the old weights (without
a bias, ``S`` alone), so the output from the kept channels matches the unpruned one and
the bias absorbs the mean of the removed channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx

from graphopt.analysis.groups import DependencyAnalysis
from graphopt.analysis.importance import input_moments, matmul_readers
from graphopt.context import Batch
from graphopt.program import Program
from graphopt.pruning.plan import Keep
from graphopt.surgery import get_tensor, set_tensor

aten = torch.ops.aten
_BIAS_ARG: dict[fx.node.Target, int] = {aten.linear.default: 2, aten.addmm.default: 0}
Fit = tuple[str, int]  # (weight attribute, dim whose channels are cut)


def reconstruct(program: Program, analysis: DependencyAnalysis, keep: Keep, calibration: Sequence[Batch],
                damp: float) -> dict[int, dict]:
    """Re-fit every matmul whose input channels ``keep`` cuts, before
    :func:`graphopt.pruning.apply.apply_plan`.

    Weights are written at full shape (new tensors, never in place); ``apply_plan`` slices
    the cut columns away. A weight or bias that is read elsewhere too (a tied embedding) is
    left alone. Returns, for each group with re-fitted consumers, the relative output error
    ``‖y'-y‖/‖y‖`` of those on the calibration inputs, with the re-fit and with plain pruning.
    """
    gm = program.module
    readers = matmul_readers(gm)
    fits = _fits(program, analysis, keep, readers)
    moments = input_moments(gm, {name for key in fits for name, _ in readers[key]}, calibration)
    nodes = {n.name: n for n in gm.graph.nodes}
    errors: dict[Fit, torch.Tensor] = {}
    for (attr, dim), kept in fits.items():
        uses = [name for name, _ in readers[(attr, dim)]]
        sigma = sum(moments[n][0] for n in uses) / sum(moments[n][1] for n in uses)
        if not isinstance(sigma, torch.Tensor):  # a fit has at least one use, so the sum is a tensor
            raise TypeError(f"no input moments for the readers of {attr}")
        errors[(attr, dim)] = _refit_weight(program, attr, dim, kept, [nodes[n] for n in uses], sigma, damp)
    return _group_errors(analysis, keep, errors)


def _fits(program: Program, analysis: DependencyAnalysis, keep: Keep, readers: dict) -> dict[Fit, torch.Tensor]:
    """The 2-D weights read by matmuls whose input channels the plan cuts, and only by them."""
    fits: dict[Fit, torch.Tensor] = {}
    for (attr, dim), uses in readers.items():
        sid = analysis.graph.slot_space.get((f"attr:{attr}", 0, dim))
        weight = get_tensor(program.module, attr)
        if sid not in analysis.coords or not set(analysis.coords[sid]) & set(keep) or weight.dim() != 2:
            continue
        kept = analysis.kept_indices(sid, keep)
        if kept.numel() < weight.shape[dim] and _exclusive(program, attr, {name for name, _ in uses}):
            fits[(attr, dim)] = kept
    return fits


def _refit_weight(program: Program, attr: str, dim: int, kept: torch.Tensor, uses: list[fx.Node], sigma: torch.Tensor,
                  damp: float) -> torch.Tensor:
    """Re-fit the kept columns of ``attr`` (and its bias, when the uses share one); returns
    the energies of :func:`_refit`."""
    gm = program.module
    weight = get_tensor(gm, attr).detach()
    w = weight.double() if dim == 1 else weight.double().T  # (out, in)
    bias = _shared_bias(program, uses, w.shape[0])
    if bias is None:
        full, cols, sigma = w, kept, sigma[:-1, :-1]
    else:
        full = torch.cat([w, get_tensor(gm, bias).detach().double()[:, None]], 1)
        cols = torch.cat([kept, kept.new_tensor([w.shape[1]])])
    fitted, energies = _refit(full, sigma, cols, damp)
    w_new = w.clone()
    w_new[:, kept] = fitted[:, : kept.numel()]
    set_tensor(gm, attr, (w_new if dim == 1 else w_new.T).to(weight.dtype).contiguous())
    if bias is not None:
        set_tensor(gm, bias, fitted[:, -1].to(get_tensor(gm, bias).dtype).contiguous())
    return energies


def _refit(full: torch.Tensor, sigma: torch.Tensor, cols: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """New columns ``cols`` of ``full`` (out x in), and ``‖Δy‖²`` re-fitted, ``‖Δy‖²`` plainly
    cut and ``‖y‖²`` under the input moments ``sigma``."""
    inner = sigma[cols][:, cols]
    lam = damp * inner.diagonal().mean()
    rhs = full @ sigma[:, cols] + lam * full[:, cols]
    fitted = torch.linalg.solve(inner + lam * torch.eye(len(cols), dtype=inner.dtype), rhs.T).T
    refit, cut = torch.zeros_like(full), torch.zeros_like(full)
    refit[:, cols], cut[:, cols] = fitted, full[:, cols]
    energy = [((d @ sigma) * d).sum() for d in (refit - full, cut - full, full)]
    return fitted, torch.stack(energy)


def _group_errors(analysis: DependencyAnalysis, keep: Keep, errors: dict[Fit, torch.Tensor]) -> dict[int, dict]:
    out = {}
    for gid in keep:
        mine = [errors[(m.attr, m.dim)] for m in analysis.group(gid).members if (m.attr, m.dim) in errors]
        if mine:
            fit, plain, total = torch.stack(mine).sum(0)
            out[gid] = {"reconstructed": True, "reconstruction_error": float((fit / total).sqrt()),
                        "pruning_error": float((plain / total).sqrt())}
    return out


def _exclusive(program: Program, attr: str, names: set[str]) -> bool:
    """``attr`` is read only by the nodes ``names`` and shares its storage with no other tensor."""
    users = {u.name for n in program.graph.nodes if n.op == "get_attr" and n.target == attr for u in n.users}
    storage = get_tensor(program.module, attr).untyped_storage().data_ptr()
    aliases = sum(t.untyped_storage().data_ptr() == storage for t in program.tensors().values())
    return users <= names and aliases <= 1


def _shared_bias(program: Program, uses: list[fx.Node], size: int) -> str | None:
    """The bias attribute (``size`` long) that every use adds with unit scale and nothing else reads."""
    targets: set[str | None] = set()
    for node in uses:
        index = _BIAS_ARG.get(node.target)
        arg = node.args[index] if index is not None and len(node.args) > index and not node.kwargs else None
        # a get_attr node's target is always the attribute's dotted name
        targets.add(arg.target if isinstance(arg, fx.Node) and arg.op == "get_attr" and isinstance(arg.target, str) else None)
    bias = targets.pop() if len(targets) == 1 else None
    if bias is None or get_tensor(program.module, bias).shape != (size,):
        return None
    return bias if _exclusive(program, bias, {n.name for n in uses}) else None
