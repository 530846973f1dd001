"""The Program: a captured graph plus everything needed to run, verify and export it."""

from __future__ import annotations

import copy
import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from graphopt.verify import real_positions


def flatten_outputs(outputs: Any) -> tuple[torch.Tensor, ...]:
    """Flatten a model output (tensor, tuple, dict, ModelOutput) into its tensor leaves."""
    leaves, _ = pytree.tree_flatten(outputs)
    return tuple(leaf for leaf in leaves if isinstance(leaf, torch.Tensor))


@dataclass
class Program:
    """An fx GraphModule with its example inputs, dynamic dims and reference outputs.

    ``module`` is an ordinary ``torch.fx.GraphModule`` in ATen IR (from ``torch.export``)
    whose parameters are ``get_attr`` nodes, so a pass can rewrite the graph and the
    tensors alike. ``reference_outputs`` are the original model's flattened outputs on the
    example inputs: every pass is measured against them.
    """

    module: fx.GraphModule
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    dynamic_shapes: Any = None
    reference_outputs: tuple[torch.Tensor, ...] = ()
    output_names: list[str] = field(default_factory=list)
    ir: str = "aten"  # "aten" (torch.export) or "fx" (symbolic_trace fallback)
    # Facts about the program itself (the model class, how it was captured). Side inputs of
    # passes (data, tokenizer, teacher) live in the PassContext, never here.
    meta: dict = field(default_factory=dict)
    # Analyses cached by name; dropped when a pass changes the program, except those the
    # pass marks preserved.
    analyses: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def graph(self) -> fx.Graph:
        return self.module.graph

    def __call__(self, *args, **kwargs) -> Any:
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def run(self, args: tuple | None = None, kwargs: dict | None = None) -> tuple[torch.Tensor, ...]:
        """Run on the example inputs (or the given ones) and return flattened outputs."""
        args = self.args if args is None else args
        kwargs = self.kwargs if kwargs is None else kwargs
        return flatten_outputs(self(*args, **kwargs))

    def valid_positions(self) -> torch.Tensor | None:
        """The example inputs' real (non-padding) positions (:func:`graphopt.verify.real_positions`)."""
        return real_positions(self.kwargs)

    def clone(self) -> Program:
        """A deep copy: graph and tensors (shared tensors stay shared within the copy)."""
        with warnings.catch_warnings():
            # torch's pytree specs warn about a deprecated isinstance check when copied
            warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
            module = copy.deepcopy(self.module)
        return Program(
            module=module,
            args=self.args,
            kwargs=self.kwargs,
            dynamic_shapes=self.dynamic_shapes,
            reference_outputs=self.reference_outputs,
            output_names=list(self.output_names),
            ir=self.ir,
            meta=dict(self.meta),
        )

    def invalidate(self, keep: frozenset[str] | set[str] = frozenset()) -> None:
        """Drop cached analyses (all but ``keep``): the program changed."""
        for name in [n for n in self.analyses if n not in keep]:
            del self.analyses[name]

    def analysis(self, name: str, compute) -> Any:
        """Cached analysis: computed once per program state, dropped when a pass modifies it."""
        if name not in self.analyses:
            self.analyses[name] = compute(self)
        return self.analyses[name]

    # ---- statistics used by instrumentation -------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer the graph owns, by qualified name (shared ones repeated)."""
        named: dict[str, torch.Tensor] = dict(self.module.named_parameters(remove_duplicate=False))
        named.update(dict(self.module.named_buffers(remove_duplicate=False)))
        return named

    def parameter_stats(self) -> dict[str, int]:
        """Counts over distinct storages, so a tensor stored once counts once."""
        seen: set[tuple[int, int | torch.SymInt]] = set()
        count = nbytes = 0
        for tensor in self.tensors().values():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
            if key in seen:
                continue
            seen.add(key)
            count += tensor.numel()
            nbytes += tensor.numel() * tensor.element_size()
        return {"parameters": count, "parameter_bytes": nbytes, "tensors": len(seen)}

    def node_count(self) -> int:
        return sum(1 for n in self.graph.nodes if n.op not in ("placeholder", "output"))

    def op_histogram(self) -> dict[str, int]:
        hist: dict[str, int] = {}
        for node in self.graph.nodes:
            if node.op in ("call_function", "call_method", "call_module"):
                key = node_target_name(node)
                hist[key] = hist.get(key, 0) + 1
        return dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0])))

    def fingerprint(self) -> str:
        """Identity of the graph code and of every tensor (storage, shape, in-place version).

        The manager uses it to enforce ``modified=False``: a pass that says it changed
        nothing must leave it unchanged. ``Tensor._version`` counts in-place writes, so
        this is cheap (no hashing of weights) yet sees ``weight.mul_(2)``.
        """
        h = hashlib.sha256(self.module.code.encode())
        for name, tensor in sorted(self.tensors().items()):
            key = (name, tuple(tensor.shape), str(tensor.dtype), tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor._version)
            h.update(repr(key).encode())
        return h.hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().contiguous().cpu()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()


def node_target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        if node.op != "call_module":
            return target
        owner = node.graph.owning_module
        if owner is None:
            raise ValueError(f"call_module node {node.name} is in a graph that no module owns")
        return f"module:{type(owner.get_submodule(target)).__name__}"
    name = getattr(target, "name", None)
    if callable(name):  # OpOverload.name()
        return name()
    return getattr(target, "__name__", str(target))


def module_path(node: fx.Node) -> str:
    """The innermost module path recorded by torch.export for this node ('' for the root)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, _cls = list(stack.values())[-1]
        return _clean_module_path(path)
    return node.meta.get("graphopt_module_path", "")


def _clean_module_path(path: str) -> str:
    # torch.export writes e.g. "L['self'].encoder.layer[0].attention"; make it a dotted FQN.
    import re

    path = re.sub(r"^L\['self'\]\.?|^L__self__\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    return path.strip(".")
