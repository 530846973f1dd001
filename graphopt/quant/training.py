"""Gradients through graphopt's quantized ops, so a quantized program can be distilled.

The integer weights stay as they are (the program stays exportable, the ORT kernels
unchanged); the straight-through estimator passes gradients to the activations through
the dequantized weight, so every floating-point parameter around the quantized matmuls
(LayerNorms, embeddings, unquantized layers) learns to compensate for quantization error.
Registered on import; graphopt.distill imports this module.
"""

from __future__ import annotations

import torch

from graphopt.quant import ops
from graphopt.quant.packing import unpack_nbits, unpack_zero_points


def _input_grad(grad: torch.Tensor, weight_kn: torch.Tensor) -> torch.Tensor:
    return (grad.float() @ weight_kn.float().T).to(grad.dtype)


def _bias_grad(grad: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return grad.reshape(-1, grad.shape[-1]).sum(0).to(bias.dtype)


# dynamic int8: (x, w_q, w_scale, bias)
def _dynamic_setup(ctx, inputs, output):
    _x, w_q, w_scale, bias = inputs
    ctx.save_for_backward(w_q, w_scale, bias)


def _dynamic_backward(ctx, grad):
    w_q, w_scale, bias = ctx.saved_tensors
    weight = w_q.float() * w_scale.float()  # [K, N]
    return _input_grad(grad, weight), None, None, _bias_grad(grad, bias)


# static int8: (x, x_scale, x_zero_point, w_q, w_scale, w_zero_point, bias)
def _static_setup(ctx, inputs, output):
    _x, _xs, _xz, w_q, w_scale, w_zero_point, bias = inputs
    ctx.save_for_backward(w_q, w_scale, w_zero_point, bias)


def _static_backward(ctx, grad):
    w_q, w_scale, w_zero_point, bias = ctx.saved_tensors
    weight = (w_q.float() - w_zero_point.float()) * w_scale.float()
    return _input_grad(grad, weight), None, None, None, None, None, _bias_grad(grad, bias)


# n-bit: (x, w_packed, scales, zero_points, bias, K, N, bits, block_size, accuracy_level)
def _nbits_setup(ctx, inputs, output):
    _x, w_packed, scales, zero_points, bias, K, N, bits, block_size, _level = inputs
    ctx.save_for_backward(w_packed, scales, zero_points, bias)
    ctx.shape = (K, N, bits, block_size)


def _nbits_backward(ctx, grad):
    w_packed, scales, zero_points, bias = ctx.saved_tensors
    K, N, bits, block_size = ctx.shape
    codes = unpack_nbits(w_packed, bits, K)
    blocks = codes.shape[1] // block_size
    centered = codes.reshape(N, blocks, block_size) - unpack_zero_points(zero_points, bits, blocks).reshape(N, blocks, 1)
    weight_nk = (centered * scales.float().reshape(N, blocks, 1)).reshape(N, -1)[:, :K]
    return _input_grad(grad, weight_nk.T), None, None, None, _bias_grad(grad, bias), None, None, None, None, None


# bias + GELU: (x, bias)
def _bias_gelu_setup(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _bias_gelu_backward(ctx, grad):
    x, bias = ctx.saved_tensors
    with torch.enable_grad():
        pre = (x + bias).detach().requires_grad_(True)
        (local,) = torch.autograd.grad(torch.nn.functional.gelu(pre), pre, grad)
    return local, _bias_grad(local, bias)


ops.linear_dynamic_int8.register_autograd(_dynamic_backward, setup_context=_dynamic_setup)
ops.linear_static_int8.register_autograd(_static_backward, setup_context=_static_setup)
ops.linear_nbits.register_autograd(_nbits_backward, setup_context=_nbits_setup)
ops.bias_gelu.register_autograd(_bias_gelu_backward, setup_context=_bias_gelu_setup)
