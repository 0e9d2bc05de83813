"""Swin Transformer V2 encoder ("Swin Transformer V2: Scaling Up Capacity and Resolution", Liu et al. 2022).

One file, in the order a reader meets it: position bias (Log-CPB), window attention, block (residual
post-norm, shifted windows), patch merging, stage, `SwinTransformerV2`, the variants and `build_swinv2`. The
hand-written kernels the attention and linears run on are in `simmim.models.kernels`.

Parameter names follow the official microsoft/Swin-Transformer release, so its checkpoints load as they are.
Inside the encoder tokens stay channels-last: (B, H, W, C).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from simmim.models.kernels import (BiasedAttention, GatherTokens, ScaledNormalize, SplitHeads,
                                   flex_attention_with_table, linear)

__all__ = ["SwinTransformerV2", "build_swinv2", "encoder_args", "VARIANTS", "check_img_size"]

NORM_MODES = ("res_post_norm", "pre_norm")
ATTN_MODES = ("cosine", "dot")
POSITION_BIASES = ("log_cpb", "linear_cpb", "table", "none")
ATTN_IMPLS = ("fast", "flex", "reference")
MAX_LOGIT_SCALE = math.log(1.0 / 0.01)
SHIFT_MASK_VALUE = -100.0
DERIVED_BUFFERS = ("relative_coords_table", "relative_position_index", "attn_mask")


# ----------------------------------------------------------------------------------------- position bias
def relative_coords_table(window_size: int, pretrained_window_size: int = 0, log_spaced: bool = True) -> torch.Tensor:
    """Normalized relative offsets of a window, (2W-1, 2W-1, 2) for (dy, dx).

    Offsets are divided by (pretrained_window_size - 1) when given, else by (window_size - 1), so an offset
    seen in pretraining maps to the same input at a larger window. Log-CPB then applies
    sign(x) * log2(1 + 8|x|) / log2(8); linear CPB keeps 8x.
    """
    span = torch.arange(-(window_size - 1), window_size, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(span, span, indexing="ij"), dim=-1)
    denominator = (pretrained_window_size if pretrained_window_size > 0 else window_size) - 1
    table = table / max(denominator, 1) * 8
    if log_spaced:
        table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return table


def relative_position_index(window_size: int) -> torch.Tensor:
    """(N, N) index into the flattened (2W-1)^2 offset table, N = W*W."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)  # 2, N
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)
    return relative[..., 0] * (2 * window_size - 1) + relative[..., 1]


def shifted_window_mask(height: int, width: int, window_size: int, shift_size: int) -> torch.Tensor:
    """(nW, N, N) additive mask: -100 between tokens that came from different regions before the roll."""
    region = torch.zeros(1, height, width, 1)
    bounds = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    for label, (rows, cols) in enumerate((r, c) for r in bounds for c in bounds):
        region[:, rows, cols, :] = label
    labels = window_partition(region, window_size).squeeze(-1)  # nW, N
    different = labels.unsqueeze(1) != labels.unsqueeze(2)
    return torch.zeros(different.shape).masked_fill(different, SHIFT_MASK_VALUE)


@functools.lru_cache(maxsize=64)
def cached_shifted_window_mask(height: int, width: int, window_size: int, shift_size: int,
                               device: torch.device) -> torch.Tensor:
    """`shifted_window_mask` on `device`, computed once per map shape (inputs other than img_size; the last 64
    shapes are kept)."""
    return shifted_window_mask(height, width, window_size, shift_size).to(device)


# ------------------------------------------------------------------------------------------------ windows
def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B*nW, window_size*window_size, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, C)


