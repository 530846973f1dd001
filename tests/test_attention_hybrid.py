"""Sparse + summary (hybrid) attention: exactness, accuracy on clustered keys, padding, shapes."""

import pytest
import torch

from graphopt.attention.hybrid import hybrid_attention
from graphopt.attention.reference import exact_attention, relative_error


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clustered(n, d=16, heads=2, groups=8, spread=0.005, seed=0, dtype=torch.float64):
    """Keys in tight clusters that are contiguous, equal runs of the sequence; q and v random.

    With ``clusters=groups`` the evenly spaced k-means seeds land one per run, so the
    clustering recovers the runs and every summary covers near-identical keys.
    """
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(heads, groups, d, generator=gen, dtype=dtype) * 1.5
    member = (torch.arange(n) // (n // groups)).expand(heads, n)
    k = torch.gather(centers, 1, member[..., None].expand(heads, n, d)) + spread * torch.randn(heads, n, d, generator=gen, dtype=dtype)
    q = torch.randn(heads, n, d, generator=gen, dtype=dtype)
    v = torch.randn(heads, n, d, generator=gen, dtype=dtype)
    return q[None], k[None], v[None]


def random_qkv(b, h, n, d, m=None, dv=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    dv = d if dv is None else dv
    return (torch.randn(b, h, n, d, generator=gen, dtype=dtype), torch.randn(b, h, m, d, generator=gen, dtype=dtype), torch.randn(b, h, m, dv, generator=gen, dtype=dtype))


@pytest.mark.parametrize("n", [64, 200, 256])
def test_exact_when_exact_part_covers_every_key(n):
    q, k, v = random_qkv(1, 2, n, 16, dtype=torch.float64)
    out = hybrid_attention(q, k, v, scale=0.25, block=64, blocks=4)
    assert torch.allclose(out, exact_attention(q, k, v, scale=0.25), atol=1e-12)


def test_exact_below_threshold():
    q, k, v = random_qkv(1, 2, 512, 16, dtype=torch.float64)
    out = hybrid_attention(q, k, v, scale=0.25, block=64, blocks=1, threshold=512)
    assert torch.allclose(out, exact_attention(q, k, v, scale=0.25), atol=1e-12)


def test_close_to_exact_on_clustered_keys():
    q, k, v = clustered(1024)
    exact = exact_attention(q, k, v, scale=0.5)
    out = hybrid_attention(q, k, v, scale=0.5, block=64, blocks=2, summary=16, clusters=8)
    assert relative_error(out, exact) < 1e-2
    # a non-trivial approximation: the summaries carry real mass here
    assert relative_error(v.mean(-2, keepdim=True).expand_as(exact), exact) > 0.3


def test_all_valid_keys_selected_through_the_approximate_path_is_exact():
    # 256 valid keys + 64 padded ones: 5 key blocks, 4 exact. Padding sorts last, so the 4
    # exact blocks hold every valid key and the approximate path must equal exact attention.
    q, k, v = random_qkv(1, 2, 300, 16, m=320, dtype=torch.float64)
    k[..., 256:, :] *= 50
    v[..., 256:, :] *= 50
    bias = torch.zeros(1, 1, 1, 320, dtype=torch.float64)
    bias[..., 256:] = -1e9
    out = hybrid_attention(q, k, v, bias, scale=0.25, block=64, blocks=4, summary=16)
    assert torch.allclose(out, exact_attention(q, k, v, bias, scale=0.25), atol=1e-10)


@pytest.mark.parametrize("padding_bias", [-1e4, torch.finfo(torch.float32).min])
def test_padded_keys_get_no_weight(padding_bias):
    q, k, v = clustered(1024, dtype=torch.float32)
    keep = 896  # seven whole clusters of 128 keys; the eighth is padding
    bias = torch.zeros(1, 1, 1, 1024)
    bias[..., keep:] = padding_bias
    out = hybrid_attention(q, k, v, bias, scale=0.5, block=64, blocks=2, summary=16, clusters=7)
    # garbage in the padded keys and values changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[..., keep:, :] = 100.0
    v2[..., keep:, :] = 1e3
    out2 = hybrid_attention(q, k2, v2, bias, scale=0.5, block=64, blocks=2, summary=16, clusters=7)
    assert torch.allclose(out, out2, atol=1e-5)
    assert out2.abs().max() < 50
    exact = exact_attention(q, k[..., :keep, :], v[..., :keep, :], scale=0.5)
    assert relative_error(out, exact) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,h,n,m,d,dv", [(2, 3, 300, 300, 16, 16), (1, 2, 130, 513, 8, 24), (1, 1, 1000, 1000, 32, 32)])
def test_shapes_and_dtypes(dtype, b, h, n, m, d, dv):
    q, k, v = random_qkv(b, h, n, d, m=m, dv=dv, dtype=dtype)
    bias = torch.zeros(b, 1, 1, m, dtype=dtype)
    bias[0, ..., m - 7 :] = -1e4
    out = hybrid_attention(q, k, v, bias, scale=d**-0.5, block=64, blocks=2, summary=16)
    assert out.shape == (b, h, n, dv) and out.dtype == dtype
    assert torch.isfinite(out).all()


def test_block_must_be_a_multiple_of_summary():
    q, k, v = random_qkv(1, 1, 512, 8)
    with pytest.raises(ValueError):
        hybrid_attention(q, k, v, block=64, blocks=1, summary=24)
