"""Learned pooled-landmark attention ops (Linformer, learned Nyström): eager vs ONNX Runtime,
exactness at initialisation, padding, gradients, the n_max limit."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import graphopt.attention  # noqa: F401  (registers the ops, declares their lowerings)
from graphopt.attention import pooled, reference
from graphopt.lowerings import lowering_table

DYN = torch.export.Dim.DYNAMIC
LOW = torch.finfo(torch.float32).min
HEADS, HEAD_DIM, N_MAX = 4, 8, 40


def _learned(landmarks: int, n_max: int, seed: int, band: int | None = 2) -> torch.Tensor:
    """Random signed weights, as training may leave them: on each initial segment widened by
    ``band`` tokens either side (so short or padded sequences leave some landmarks empty),
    or everywhere (``band=None``)."""
    init = pooled.linformer_init(landmarks, n_max)
    support = torch.ones_like(init, dtype=torch.bool)
    if band is not None:
        position = torch.arange(n_max)
        member = init > 0
        lo = torch.where(member, position, n_max).amin(-1, keepdim=True) - band
        hi = torch.where(member, position, -1).amax(-1, keepdim=True) + band
        support = (position >= lo) & (position <= hi)
    return torch.randn(init.shape, generator=torch.Generator().manual_seed(seed)) * support


class PooledCall(torch.nn.Module):
    """Calls one pooled attention op on (q, k, v, key_bias); its weights as parameters."""

    def __init__(self, op: str, landmarks: int, band: int | None = 2, **options):
        super().__init__()
        self.op, self.options = op, options
        names = ("proj_k", "proj_v") if op == "linformer" else ("pool",)
        for seed, name in enumerate(names):
            self.register_parameter(name, torch.nn.Parameter(_learned(landmarks, N_MAX, seed + 11, band)))
        self.eval()

    def forward(self, q, k, v, key_bias):
        o, ops = self.options, torch.ops.graphopt
        if self.op == "linformer":
            return ops.linformer_attention(q, k, v, key_bias, self.proj_k, self.proj_v, o["scale"], o["threshold"])
        return ops.nystrom_learned_attention(q, k, v, key_bias, self.pool, o["scale"], o["iterations"], o["threshold"])


def _inputs(batch: int, seq: int, seed: int = 0, padded: bool = True, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, HEADS, seq, HEAD_DIM, generator=gen, dtype=dtype) for _ in range(3))
    bias = torch.zeros(batch, 1, 1, seq, dtype=dtype)
    if padded and batch > 1:
        bias[1, ..., seq - max(1, seq // 4):] = LOW
    return q, k, v, bias


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


CASES = {
    "linformer": dict(landmarks=6, scale=0.3, threshold=0),
    "linformer-threshold-dense": dict(landmarks=7, band=None, scale=0.3, threshold=18),
    "nystrom_learned": dict(landmarks=6, scale=0.3, iterations=6, threshold=0),
    "nystrom_learned-threshold-dense": dict(landmarks=7, band=None, scale=0.3, iterations=6, threshold=18),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_onnxruntime(case):
    module = PooledCall(case.split("-")[0], **CASES[case])
    exported = torch.onnx.export(
        module, _inputs(2, 16), dynamo=True, verbose=False, custom_translation_table=lowering_table(),
        dynamic_shapes=({0: DYN, 2: DYN},) * 3 + ({0: DYN, 3: DYN},),
    )
    session = ort.InferenceSession(exported.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    # Lengths below and above the threshold, below n_max, and the export length; padded rows.
    runs = [_inputs(batch, seq, seed=seq) for batch, seq in ((1, 5), (2, 16), (3, 21), (2, 37), (2, N_MAX))]
    runs.append((*_inputs(2, 23, seed=3)[:3], torch.zeros(1, 1, 1, 1)))  # no mask
    for inputs in runs:
        got = session.run(None, {name: t.numpy() for name, t in zip(names, inputs)})[0]
        with torch.no_grad():
            want = module(*inputs).numpy()
        assert np.isfinite(got).all()
        assert _rel(got, want) < 2e-5, (case, inputs[0].shape)


def test_init_is_segment_means():
    init = pooled.linformer_init(6, N_MAX)
    assert init.shape == (6, N_MAX) and torch.equal(init, pooled.nystrom_learned_init(6, N_MAX))
    assert torch.equal(init, reference.segment_means_matrix(N_MAX, 6, None, torch.float32)[0][0, 0])
    assert torch.equal(pooled.linformer_init(50, N_MAX), torch.eye(N_MAX))  # one token per landmark
    # Under padding and at shorter lengths the normalised rows are the means of the segments' valid tokens.
    valid = torch.ones(2, N_MAX, dtype=torch.bool)
    valid[1, 30:] = False
    average, present = pooled.pooling_matrix(init, torch.where(valid, 0.0, LOW)[:, None, None], N_MAX, torch.float32)
    want, _, want_present = reference.segment_means_matrix(N_MAX, 6, valid, torch.float32)
    assert torch.allclose(average, want, atol=1e-7) and torch.equal(present, want_present)


@pytest.mark.parametrize("seq", [N_MAX, 21])
def test_linformer_is_exact_when_every_landmark_is_one_token(seq):
    q, k, v, bias = _inputs(2, seq)
    init = pooled.linformer_init(N_MAX, N_MAX)
    exact = reference.exact_attention(q, k, v, bias, 0.35)
    approx = torch.ops.graphopt.linformer_attention(q, k, v, bias, init, init, 0.35, 0)
    assert reference.relative_error(approx, exact) < 1e-5
    fewer = pooled.linformer_init(6, N_MAX)
    assert reference.relative_error(torch.ops.graphopt.linformer_attention(q, k, v, bias, fewer, fewer, 0.35, 0), exact) > 1e-2


@pytest.mark.parametrize("padded", [False, True])
def test_nystrom_learned_at_init_is_nystrom(padded):
    q, k, v, bias = _inputs(2, N_MAX, padded=padded)
    learned = torch.ops.graphopt.nystrom_learned_attention(q, k, v, bias, pooled.nystrom_learned_init(6, N_MAX), 0.35, 6, 0)
    assert reference.relative_error(learned, reference.nystrom_attention(q, k, v, bias, 0.35, landmarks=6, iterations=6)) < 1e-5
    # with every landmark one token it is exact (given enough Newton iterations)
    q, k, v, bias = _inputs(2, 12, padded=padded)
    exact = reference.exact_attention(q, k, v, bias, 0.35)
    covering = torch.ops.graphopt.nystrom_learned_attention(q, k, v, bias, pooled.nystrom_learned_init(12, 12), 0.35, 30, 0)
    assert reference.relative_error(covering, exact) < 1e-4
    fewer = torch.ops.graphopt.nystrom_learned_attention(q, k, v, bias, pooled.nystrom_learned_init(3, 12), 0.35, 30, 0)
    assert reference.relative_error(fewer, exact) > 1e-2


@pytest.mark.parametrize("op", ["linformer", "nystrom_learned"])
def test_padding_at_the_end_is_the_shorter_sequence(op):
    module = PooledCall(op, landmarks=6, scale=0.3, iterations=8, threshold=0)
    q, k, v, bias = _inputs(2, 29, seed=5)  # row 1: last 7 keys padded
    kept = 29 - 7
    with torch.no_grad():
        padded = module(q, k, v, bias)[1:, :, :kept]
        short = module(*(x[1:, :, :kept] for x in (q, k, v)), torch.zeros(1, 1, 1, 1))
    assert torch.isfinite(padded).all()
    assert reference.relative_error(padded, short) < 1e-5


@pytest.mark.parametrize("op", ["linformer", "nystrom_learned"])
def test_gradients_match_the_reference(op):
    module = PooledCall(op, landmarks=6, scale=0.3, iterations=6, threshold=0)
    weights = [p.detach() for p in module.parameters()]
    options = [module.options["scale"], *([module.options["iterations"]] if op == "nystrom_learned" else []), module.options["threshold"]]
    fn = pooled.linformer_reference if op == "linformer" else pooled.nystrom_learned_reference
    q, k, v, bias = _inputs(3, 21, seed=2)
    cotangent = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))

    def grads(call):
        tensors = [t.clone().requires_grad_() for t in (q, k, v, *weights)]
        out = call(*tensors[:3], bias, *tensors[3:], *options)
        return torch.autograd.grad(out, tensors, cotangent)

    got = grads(getattr(torch.ops.graphopt, f"{op}_attention"))
    want = grads(fn)
    for name, g, w in zip(("q", "k", "v", "weight", "weight"), got, want):
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6), name
    for g in got[3:]:  # columns past the length get no gradient
        assert (g[:, 21:] == 0).all()


@pytest.mark.parametrize("op", ["linformer", "nystrom_learned"])
def test_gradcheck(op):
    q, k, v, bias = _inputs(2, 6, seed=4, dtype=torch.float64)
    q, k, v = (x[:, :2, :, :3].contiguous().requires_grad_() for x in (q, k, v))
    weight = lambda seed: _learned(3, 8, seed, band=None).double().requires_grad_()
    args = (q, k, v, bias, weight(1), weight(2), 0.4, 0) if op == "linformer" else (q, k, v, bias, weight(3), 0.4, 4, 0)
    assert torch.autograd.gradcheck(getattr(torch.ops.graphopt, f"{op}_attention"), args, fast_mode=True)


def test_opcheck():
    q, k, v, bias = _inputs(2, 9, seed=6)
    w = _learned(4, 12, 0)
    torch.library.opcheck(torch.ops.graphopt.linformer_attention.default, (q, k, v, bias, w, w * 2, 0.3, 0))
    torch.library.opcheck(torch.ops.graphopt.nystrom_learned_attention.default, (q, k, v, bias, w, 0.3, 4, 0))


def test_longer_than_n_max_raises():
    q, k, v, bias = _inputs(2, N_MAX + 1)
    w = pooled.linformer_init(6, N_MAX)
    with pytest.raises(ValueError, match="n_max"):
        torch.ops.graphopt.linformer_attention(q, k, v, bias, w, w, 0.3, 0)
    with pytest.raises(ValueError, match="n_max"):
        torch.ops.graphopt.nystrom_learned_attention(q, k, v, bias, w, 0.3, 6, 0)
    # at most threshold tokens it is exact attention: the projection is not used
    short = torch.ops.graphopt.linformer_attention(q, k, v, bias, w, w, 0.3, N_MAX + 1)
    assert torch.equal(short, reference.exact_attention(q, k, v, bias, 0.3))


def test_the_ops_have_declared_lowerings():
    table = lowering_table()
    assert torch.ops.graphopt.linformer_attention.default in table
    assert torch.ops.graphopt.nystrom_learned_attention.default in table
