"""Hand-written kernels of the SwinV2 encoder (`simmim.models.swinv2`), each equal to the plain PyTorch ops it
replaces (tests/test_swinv2.py compares outputs and gradients): autograd Functions whose backward passes over
memory fewer times than autograd's, oneDNN's GEMM for CPU float32 linears, FlexAttention with a bias table.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["GatherTokens", "linear", "flex_attention_with_table", "ScaledNormalize", "SplitHeads", "BiasedAttention",
           "ATTN_CHUNK_BYTES", "attention_chunks"]


class GatherTokens(torch.autograd.Function):
    """x (B, L, C) -> x[:, order] (B, L, C); backward gathers with the inverse order (a permutation), so both
    directions are one copy, where autograd's index backward would scatter-add."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(1, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


class _OneDNNLinear(torch.autograd.Function):
    """F.linear for CPU float32 through oneDNN's GEMM (forward, and the input gradient as a linear map by the
    transposed weight); the weight gradient stays torch.mm. x (..., in), weight (out, in), bias (out,) or None."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        x2 = x.reshape(-1, x.shape[-1])
        return torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "").view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # the transposed weight as a strided view: oneDNN reads it in place, no transposed copy
            grad_x = torch.ops.mkldnn._linear_pointwise(g2, weight.t(), None, "none", [], "").view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(g2.t(), x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b


_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear. Eager CPU float32 goes through oneDNN, which multiplies these thin matrices up to 1.6x faster
    than the MKL sgemm behind F.linear on the CPUs measured (same products; scripts/benchmark.py)."""
    if (_ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def _flex_with_table(q, k, v, table: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T + table[h]) v with FlexAttention: q, k, v (B, H, N, d), table (H, N, N) or None, added to
    the logits inside the kernel by a score_mod (its gradient is accumulated there too)."""
    from torch.nn.attention.flex_attention import flex_attention

    def add_table(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx, kv_idx]

    return flex_attention(q, k, v, score_mod=None if table is None else add_table, scale=1.0)


@functools.cache
def _compiled_flex_with_table() -> Callable:
    return torch.compile(_flex_with_table, dynamic=False)


def flex_attention_with_table(q, k, v, table: torch.Tensor | None) -> torch.Tensor:
    """`_flex_with_table`, compiled into fused kernels on CUDA (FlexAttention is only fast compiled); inside a
    compiled region it is traced as it is. On CPU PyTorch runs it unfused and has no backward for it."""
    if q.is_cuda and not torch.compiler.is_compiling():
        return _compiled_flex_with_table()(q, k, v, table)
    return _flex_with_table(q, k, v, table)


class ScaledNormalize(torch.autograd.Function):
    """F.normalize(x, dim=-1) * scale with a hand-written backward: two passes over x each way, where autograd
    takes about ten. x (..., d); scale (heads, 1, 1) broadcast against x's (heads, N, d) dims, or None for 1."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        factor = norm.clamp_min(1e-12).reciprocal_()  # F.normalize's eps
        if scale is not None:
            factor = factor * scale
        y = x * factor
        ctx.save_for_backward(y, factor, norm, scale)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, factor, norm, scale = ctx.saved_tensors
        dot = torch.linalg.vecdot(grad, y, dim=-1).unsqueeze(-1)  # <g, y>
        scale_sq = 1.0 if scale is None else scale.square()
        coef = torch.where(norm > 1e-12, dot / scale_sq, 0.0)  # where the norm is clamped it is a constant
        grad_x = torch.addcmul(grad, y, coef, value=-1).mul_(factor)
        grad_scale = None
        if scale is not None and ctx.needs_input_grad[1]:
            dims = tuple(range(dot.ndim - scale.ndim)) + (dot.ndim - 2,)
            grad_scale = (dot / scale).sum(dims).view_as(scale)  # <g, x / |x|> per head
        return grad_x, grad_scale


class SplitHeads(torch.autograd.Function):
    """qkv (B, N, 3 * heads * d) -> q, k, v, each (B, heads, N, d) and contiguous, from one copy; the backward
    writes the three gradients into one (B, N, 3, heads, d) buffer, where autograd of permute + unbind would
    stack them and copy once more."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, C3 = qkv.shape
        return qkv.view(B, N, 3, heads, C3 // (3 * heads)).permute(2, 0, 3, 1, 4).contiguous().unbind(0)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # a missing gradient arrives as zeros (materialized)
        B, heads, N, d = grads[0].shape
        out = grads[0].new_empty(B, N, 3, heads, d)
        for i, g in enumerate(grads):
            out[:, :, i].copy_(g.transpose(1, 2))
        return out.view(B, N, 3 * heads * d), None


ATTN_CHUNK_BYTES = 1 << 20  # (N, N) matrices per chunk of `BiasedAttention`: about this many bytes


def attention_chunks(batch: int, heads: int, n: int, itemsize: int) -> int:
    """Matrices per chunk of the flattened (batch * heads) attention: a multiple of `heads` or a divisor of it,
    so each chunk's bias is one slice of the (heads, N, N) table, and about ATTN_CHUNK_BYTES of logits."""
    target = max(1, ATTN_CHUNK_BYTES // (n * n * itemsize))
    if target >= heads:
        return heads * min(batch, target // heads)
    return max(c for c in range(1, target + 1) if heads % c == 0)


class BiasedAttention(torch.autograd.Function):
    """softmax(q k^T + bias) v on CPU with a hand-written backward: q, k, v (B, H, N, d), bias (H, N, N)
    broadcast over B.

    The (N, N) matrices are the largest tensors of a window attention and each pass over them goes to memory,
    so both directions run over chunks of about ATTN_CHUNK_BYTES that stay in cache: forward computes a
    chunk's logits into the saved probabilities, adds the bias and takes the softmax in place and multiplies by
    v; backward reads the chunk's probabilities once and keeps its logit gradient in one reused buffer for the
    three products and the bias gradient (the logit gradient summed over B). Autograd of the same ops passes
    over the full matrices about fifteen times."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, H, N, d = q.shape
        q3, k3, v3 = (t.reshape(B * H, N, d) for t in (q, k, v))
        attn = q3.new_empty(B * H, N, N)
        out = q3.new_empty(B * H, N, d)
        step = attention_chunks(B, H, N, q.element_size())
        for start in range(0, B * H, step):
            end = min(start + step, B * H)
            logits = torch.bmm(q3[start:end], k3[start:end].transpose(1, 2), out=attn[start:end])
            if step <= H:
                logits.add_(bias[start % H:start % H + step])
            else:
                logits.view(-1, H, N, N).add_(bias)
            torch.ops.aten._softmax.out(logits, -1, False, out=logits)  # row by row: in place is exact
            torch.bmm(logits, v3[start:end], out=out[start:end])
        ctx.save_for_backward(q3, k3, v3, attn)
        ctx.heads, ctx.step, ctx.bias_grad = H, step, ctx.needs_input_grad[3]
        return out.view(B, H, N, d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q3, k3, v3, attn = ctx.saved_tensors
        H, step = ctx.heads, ctx.step
        BH, N, d = q3.shape
        grad3 = grad.reshape(BH, N, d)
        grad_q, grad_k, grad_v = torch.empty_like(q3), torch.empty_like(k3), torch.empty_like(v3)
        grad_bias = q3.new_zeros(H, N, N) if ctx.bias_grad else None
        buffer = q3.new_empty(step, N, N)
        for start in range(0, BH, step):
            end = min(start + step, BH)
            p, g = attn[start:end], grad3[start:end]
            torch.bmm(p.transpose(1, 2), g, out=grad_v[start:end])
            grad_logits = torch.bmm(g, v3[start:end].transpose(1, 2), out=buffer[:end - start])
            torch.ops.aten._softmax_backward_data.out(grad_logits, p, -1, p.dtype, grad_input=grad_logits)
            torch.bmm(grad_logits, k3[start:end], out=grad_q[start:end])
            torch.bmm(grad_logits.transpose(1, 2), q3[start:end], out=grad_k[start:end])
            if grad_bias is not None and step <= H:  # a chunk of one image's heads
                grad_bias[start % H:start % H + step] += grad_logits
            elif grad_bias is not None:
                grad_bias += grad_logits.view(-1, H, N, N).sum(0)
        shape = (BH // H, H, N, d)
        return grad_q.view(shape), grad_k.view(shape), grad_v.view(shape), grad_bias