def window_reverse(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """(B*nW, window_size*window_size, C) -> (B, H, W, C); inverse of `window_partition`."""
    C = windows.shape[-1]
    x = windows.view(-1, height // window_size, width // window_size, window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, C)


def shifted_window_order(height: int, width: int, window_size: int, shift_size: int,
                         device: torch.device | None = None) -> torch.Tensor:
    """(H*W,) token indices such that x.flatten(1, 2)[:, order] = window_partition(roll(x, -shift)), flattened."""
    grid = torch.arange(height * width, device=device).view(1, height, width, 1)
    rolled = torch.roll(grid, shifts=(-shift_size, -shift_size), dims=(1, 2))
    return window_partition(rolled, window_size).flatten()


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability drop_prob, rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def add_to(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """x + self(branch) in one pass: the per-sample keep / (1 - p) scale enters addcmul (same random draws)."""
        if self.drop_prob == 0.0 or not self.training:
            return x + branch
        keep = 1.0 - self.drop_prob
        scale = branch.new_empty((branch.shape[0],) + (1,) * (branch.ndim - 1)).bernoulli_(keep).div_(keep)
        return torch.addcmul(x, branch, scale)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(linear(x, self.fc1.weight, self.fc1.bias)))
        return self.drop(linear(x, self.fc2.weight, self.fc2.bias))


def _drop_derived_buffers(state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: official checkpoints store the derived buffers; we recompute them."""
    for key in [k for k in state_dict if k.startswith(prefix) and k.rsplit(".", 1)[-1] in DERIVED_BUFFERS]:
        del state_dict[key]


# -------------------------------------------------------------------------------------- window attention
def _check_attn_settings(attn_impl: str, sequential_attn: bool, attn_drop: float = 0.0) -> None:
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl={attn_impl!r} is not one of {list(ATTN_IMPLS)}")
    if sequential_attn and attn_impl != "fast":
        raise ValueError(f"sequential_attn needs attn_impl='fast'; the {attn_impl} path attends all windows at once")
    if attn_drop > 0 and attn_impl == "flex":
        raise ValueError(f"attn_impl='flex' has no attention dropout, got attn_drop_rate={attn_drop}; use "
                         f"attn_drop_rate=0 or attn_impl='fast'")


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with scaled cosine attention and continuous position bias.

    Input (B*nW, N, C) with N = window_size**2; `mask` is the shift mask (nW, N, N) or None.
    """

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        pretrained_window_size: int = 0,
        attn_mode: str = "cosine",
        position_bias: str = "log_cpb",
        attn_impl: str = "fast",
        sequential_attn: bool = False,
        sequential_attn_chunk: int = 16,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}; pick heads that divide it")
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.pretrained_window_size = pretrained_window_size
        self.attn_mode, self.position_bias = attn_mode, position_bias
        self.attn_impl = attn_impl
        self.sequential_attn, self.sequential_attn_chunk = sequential_attn, sequential_attn_chunk
        _check_attn_settings(attn_impl, sequential_attn, attn_drop)
        self.attn_drop_p = attn_drop

        if attn_mode == "cosine":
            self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        if position_bias in ("log_cpb", "linear_cpb"):
            self.cpb_mlp = nn.Sequential(nn.Linear(2, 512), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False))
            coords = relative_coords_table(window_size, pretrained_window_size, log_spaced=position_bias == "log_cpb")
            self.register_buffer("relative_coords_table", coords.unsqueeze(0), persistent=False)
        elif position_bias == "table":
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        if position_bias != "none":
            self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)

        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._bias_cache: tuple | None = None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, "
                f"pretrained_window_size={self.pretrained_window_size}, attn_mode={self.attn_mode}, "
                f"position_bias={self.position_bias}")

    def train(self, mode: bool = True):
        self._bias_cache = None
        return super().train(mode)

    # -- position bias
    def _compute_position_bias(self) -> torch.Tensor:
        if self.position_bias == "table":
            table = self.relative_position_bias_table
        else:
            # the coords buffer stays float32 where only parameters are cast (DeepSpeed bf16)
            # 2-D, so the in-place ReLU writes into a plain tensor, not into a view autograd copies back and forth
            coords = self.relative_coords_table.to(self.cpb_mlp[0].weight.dtype).view(-1, 2)
            # 16*sigmoid on the (2W-1)^2 offsets before the gather: the same values as after it, without
            # a (heads, N, N) intermediate kept for backward
            table = 16 * torch.sigmoid(self.cpb_mlp(coords).view(-1, self.num_heads))
        N = self.window_size ** 2
        # index_select: its backward is an index_add, where indexing's is a slow accumulating index_put
        return table.index_select(0, self.relative_position_index.view(-1)).view(N, N, -1).permute(2, 0, 1).contiguous()

    def position_bias_table(self) -> torch.Tensor | None:
        """(heads, N, N) position bias of this window. In eval mode it is computed once per
        (device, dtype, weights) and reused; train() or any in-place change of the weights drops it."""
        if self.position_bias == "none":
            return None
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._compute_position_bias()
        params = [self.relative_position_bias_table] if self.position_bias == "table" else list(self.cpb_mlp.parameters())
        device_type = params[0].device.type
        autocast = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type)
        key = (autocast,) + tuple((p.device, p.dtype, p.data_ptr(), p._version) for p in params)
        if self._bias_cache is None or self._bias_cache[0] != key:
            self._bias_cache = (key, self._compute_position_bias())
        return self._bias_cache[1]

    # -- attention
    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B_, N, C = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = linear(x, self.qkv.weight, bias)
        if x.device.type == "cpu" and not torch.compiler.is_compiling():  # contiguous heads: the normalize and
            # the batched products then run without copies (compiled code fuses the permute instead)
            return SplitHeads.apply(qkv, self.num_heads)
        qkv = qkv.view(B_, N, 3, self.num_heads, C // self.num_heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B_, heads, N, d

    def _temperature(self, dtype: torch.dtype) -> torch.Tensor | float:
        """Multiplier of q.k: the clamped learned per-head scale (heads, 1, 1) for cosine, 1/sqrt(d) for dot."""
        if self.attn_mode == "cosine":
            return torch.clamp(self.logit_scale, max=MAX_LOGIT_SCALE).exp().to(dtype)
        return (self.dim // self.num_heads) ** -0.5

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, num_windows: int | None = None) -> torch.Tensor:
        """x (B*nW, N, C), mask (nW, N, N) or None; num_windows = nW per image (default: from mask, else 1)."""
        B_, N, C = x.shape
        nW = num_windows or (1 if mask is None else mask.shape[0])
        q, k, v = self._qkv(x)
        if self.attn_impl == "reference":
            out = self._reference_attention(q, k, v, mask, nW)
        elif self.attn_impl == "flex":
            out = self._flex_attention(q, k, v, mask, nW)
        else:
            out = self._fast_attention(q, k, v, mask, nW)
        return self.proj_drop(linear(out.transpose(1, 2).reshape(B_, N, C), self.proj.weight, self.proj.bias))

    def _scaled_qk(self, q, k, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k of the fast paths: normalized (cosine attention) with the temperature folded into q, in `dtype`
        (under autocast the norms are float32)."""
        if self.attn_mode == "cosine":
            q = ScaledNormalize.apply(q, self._temperature(torch.float32))
            k = ScaledNormalize.apply(k, None)
        else:
            q = q * self._temperature(q.dtype)
        return q.to(dtype), k.to(dtype)

    def _reference_attention(self, q, k, v, mask: torch.Tensor | None, nW: int) -> torch.Tensor:
        """The formula in the official code's order: (cos(q, k) * scale + bias + shift mask).softmax() v.
        q, k, v (B*nW, heads, N, d) -> (B*nW, heads, N, d). The baseline of tests and scripts/benchmark.py."""
        if self.attn_mode == "cosine":
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self._temperature(q.dtype)
        bias = self.position_bias_table()
        if bias is not None:
            attn = attn + bias.unsqueeze(0)
        if mask is not None:
            B_, heads, N, _ = attn.shape
            attn = attn.view(B_ // nW, nW, heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(B_, heads, N, N)
        return self.attn_drop(attn.softmax(dim=-1)) @ v

    def _fast_attention(self, q, k, v, mask: torch.Tensor | None, nW: int) -> torch.Tensor:
        """Same result with fewer passes over the (N, N) logits: the scale is folded into q (N x d), and the
        position bias and shift mask are added as one term. q, k, v (B*nW, heads, N, d) -> same shape.

        Plain windows attend as (B*nW, heads) against the (heads, N, N) bias, broadcast without a copy. In
        shifted blocks the mask differs per window, so the windows of an image become heads of one call,
        (B, nW*heads, N, d) against a (nW*heads, N, N) term that broadcasts over the batch."""
        B_, heads, N, d = q.shape
        q, k = self._scaled_qk(q, k, v.dtype)
        bias = self.position_bias_table()  # heads, N, N
        bias = None if bias is None else bias.to(v.dtype)
        if mask is not None:
            q, k, v = (t.reshape(B_ // nW, nW * heads, N, d) for t in (q, k, v))
            mask = mask.to(v.dtype)
        if self.sequential_attn and nW > self.sequential_attn_chunk:
            out = self._attend_sequential(q, k, v, bias, mask, nW)
        else:
            out = self._attend(q, k, v, bias, mask)
        return out.reshape(B_, heads, N, d)  # CUDA SDPA may return it non-contiguous

    def _flex_attention(self, q, k, v, mask: torch.Tensor | None, nW: int) -> torch.Tensor:
        """FlexAttention (`attn_impl='flex'`): the windows of an image are heads of one call, (B, nW*heads, N, d),
        and a score_mod adds position bias + shift mask from one (nW*heads, N, N) table inside the kernel, so no
        (N, N) logits reach memory. One table row per (window, head), also in plain blocks, spreads the
        backward's atomic adds over nW times more addresses. Every query sees its whole window, so there is no
        block to skip and no block mask. q, k, v (B*nW, heads, N, d) -> same shape."""
        B_, heads, N, d = q.shape
        q, k = self._scaled_qk(q, k, v.dtype)
        bias = self.position_bias_table()  # heads, N, N
        table = None
        if bias is not None or mask is not None:
            table = torch.zeros((), device=q.device) if bias is None else bias.float()
            if mask is not None:
                table = table + mask.float().unsqueeze(1)  # nW, heads, N, N
            table = table.expand(nW, heads, N, N).reshape(nW * heads, N, N)
        q, k, v = (t.reshape(B_ // nW, nW * heads, N, d) for t in (q, k, v))
        return flex_attention_with_table(q, k, v, table).reshape(B_, heads, N, d)

    def _attend(self, q, k, v, bias: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(q k^T + bias + mask) v. Plain windows: q, k, v (B*nW, heads, N, d), bias (heads, N, N), mask
        None. Shifted: q, k, v (B, w*heads, N, d) and the shift mask of those w windows, (w, N, N).

        PyTorch's fused kernels (CUDA; CPU without gradients) do this without materializing the (N, N)
        matrices. On CPU a bias that needs a gradient sends SDPA to its unfused fallback, which is slower
        than `BiasedAttention` (scripts/benchmark.py), so that case takes it; with attention dropout, or
        compiled, the explicit product below."""
        additive = bias
        if mask is not None:
            w, N = mask.shape[0], mask.shape[-1]
            mask = mask.unsqueeze(1)  # w, 1, N, N
            additive = (mask if bias is None else bias + mask).expand(w, q.shape[1] // w, N, N)
            additive = additive.reshape(1, q.shape[1], N, N)
        dropout = self.attn_drop_p if self.training else 0.0
        cpu_bias_grad = q.device.type == "cpu" and additive is not None and additive.requires_grad
        if not cpu_bias_grad:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=additive, dropout_p=dropout, scale=1.0)
        B, H, N, d = q.shape
        if dropout == 0.0 and not torch.compiler.is_compiling():
            return BiasedAttention.apply(q, k, v, additive.view(H, N, N))
        # 3-D bmm on views (4-D matmul copies the transposed k)
        attn = torch.bmm(q.reshape(B * H, N, d), k.reshape(B * H, N, d).transpose(1, 2)).view(B, H, N, N)
        attn = F.dropout((attn + additive).softmax(dim=-1), dropout, self.training)
        return torch.bmm(attn.view(B * H, N, N), v.reshape(B * H, N, d)).view(B, H, N, d)

    def _attend_sequential(self, q, k, v, bias: torch.Tensor | None, mask: torch.Tensor | None,
                           nW: int) -> torch.Tensor:
        """Attention over chunks of `sequential_attn_chunk` windows (of every image), each recomputed in
        backward, so the attention matrices and bias terms held at once are those of one chunk, not of every
        window (paper, sec. 3.4)."""
        chunk = self.sequential_attn_chunk
        if mask is None:  # (B*nW, heads, N, d): B*chunk windows per call
            step, dim, n = chunk * (q.shape[0] // nW), 0, q.shape[0]
        else:  # (B, nW*heads, N, d): chunk windows of each image per call
            step, dim, n = chunk * (q.shape[1] // nW), 1, q.shape[1]
        outputs = []
        for i, start in enumerate(range(0, n, step)):
            args = [t.narrow(dim, start, min(step, n - start)) for t in (q, k, v)]
            args += [bias, None if mask is None else mask[i * chunk:(i + 1) * chunk]]
            if torch.is_grad_enabled():
                outputs.append(checkpoint(self._attend, *args, use_reentrant=False))
            else:
                outputs.append(self._attend(*args))
        return torch.cat(outputs, dim=dim)


# --------------------------------------------------------------------------------------------------- block
class SwinTransformerV2Block(nn.Module):
    """(Shifted) window attention and MLP, each with a residual post-norm: x + norm(f(x)).

    `input_resolution` is the (H, W) of the stage at img_size; when a side is not larger than the window, the
    window shrinks to the map and there is no shift (as the official code does). Maps of other sizes are padded
    (zeros, bottom and right) to whole windows, with the shift mask of the padded shape.
    """

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: int = 8,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        pretrained_window_size: int = 0,
        norm_mode: str = "res_post_norm",
        extra_norm: bool = False,
        **attn_kwargs,
    ):
        super().__init__()
        self.dim, self.input_resolution, self.num_heads = dim, tuple(input_resolution), num_heads
        if min(self.input_resolution) <= window_size:
            window_size, shift_size = min(self.input_resolution), 0
        self.window_size, self.shift_size = window_size, shift_size
        self.norm_mode = norm_mode

        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                    proj_drop=drop, pretrained_window_size=pretrained_window_size, **attn_kwargs)
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        # H and G: a LayerNorm on the main branch after this block (paper, sec. 3.1 / 4.1).
        self.norm3 = norm_layer(dim) if extra_norm else None

        H, W = self.input_resolution
        mask = shifted_window_mask(H, W, window_size, shift_size) if shift_size > 0 else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, input_resolution={self.input_resolution}, window_size={self.window_size}, "
                f"shift_size={self.shift_size}, norm_mode={self.norm_mode}")

    def _shift_mask(self, height: int, width: int, device: torch.device) -> torch.Tensor | None:
        """The shift mask of a (padded) map: the buffer at input_resolution, else cached per shape."""
        if not self.shift_size or (height, width) == self.input_resolution:
            return self.attn_mask
        return cached_shifted_window_mask(height, width, self.window_size, self.shift_size, device)

    def _window_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C): pad to whole windows, roll, attend within windows, roll back, crop. Roll
        and window partition (and their inverses) are one token gather each (`shifted_window_order`)."""
        B, H, W, C = x.shape
        ws, s = self.window_size, self.shift_size
        pad_h, pad_w = -H % ws, -W % ws
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        num_windows = (Hp // ws) * (Wp // ws)
        if s:
            order = shifted_window_order(Hp, Wp, ws, s, x.device)  # a few tiny ops
            inverse = order.argsort()
            windows = GatherTokens.apply(x.reshape(B, Hp * Wp, C), order, inverse)
            windows = self.attn(windows.view(B * num_windows, ws * ws, C), mask=self._shift_mask(Hp, Wp, x.device),
                                num_windows=num_windows)
            x = GatherTokens.apply(windows.view(B, Hp * Wp, C), inverse, order).view(B, Hp, Wp, C)
        else:
            x = window_reverse(self.attn(window_partition(x, ws), mask=None, num_windows=num_windows), ws, Hp, Wp)
        return x[:, :H, :W].contiguous() if pad_h or pad_w else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        if self.norm_mode == "res_post_norm":
            x = self.drop_path.add_to(x, self.norm1(self._window_attention(x)))
            x = self.drop_path.add_to(x, self.norm2(self.mlp(x)))
        else:
            x = self.drop_path.add_to(x, self._window_attention(self.norm1(x)))
            x = self.drop_path.add_to(x, self.mlp(self.norm2(x)))
        if self.norm3 is not None:
            x = self.norm3(x)
        return x


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat, then reduction and norm (V2 order): (B, H, W, C) -> (B, ceil(H/2), ceil(W/2),
    2C); an odd side is padded with a zero row / column first."""

    def __init__(self, dim: int, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        # Channel order (0,0), (1,0), (0,1), (1,1) as in the official code, so its weights apply.
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * C)
        return self.norm(linear(x, self.reduction.weight))


