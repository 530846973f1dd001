"""Capture a PyTorch model as a Program through torch.export (fallback: fx.symbolic_trace)."""

from __future__ import annotations

import copy
import inspect
import traceback
import warnings
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from graphopt.errors import CaptureError
from graphopt.program import Program, flatten_outputs

# Inputs whose second dimension is a sequence when dynamic_shapes="auto".
_SEQUENCE_INPUTS = {"input_ids", "attention_mask", "token_type_ids", "position_ids", "decoder_input_ids", "decoder_attention_mask"}


def capture(
    model: torch.nn.Module,
    args: tuple = (),
    kwargs: dict | None = None,
    dynamic_shapes: Any = "auto",
    *,
    fallback: bool = True,
) -> Program:
    """Capture ``model`` on example inputs as a :class:`Program`.

    ``dynamic_shapes`` takes torch.export's format, ``None`` for static shapes, or
    ``"auto"`` (default): batch is dynamic on every tensor input, and sequence length on
    the 2-D integer inputs of text models (``input_ids``, ``attention_mask``, ...).

    The user's model is not touched: capture runs on a deep copy put in eval mode.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture expects a torch.nn.Module, got {type(model).__name__}")
    kwargs = dict(kwargs or {})
    args = tuple(args)
    work = copy.deepcopy(model).eval()
    try:
        with torch.no_grad():
            reference = work(*args, **kwargs)
    except Exception as exc:
        raise CaptureError(
            f"{type(model).__name__} failed on the example inputs, before any capture: {type(exc).__name__}: {exc}"
        ) from exc
    reference_outputs = tuple(t.detach().clone() for t in flatten_outputs(reference))
    output_names = _output_names(reference)
    trace_args, trace_kwargs = args, kwargs
    if dynamic_shapes == "auto":
        dynamic_shapes = auto_dynamic_shapes(work, args, kwargs)
        trace_args, trace_kwargs = _widen_unit_dims(args, kwargs)

    try:
        exported = torch.export.export(work, trace_args, trace_kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        module = exported.module()
        ir = "aten"
    except Exception as exc:  # every failure becomes a CaptureError that names the place
        export_error = exc
        if not fallback:
            raise CaptureError(describe_capture_failure(work, exc)) from exc
        try:
            module = fx.symbolic_trace(work)
            ir = "fx"
        except Exception:  # noqa: BLE001
            raise CaptureError(describe_capture_failure(work, export_error)) from export_error
        fallback_reason = describe_capture_failure(work, export_error)
        warnings.warn(
            "torch.export could not capture the model; fell back to torch.fx.symbolic_trace "
            "(passes that need the ATen graph will be skipped):\n" + fallback_reason,
            stacklevel=2,
        )
    # torch.export's module refuses .eval(); the graph already holds eval-mode ops, and the
    # flags only keep downstream tools (the ONNX exporter) from warning about training mode.
    for submodule in module.modules():
        submodule.training = False
    _record_provenance(module)
    program = Program(
        module=module,
        args=args,
        kwargs=kwargs,
        dynamic_shapes=dynamic_shapes,
        reference_outputs=reference_outputs,
        output_names=output_names,
        ir=ir,
        meta={"model_class": f"{type(model).__module__}.{type(model).__qualname__}"},
    )
    if ir == "fx":
        program.meta["capture_fallback"] = fallback_reason
    _check_reproduces(program)
    return program


def _check_reproduces(program: Program) -> None:
    reference_outputs = program.reference_outputs
    got = program.run()
    if len(got) != len(reference_outputs) or any(
        g.shape != r.shape or not torch.allclose(g, r, rtol=1e-4, atol=1e-5, equal_nan=True) for g, r in zip(got, reference_outputs)
    ):
        raise CaptureError("the captured graph does not reproduce the model's outputs on the example inputs")


def auto_dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """Dynamic batch for every tensor input, dynamic sequence for 2-D integer text inputs."""
    # Dim.DYNAMIC lets torch.export derive the valid range (e.g. seq <= max positions)
    # instead of failing on a guessed bound.
    batch = seq = torch.export.Dim.DYNAMIC

    def spec(name: str, value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return None
        dims = {0: batch}
        if value.dim() == 2 and not value.is_floating_point() and (name in _SEQUENCE_INPUTS or name.startswith("arg")):
            dims[1] = seq
        return dims

    # torch.export wants the spec shaped like the forward signature: one entry per named
    # parameter, and a dict under the name of a **kwargs parameter for what lands there.
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError:
        return {k: spec(k, v) for k, v in kwargs.items()} if not args else tuple(spec(f"arg{i}", a) for i, a in enumerate(args))
    specs: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        parameter = bound.signature.parameters[name]
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            specs[name] = {k: spec(k, v) for k, v in value.items()}
        elif parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            specs[name] = tuple(spec(f"arg{i}", v) for i, v in enumerate(value))
        else:
            specs[name] = spec(name if kwargs.get(name) is value else f"arg{len(specs)}", value)
    return specs


def _widen_unit_dims(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Example inputs for tracing with size-1 batch/sequence dims repeated to 2.

    torch.export specializes a dimension whose example size is 1 (it cannot tell it from
    broadcasting), which conflicts with marking it dynamic. The trace only needs shapes, so
    it runs on the widened copy; reference outputs and verification keep the user's inputs.
    """

    def widen(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return value
        dims = [0] + ([1] if value.dim() == 2 and not value.is_floating_point() else [])
        for dim in dims:
            if value.shape[dim] == 1:
                value = torch.cat([value, value], dim=dim)
        return value

    return tuple(widen(a) for a in args), {k: widen(v) for k, v in kwargs.items()}


def _output_names(outputs: Any) -> list[str]:
    leaves, _ = pytree.tree_flatten_with_path(outputs)
    names = []
    for path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            continue
        parts = []
        for key in path:
            for attr in ("key", "name", "idx"):
                if hasattr(key, attr):
                    parts.append(str(getattr(key, attr)))
                    break
        names.append("_".join(parts) or "output")
    return names


def _record_provenance(module: fx.GraphModule) -> None:
    from graphopt.program import module_path

    for node in module.graph.nodes:
        if node.op == "get_attr":
            path = node.target.rpartition(".")[0]
        elif node.op == "call_module":
            path = node.target
        else:
            path = module_path(node)
        node.meta.setdefault("graphopt_module_path", path)
        node.meta.setdefault("graphopt_created_by", "capture")


def describe_capture_failure(model: torch.nn.Module, exc: BaseException) -> str:
    """Name the module path, the source line and the failing op, and suggest a way out."""
    paths = {id(m): name or "<root>" for name, m in model.named_modules()}
    where = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in paths:
            where = (paths[id(owner)], type(owner).__name__, frame.f_code.co_filename, lineno)
    message = str(exc).strip().splitlines()
    first = message[0] if message else type(exc).__name__
    lines = [f"could not capture {type(model).__name__}: {type(exc).__name__}: {first}"]
    if where is not None:
        path, cls, filename, lineno = where
        source = _source_line(filename, lineno)
        lines.append(f"  in module '{path}' ({cls}), {filename}:{lineno}: {source}")
    lines.append(
        "  what to try: make the marked code traceable (no data-dependent Python control flow or "
        ".item()/.tolist() on tensors), pass dynamic_shapes=None to capture static shapes, or "
        "wrap the op in a torch.library custom op."
    )
    return "\n".join(lines)


def _source_line(filename: str, lineno: int) -> str:
    import linecache

    return linecache.getline(filename, lineno).strip()
