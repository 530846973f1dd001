"""The residual Add and the RMSNorm after it as one ORT kernel: ``SkipSimplifiedLayerNormalization``.

A pre-norm decoder layer ends each half with ``h = h + f(norm(h))`` and normalises the sum
for the next half. ORT fuses the norm (``x / sqrt(mean(x^2) + eps) * w``, the form the
``rms-norm`` pass writes) into ``SimplifiedLayerNormalization`` at session creation, but its
own ``SkipLayerNormFusion`` leaves the Add outside when the sum is read again (by the next
residual Add), which it always is. A 24-layer decoder then runs 48 Adds and 48 norms per
token where the onnxruntime-genai builder's graphs run 48 ``SkipSimplifiedLayerNormalization``
kernels, whose fourth output is the sum the next residual reads.

:func:`fuse_skip_rms_norm` writes the pair as that kernel wherever the norm reads an Add of
two ``(batch, seq, hidden)`` tensors of one shape; the norm with no Add before it (the
first) stays as it is, for ORT to fuse. (Not as ``SimplifiedLayerNormalization`` in the
file: ORT registers that op in the ONNX domain, where the ONNX checker rejects it.) The op is
ORT's, so :func:`graphopt.export.to_onnx` applies this only to graphs that already need ORT
(they use ``com.microsoft`` kernels), and only when asked (``to_onnx(skip_norm=True)``,
``[export] skip_norm = true``). The kernel sums and normalises in the input's precision, as
the two ops did: the same up to the order of the reduction.

Measured, not assumed (2026-12-07, 2-core AMD EPYC, AVX2 only, ORT 1.32, 2 threads): 48
chained pairs at hidden 896 (the Qwen2.5-0.5B shape) took 81 us as Add +
SimplifiedLayerNormalization and 96 us as SkipSimplifiedLayerNormalization at one token
(1.19-1.21x slower, 7 alternating rounds), and 1.9-3.8 ms against 2.0 ms at 128 tokens. On
the whole int4 model the difference is under the machine's noise (decode 0.80-1.33x per round
over 9 rounds in two runs). So it is off by default; a CPU where the kernel wins can turn it on.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, pattern

_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


class _SkipRmsNorm(pattern.RewriteRuleClassBase):
    """``Mul(w, Div(s, Sqrt(Add(ReduceMean(Pow(s, 2), [-1]), eps))))`` with ``s = Add(a, b)``
    -> ``SkipSimplifiedLayerNormalization(a, b, w)``, whose fourth output is ``s``."""

    def __init__(self, name: str, weight_first: bool):
        super().__init__(name)
        self._weight_first = weight_first

    def pattern(self, op, input, skip, scale, epsilon):
        total = op.Add(input, skip)
        mean_square = op.ReduceMean(op.Pow(total, 2.0), [-1], keepdims=1, noop_with_empty_axes=0)
        normalized = op.Div(total, op.Sqrt(op.Add(mean_square, epsilon)))
        return (op.Mul(scale, normalized) if self._weight_first else op.Mul(normalized, scale)), total

    def check(self, op, *args, **bindings) -> MatchResult:
        result = MatchResult()
        input, skip, scale, epsilon = (bindings[name] for name in ("input", "skip", "scale", "epsilon"))
        eps = ir.convenience.get_const_tensor(epsilon)
        if eps is None or eps.size != 1:
            return result.fail("epsilon is not a scalar constant", epsilon)
        # the kernel takes (batch, seq, hidden) input and skip and a (hidden,) weight, no broadcasting
        if input.shape is None or skip.shape is None or len(input.shape) != 3 or input.shape != skip.shape:
            return result.fail("input and skip are not (batch, seq, hidden) of one shape", input)
        if scale.shape is None or len(scale.shape) != 1 or scale.shape[0] != input.shape[2]:
            return result.fail("the weight is not one vector over the hidden axis", scale)
        if not (input.dtype == skip.dtype == scale.dtype and input.dtype in _FLOATS):
            return result.fail("input, skip and weight are not of one float dtype", input)
        return result

    def rewrite(self, op, input, skip, scale, epsilon, **_):
        eps = float(ir.convenience.get_const_tensor(epsilon).numpy().reshape(()))
        normalized, _mean, _inv_std, total = op.SkipSimplifiedLayerNormalization(
            input, skip, scale, epsilon=eps, _outputs=4, _domain="com.microsoft")
        return normalized, total


_rules = pattern.RewriteRuleSet([_SkipRmsNorm.rule("SkipRmsNorm", weight_first=True), _SkipRmsNorm.rule("SkipRmsNormWeightLast", weight_first=False)])


def fuse_skip_rms_norm(model: ir.Model) -> int:
    """Rewrite ``model`` in place; return how many Add + RMSNorm pairs became one kernel."""
    count = _rules.apply_to_model(model)
    if count:
        model.opset_imports.setdefault("com.microsoft", 1)
    return count