class BasicLayer(nn.Module):
    """One stage: `depth` blocks alternating plain and shifted windows, then optional patch merging."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        drop_path: Sequence[float],
        downsample: bool,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        use_checkpoint: bool = False,
        extra_norm_every: int = 0,
        **block_kwargs,
    ):
        super().__init__()
        self.dim, self.input_resolution, self.depth = dim, tuple(input_resolution), depth
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            SwinTransformerV2Block(
                dim, input_resolution, num_heads, window_size=window_size,
                shift_size=0 if i % 2 == 0 else window_size // 2, drop_path=drop_path[i], norm_layer=norm_layer,
                extra_norm=extra_norm_every > 0 and (i + 1) % extra_norm_every == 0, **block_kwargs)
            for i in range(depth)
        ])
        self.downsample = PatchMerging(dim, norm_layer) if downsample else None

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C), before merging."""
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: (B, C_in, H, W) -> (B, H/p, W/p, embed_dim)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm_layer: Callable[[int], nn.Module] | None):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, H, W), H and W multiples of the patch size."""
        if x.device.type == "cpu":  # patches gathered once, then one channels-last product (no NCHW output)
            B, C, H, W = x.shape
            p = self.proj.stride[0]
            patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, H // p, W // p, -1)
            x = linear(patches, self.proj.weight.flatten(1), self.proj.bias)
        else:
            x = self.proj(x).permute(0, 2, 3, 1)
        return x if self.norm is None else self.norm(x)


# ---------------------------------------------------------------------------------------------- validation
def _stage_resolutions(img_size: int, patch_size: int, num_stages: int) -> list[int]:
    return [img_size // patch_size // 2 ** i for i in range(num_stages)]


def _size_problem(img_size: int, patch_size: int, num_stages: int, window_size: int) -> str | None:
    """Why img_size does not fit the patch, merging and window sizes, or None when it does."""
    factor = patch_size * 2 ** (num_stages - 1)
    if img_size <= 0 or img_size % factor:
        return f"it is not a multiple of {factor} (patch {patch_size} x 2^{num_stages - 1} merges)"
    for stage, res in enumerate(_stage_resolutions(img_size, patch_size, num_stages)):
        if res > window_size and res % window_size:
            return f"stage {stage} has a {res}x{res} map, which window {window_size} does not tile"
    return None


def check_img_size(img_size: int, patch_size: int, num_stages: int, window_size: int) -> None:
    """Raise one ValueError naming the nearest accepted image sizes when img_size does not fit."""
    problem = _size_problem(img_size, patch_size, num_stages, window_size)
    if problem is None:
        return
    candidates = [s for s in range(1, 8 * max(img_size, 64))
                  if _size_problem(s, patch_size, num_stages, window_size) is None]
    nearest = sorted(candidates, key=lambda s: (abs(s - img_size), s))[:3]
    raise ValueError(f"img_size {img_size} does not fit window_size {window_size}: {problem}; "
                     f"use img_size in {sorted(nearest)} or change window_size")


# -------------------------------------------------------------------------------------------------- model
class SwinTransformerV2(nn.Module):
    """SwinV2 encoder and classifier.

    Arguments as in the official `SwinTransformerV2`, plus: `norm_mode` (res_post_norm | pre_norm),
    `attn_mode` (cosine | dot), `position_bias` (log_cpb | linear_cpb | table | none), `extra_norm_every`
    (a LayerNorm after every k-th block of a stage, H and G use 6), `attn_impl` ("fast"; "flex":
    FlexAttention, for compiled CUDA runs; "reference": the official code's order of operations),
    `sequential_attn` / `sequential_attn_chunk` (windows attended in chunks of this many, each recomputed in
    backward).

    Images of any size are accepted (as timm's strict_img_size=False): `img_size` fixes the window of each stage
    (shrunk where the map at img_size is not larger), other sizes are padded to whole patches, windows and
    mergings, with shift masks computed per padded shape and cached.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        ape: bool = False,
        patch_norm: bool = True,
        use_checkpoint: bool = False,
        pretrained_window_sizes: Sequence[int] | None = None,
        norm_mode: str = "res_post_norm",
        attn_mode: str = "cosine",
        position_bias: str = "log_cpb",
        extra_norm_every: int = 0,
        attn_impl: str = "fast",
        sequential_attn: bool = False,
        sequential_attn_chunk: int = 16,
    ):
        super().__init__()
        for name, value, allowed in (("norm_mode", norm_mode, NORM_MODES), ("attn_mode", attn_mode, ATTN_MODES),
                                     ("position_bias", position_bias, POSITION_BIASES)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")
        num_stages = len(depths)
        pretrained_window_sizes = pretrained_window_sizes or [0] * num_stages
        if len(num_heads) != num_stages or len(pretrained_window_sizes) != num_stages:
            raise ValueError(f"depths, num_heads and pretrained_window_sizes need one entry per stage; got "
                             f"{list(depths)}, {list(num_heads)}, {list(pretrained_window_sizes)}")
        check_img_size(img_size, patch_size, num_stages, window_size)

        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.num_classes, self.embed_dim = num_classes, embed_dim
        self.window_size, self.num_layers = window_size, num_stages
        self.num_features = int(embed_dim * 2 ** (num_stages - 1))
        self.patches_resolution = img_size // patch_size

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm_layer if patch_norm else None)
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.patches_resolution ** 2, embed_dim))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        else:
            self.absolute_pos_embed = None
        self.pos_drop = nn.Dropout(drop_rate)

        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        resolutions = _stage_resolutions(img_size, patch_size, num_stages)
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i in range(num_stages):
            dim = embed_dim * 2 ** i
            self.layers.append(BasicLayer(
                dim, (resolutions[i], resolutions[i]), depths[i], num_heads[i], window_size,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], downsample=i < num_stages - 1,
                norm_layer=norm_layer, use_checkpoint=use_checkpoint, extra_norm_every=extra_norm_every,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                pretrained_window_size=pretrained_window_sizes[i], norm_mode=norm_mode, attn_mode=attn_mode,
                position_bias=position_bias, attn_impl=attn_impl, sequential_attn=sequential_attn,
                sequential_attn_chunk=sequential_attn_chunk))
            self.feature_info.append({"num_chs": dim, "reduction": patch_size * 2 ** i, "module": f"layers.{i}"})

        self.norm = norm_layer(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        self._register_load_state_dict_pre_hook(_drop_derived_buffers)
        if norm_mode == "res_post_norm":
            self._init_res_post_norm()

    def _init_res_post_norm(self) -> None:
        """Zero the post-norms so every block starts as the identity (official initialization)."""
        for layer in self.layers:
            for block in layer.blocks:
                for norm in (block.norm1, block.norm2):
                    nn.init.zeros_(norm.weight)
                    nn.init.zeros_(norm.bias)

    def no_weight_decay(self) -> set[str]:
        return {"absolute_pos_embed"}

    def no_weight_decay_keywords(self) -> set[str]:
        return {"cpb_mlp", "logit_scale", "relative_position_bias_table"}

    # -- settings that can change after construction
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for layer in self.layers:
            layer.use_checkpoint = enable

    def set_sequential_attn(self, enable: bool = True, chunk: int | None = None) -> None:
        for module in self.modules():
            if isinstance(module, WindowAttention):
                _check_attn_settings(module.attn_impl, enable, module.attn_drop_p)
                module.sequential_attn = enable
                if chunk is not None:
                    module.sequential_attn_chunk = chunk

    def compile_blocks(self, **compile_kwargs) -> None:
        """torch.compile every block in place (`nn.Module.compile`): parameter names, activation checkpointing
        (which wraps the block call), sequential attention (inside the graph) and FSDP's per-block units stay
        as they are, and blocks of one stage and kind share compiled code. Patch embedding, merging and the
        final norm stay eager. Calling it again changes nothing."""
        for layer in self.layers:
            for block in layer.blocks:
                if getattr(block, "_compiled_call_impl", None) is None:
                    block.compile(**compile_kwargs)

    def set_attn_impl(self, attn_impl: str) -> None:
        for module in self.modules():
            if isinstance(module, WindowAttention):
                _check_attn_settings(attn_impl, module.sequential_attn, module.attn_drop_p)
                module.attn_impl = attn_impl

    # -- forward
    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans or min(x.shape[2:]) < 1:
            raise ValueError(f"expected input (B, {self.in_chans}, H, W), got {tuple(x.shape)}; pass "
                             f"{self.in_chans}-channel images or build the model with "
                             f"in_chans={x.shape[1] if x.dim() == 4 else '?'}")

    def _position_embedding(self, height: int, width: int) -> torch.Tensor:
        """The absolute position embedding (1, h, w, C), resized bicubically for a grid other than img_size's."""
        R = self.patches_resolution
        pos = self.absolute_pos_embed.view(1, R, R, -1)
        if (height, width) == (R, R):
            return pos
        pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(height, width), mode="bicubic", align_corners=False)
        return pos.permute(0, 2, 3, 1)

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, ceil(H/p), ceil(W/p), C) patch tokens (any H, W: the image is padded with zeros
        to whole patches); where `mask` (B, ceil(H/p), ceil(W/p)) is 1 the token becomes `mask_token` (after
        the patch norm, as SimMIM does)."""
        self._check_input(x)
        p = self.patch_size
        pad_h, pad_w = -x.shape[2] % p, -x.shape[3] % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.patch_embed(x)
        if mask is not None:
            if mask.shape[-2:] != x.shape[1:3]:
                raise ValueError(f"mask is {tuple(mask.shape)} but the image has a {tuple(x.shape[1:3])} patch "
                                 f"grid; pass one mask value per {p}x{p} patch")
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1.0 - w) + mask_token.to(x.dtype) * w
        if self.absolute_pos_embed is not None:
            x = x + self._position_embedding(*x.shape[1:3])
        return self.pos_drop(x)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Stages and final norm on embedded tokens: (B, h, w, C) -> (B, h / 2^(stages-1), w / 2^(stages-1),
        num_features), sides rounded up at each merging."""
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> normalized last-stage map (B, H/32, W/32, num_features)."""
        return self.forward_tokens(self.embed(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, h, w, C) -> pooled (B, C) when pre_logits, else logits (B, num_classes)."""
        x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int] | None = None,
                              norm: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns (final normalized map (B, h, w, C), [stage maps (B, C_i, H_i, W_i) for `indices`]).

        Stage i's map is taken after its blocks and before its patch merging: C_i = embed_dim * 2^i,
        H_i = H / (patch_size * 2^i), rounded up for sizes other than multiples of it. `norm` applies the final
        norm to the last stage's map. Any input size works (see `embed`).
        """
        indices = range(self.num_layers) if indices is None else [i % self.num_layers for i in indices]
        x = self.embed(x)
        maps = []
        for i, layer in enumerate(self.layers):
            x = layer.forward_blocks(x)
            if i in indices:
                last_normed = norm and i == self.num_layers - 1
                maps.append((self.norm(x) if last_normed else x).permute(0, 3, 1, 2))
            if layer.downsample is not None:
                x = layer.downsample(x)
        return self.norm(x), maps


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------- variants
VARIANTS: dict[str, dict] = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    "huge": dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88), extra_norm_every=6),
    "giant": dict(embed_dim=512, depths=(2, 2, 42, 4), num_heads=(16, 32, 64, 128), extra_norm_every=6),
}


SECTION_ONLY_KEYS = ("variant", "compile")  # keys of a recipe's model section that are not constructor arguments


def encoder_args(section: Mapping) -> dict:
    """SwinTransformerV2 arguments of a recipe's model section: lists as tuples, `SECTION_ONLY_KEYS` left out."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in section.items() if k not in SECTION_ONLY_KEYS}


def build_swinv2(name: str, **overrides) -> SwinTransformerV2:
    """A paper-sized SwinV2 (`tiny` ... `giant`) with any constructor argument overridden."""
    if name not in VARIANTS:
        raise ValueError(f"unknown SwinV2 variant {name!r}; choose one of {list(VARIANTS)}")
    return SwinTransformerV2(**{**VARIANTS[name], **overrides})
