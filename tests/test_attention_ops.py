"""Attention custom ops: eager reference vs ONNX Runtime, exactness, thresholds, mask conversion."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

import graphopt.attention  # noqa: F401  (registers the ops, declares their lowerings)
from graphopt.attention import masks, reference
from graphopt.lowerings import lowering_table

DYN = torch.export.Dim.DYNAMIC
LOW = torch.finfo(torch.float32).min
HEADS, HEAD_DIM = 4, 8


class OpCall(torch.nn.Module):
    """Calls one graphopt attention op on (q, k, v, key_bias); constants as buffers."""

    def __init__(self, op: str, **options):
        super().__init__()
        self.op, self.options = op, options
        if "rotations" in options:
            self.register_buffer("rotations", options.pop("rotations"))
        if op == "hedgehog":  # random feature maps: the lowering must match any trained weights
            gen, f = torch.Generator().manual_seed(7), options.pop("features")
            for name, shape in (("wq", (HEADS, HEAD_DIM, f)), ("bq", (HEADS, 1, f)), ("wk", (HEADS, HEAD_DIM, f)), ("bk", (HEADS, 1, f)), ("mix", (HEADS,))):
                self.register_parameter(name, torch.nn.Parameter(torch.randn(shape, generator=gen)))
        self.eval()

    def forward(self, q, k, v, key_bias):
        o, ops = self.options, torch.ops.graphopt
        if self.op == "fused":
            return ops.fused_attention(q, k, v, o["scale"], o["causal"], HEADS)
        if self.op == "fused_biased":
            return ops.fused_attention_biased(q, k, v, key_bias, o["scale"], o["causal"], HEADS)
        if self.op == "nystrom":
            return ops.nystrom_attention(q, k, v, key_bias, o["scale"], o["landmarks"], o["iterations"], o["threshold"])
        if self.op == "hedgehog":
            weights = (self.wq, self.bq, self.wk, self.bk, self.mix)
            return ops.hedgehog_attention(q, k, v, key_bias, *weights, o["scale"], o["block"], o["sinks"], o["causal"], o["threshold"])
        return ops.lsh_attention(q, k, v, key_bias, self.rotations, o["scale"], o["chunk"], o["causal"], o["threshold"])


def _inputs(batch: int, seq: int, seed: int = 0, padded: bool = True):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, HEADS, seq, HEAD_DIM, generator=gen) for _ in range(3))
    bias = torch.zeros(batch, 1, 1, seq)
    if padded and batch > 1:
        bias[1, ..., seq - max(1, seq // 4):] = LOW
    return q, k, v, bias


def _session(module: OpCall) -> ort.InferenceSession:
    example = _inputs(2, 16)
    exported = torch.onnx.export(
        module, example, dynamo=True, verbose=False, custom_translation_table=lowering_table(),
        dynamic_shapes=({0: DYN, 2: DYN},) * 3 + ({0: DYN, 3: DYN},),
    )
    return ort.InferenceSession(exported.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


CASES = {
    "fused": dict(scale=0.3, causal=False),
    "fused-causal": dict(scale=0.3, causal=True),
    "fused_biased": dict(scale=0.3, causal=False),
    "nystrom": dict(scale=0.3, landmarks=6, iterations=6, threshold=0),
    "nystrom-threshold": dict(scale=0.3, landmarks=6, iterations=6, threshold=18),
    "lsh": dict(scale=0.3, chunk=4, causal=False, threshold=0, rotations=reference.lsh_rotations(HEAD_DIM, 4, 2)),
    "lsh-causal": dict(scale=0.3, chunk=4, causal=True, threshold=0, rotations=reference.lsh_rotations(HEAD_DIM, 4, 3)),
    "hedgehog": dict(scale=0.3, block=4, sinks=1, causal=False, threshold=0, features=6),
    "hedgehog-causal": dict(scale=0.3, block=6, sinks=3, causal=True, threshold=0, features=5),
    "hedgehog-causal-threshold": dict(scale=0.3, block=4, sinks=2, causal=True, threshold=18, features=4),
    "lsh-causal-threshold": dict(scale=0.3, chunk=4, causal=True, threshold=18, rotations=reference.lsh_rotations(HEAD_DIM, 8, 2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_onnxruntime(case):
    module = OpCall(case.split("-")[0], **dict(CASES[case]))
    session = _session(module)
    names = [i.name for i in session.get_inputs()]
    # Lengths below and above any threshold, multiples of the chunk (24: of every block here) and not, and the export length.
    for batch, seq in ((1, 5), (2, 16), (3, 21), (1, 24), (2, 37)):
        inputs = _inputs(batch, seq, seed=seq)
        if batch == 3:  # left padding over whole blocks: query rows whose every key is masked match too
            inputs[3][2, ..., : seq // 2] = LOW
        got = session.run(None, {name: t.numpy() for name, t in zip(names, inputs)})[0]
        with torch.no_grad():
            want = module(*inputs).numpy()
        assert np.isfinite(got).all()
        assert _rel(got, want) < 2e-5, (case, batch, seq)


def test_fused_ops_lower_to_multi_head_attention():
    session_model = torch.onnx.export(OpCall("fused", scale=0.3, causal=True), _inputs(2, 16), dynamo=True, verbose=False,
                                      custom_translation_table=lowering_table())
    ops = [n.op_type for n in session_model.model_proto.graph.node]
    assert "MultiHeadAttention" in ops and "Softmax" not in ops


@pytest.mark.parametrize("padded", [False, True])
def test_nystrom_is_exact_when_landmarks_cover_the_sequence(padded):
    q, k, v, bias = _inputs(2, 12, padded=padded)
    exact = reference.exact_attention(q, k, v, bias, 0.35)
    approx = reference.nystrom_attention(q, k, v, bias, 0.35, landmarks=12, iterations=30, threshold=0)
    assert reference.relative_error(approx, exact) < 1e-4
    fewer = reference.nystrom_attention(q, k, v, bias, 0.35, landmarks=3, iterations=30, threshold=0)
    assert reference.relative_error(fewer, exact) > 1e-2  # and it is an approximation otherwise


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq", [12, 13])
def test_lsh_is_exact_with_one_bucket_covering_the_sequence(causal, seq):
    q, k, v, bias = _inputs(2, seq)
    one_bucket = torch.zeros(3, HEAD_DIM, 1)  # three rounds, all in bucket 0
    exact = reference.exact_attention(q, k, v, bias, 0.35, causal)
    approx = reference.lsh_attention(q, k, v, bias, one_bucket, 0.35, chunk=seq, causal=causal, threshold=0)
    assert reference.relative_error(approx, exact) < 1e-5
    hashed = reference.lsh_attention(q, k, v, bias, reference.lsh_rotations(HEAD_DIM, 8, 2), 0.35, chunk=4, causal=causal, threshold=0)
    assert reference.relative_error(hashed, exact) > 1e-2


def test_below_threshold_the_ops_are_exact_attention():
    q, k, v, bias = _inputs(2, 16)
    exact = reference.exact_attention(q, k, v, bias, 0.35)
    assert torch.equal(reference.nystrom_attention(q, k, v, bias, 0.35, landmarks=2, threshold=16), exact)
    rotations = reference.lsh_rotations(HEAD_DIM, 8, 2)
    assert torch.equal(reference.lsh_attention(q, k, v, bias, rotations, 0.35, chunk=2, threshold=16), exact)


def test_lsh_causal_never_looks_ahead():
    q, k, v, bias = _inputs(1, 24, padded=False)
    rotations = reference.lsh_rotations(HEAD_DIM, 4, 2)
    base = reference.lsh_attention(q, k, v, bias, rotations, 0.35, chunk=4, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[..., 20:, :] += 5.0  # change the future of position 19
    v2[..., 20:, :] -= 3.0
    moved = reference.lsh_attention(q, k2, v2, bias, rotations, 0.35, chunk=4, causal=True)
    # Hash order of later keys can change which earlier keys share a chunk, so compare
    # with exact attention over the prefix instead of bitwise equality.
    prefix = reference.exact_attention(q[..., :20, :], k[..., :20, :], v[..., :20, :], None, 0.35, causal=True)
    assert torch.isfinite(moved).all()
    assert reference.relative_error(moved[..., :1, :], prefix[..., :1, :]) < 1e-5  # position 0 sees only itself
    assert reference.relative_error(base[..., :1, :], prefix[..., :1, :]) < 1e-5


def test_newton_pinv_converges_to_the_pseudo_inverse():
    a = torch.softmax(torch.randn(3, 10, 10), -1) + torch.eye(10)
    assert torch.allclose(reference.newton_pinv(a, 20), torch.linalg.pinv(a), atol=1e-4)


def test_lsh_rejects_odd_bucket_counts():
    with pytest.raises(ValueError, match="even"):
        reference.lsh_rotations(HEAD_DIM, 3, 1)


def test_importing_the_ops_loads_no_onnx_tooling():
    # The lowerings live in modules only the exporter imports (graphopt.lowerings).
    code = (
        "import sys, graphopt.attention, graphopt.attention.analysis, graphopt.attention.masks\n"
        "print(sorted(m for m in ('onnxscript', 'onnxruntime', 'graphopt.export') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr


def test_every_op_has_a_declared_lowering():
    table = lowering_table()
    ops = torch.ops.graphopt
    for op in (ops.fused_attention, ops.fused_attention_biased, ops.attention_qkv, ops.attention_qkv_biased, ops.nystrom_attention, ops.lsh_attention,
               ops.hedgehog_attention):
        assert op.default in table, op


def test_a_boolean_mask_becomes_the_additive_bias_eager_attention_uses():
    q, k, v, _ = _inputs(3, 9, seed=3)
    keep = torch.rand(3, 1, 9, 9, generator=torch.Generator().manual_seed(4)) > 0.4
    keep[..., 0] = True  # every query keeps a key
    bias = masks.additive_values(keep)
    assert bias.dtype == torch.float32 and set(bias.unique().tolist()) == {0.0, LOW}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert torch.equal(sdpa(q, k, v, attn_mask=bias, scale=0.3), sdpa(q, k, v, attn_mask=keep, scale=0.3))
    assert masks.additive_values(bias) is bias and masks.additive_values(None) is None


def test_a_query_that_keeps_no_key_is_where_the_conversion_differs():
    # The documented exception: SDPA returns 0 there, the additive form (and HF's eager
    # attention, and ORT's kernels) the mean of v.
    q, k, v, _ = _inputs(1, 6, seed=5)
    keep = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    keep[..., 2, :] = False
    sdpa = torch.nn.functional.scaled_dot_product_attention
    exact, converted = sdpa(q, k, v, attn_mask=keep), sdpa(q, k, v, attn_mask=masks.additive_values(keep))
    rows = torch.arange(6) != 2
    assert torch.equal(exact[..., rows, :], converted[..., rows, :])
    assert (exact[..., 2, :] == 0).all() and torch.allclose(converted[..., 2, :], v.mean(-2), atol=1e-6)


def test_fused_biased_op_with_a_converted_boolean_mask_matches_onnxruntime():
    module = OpCall("fused_biased", scale=0.3, causal=False)
    session = _session(module)
    names = [i.name for i in session.get_inputs()]
    q, k, v, _ = _inputs(2, 11, seed=6)
    keep = torch.ones(2, 1, 1, 11, dtype=torch.bool)
    keep[1, ..., 8:] = False
    bias = masks.additive_values(keep)
    got = session.run(None, {name: t.numpy() for name, t in zip(names, (q, k, v, bias))})[0]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.3)
    assert _rel(got, want.numpy()) < 2e-5


# ---- Hedgehog: exact local blocks + sinks, learned linear attention elsewhere --------------
def _feature_maps(features: int = 6, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((HEADS, HEAD_DIM, features), (HEADS, 1, features), (HEADS, HEAD_DIM, features), (HEADS, 1, features), (HEADS,))
    return [torch.randn(shape, generator=gen) for shape in shapes]


def _dense_hedgehog(q, k, v, bias, maps, scale, block, sinks, causal):
    """The definition, in O(n²): softmax weights exp(s - max) on the local set (own block,
    previous block, sinks), exp(mix) φ_q·φ_k on every other allowed key, one normaliser."""
    n = q.shape[-2]
    wq, bq, wk, bk, mix = maps
    i = torch.arange(n)
    local = ((i[None, :] // block == i[:, None] // block) | (i[None, :] // block == i[:, None] // block - 1) | (i[None, :] < sinks))
    allowed = i[None, :] <= i[:, None] if causal else torch.ones(n, n, dtype=torch.bool)
    scores = (q @ k.transpose(-1, -2) * scale + bias).masked_fill(~(local & allowed), -1e30)
    soft = torch.exp(scores - scores.amax(-1, keepdim=True))
    valid = (bias.reshape(bias.shape[0], 1, 1, n) > -1e4).to(q.dtype)
    linear = reference.hedgehog_features(q, wq, bq) @ (reference.hedgehog_features(k, wk, bk) * valid.transpose(-1, -2)).transpose(-1, -2)
    weights = soft + (linear * torch.exp(mix).reshape(1, -1, 1, 1)).masked_fill(local | ~allowed, 0.0)
    return weights @ v / weights.sum(-1, keepdim=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("block", "sinks", "seq"), [(4, 1, 21), (5, 3, 16), (8, 2, 37), (37, 1, 37)])
def test_hedgehog_blocked_computation_is_its_dense_definition(causal, block, sinks, seq):
    q, k, v, bias = _inputs(2, seq, seed=seq)
    maps = _feature_maps()
    got = reference.hedgehog_attention(q, k, v, bias, *maps, 0.35, block, sinks, causal)
    want = _dense_hedgehog(q, k, v, bias, maps, 0.35, block, sinks, causal)
    real = (bias[:, 0, 0] == 0)  # padded queries are not compared (nothing reads them)
    assert (got - want).abs().amax(-1).permute(0, 2, 1)[real].max() < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_hedgehog_is_exact_attention_within_one_block(causal):
    q, k, v, bias = _inputs(2, 12)
    got = reference.hedgehog_attention(q, k, v, bias, *_feature_maps(), 0.35, 16, 1, causal)
    assert _rel(got, reference.exact_attention(q, k, v, bias, 0.35, causal)) < 1e-6
    longer = _inputs(2, 40)
    far = reference.hedgehog_attention(*longer, *_feature_maps(), 0.35, 16, 1, causal)
    assert _rel(far, reference.exact_attention(*longer, 0.35, causal)) > 1e-3  # beyond a block it approximates


def test_hedgehog_causal_never_looks_ahead():
    q, k, v, bias = _inputs(1, 30, padded=False)
    out = reference.hedgehog_attention(q, k, v, bias, *_feature_maps(), 0.35, 4, 2, True)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 17:] += 5.0
    v2[:, :, 17:] -= 3.0
    changed = reference.hedgehog_attention(q, k2, v2, bias, *_feature_maps(), 0.35, 4, 2, True)
    assert torch.equal(out[:, :, :16], changed[:, :, :16])  # earlier blocks do not even see the change
    # query 16 shares key 17's block: the running sum minus that block is the same up to rounding
    assert torch.allclose(out[:, :, 16], changed[:, :, 16], atol=1e-5)
    assert not torch.allclose(out[:, :, 17:], changed[:, :, 17:])


def test_hedgehog_op_gradients_are_the_references():
    q, k, v, bias = (t.requires_grad_(i < 3) for i, t in enumerate(_inputs(2, 19)))
    maps = [t.requires_grad_(True) for t in _feature_maps()]
    leaves = [q, k, v, *maps]
    torch.ops.graphopt.hedgehog_attention(q, k, v, bias, *maps, 0.35, 4, 1, False, 0).square().sum().backward()
    via_op = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    reference.hedgehog_attention(q, k, v, bias, *maps, 0.35, 4, 1, False, 0).square().sum().backward()
    for got, t in zip(via_op, leaves):
        assert torch.equal(got, t.grad) and got.abs().sum() > 0
