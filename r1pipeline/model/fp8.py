"""Block-wise FP8 e4m3 GEMMs as in DeepSeek-V3 §3.3: 1x128 activation tiles, 128x128 weight blocks,
scales from the current amax, fp32 accumulation, fp32 master weights.

All three GEMMs of a linear layer run in FP8 (y = x Wᵀ):
    Fprop  y  = q1x128(x)   · q128x128(W)ᵀ       tiles along K
    Dgrad  dx = q1x128(dy)  · q128x128(W)        tiles along N
    Wgrad  dW = q1x128(dyᵀ) · q1x128(xᵀ)ᵀ        tiles along the tokens M (x re-quantised 128x1)

CPU (the tested path): exact emulation — quantise to e4m3 (saturating cast), dequantise in fp32, matmul.
CUDA on SM90 with torch._scaled_mm's blockwise mode: a real FP8 GEMM, chosen per shape only after it
has matched the emulation and measured faster (`_gpu_route`). Not run on this project's CPU machines.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .config import FP8_BLOCK

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
AMAX_FLOOR = 1e-4  # DeepSeek's act_quant clamp: an all-zero tile gets a finite scale

grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm  # F.grouped_mm from torch 2.10


def _pad_to(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    pad = -x.shape[dim] % multiple
    if not pad:
        return x
    widths = [0, 0] * (x.dim() - dim % x.dim() - 1) + [0, pad]
    return F.pad(x, widths)


def quantize_tiles(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1x128 tiles along the last dim: (e4m3 [..., K], fp32 scales [..., ceil(K/128)]); x ≈ q * s."""
    k = x.shape[-1]
    tiles = _pad_to(x.float(), -1, FP8_BLOCK).unflatten(-1, (-1, FP8_BLOCK))  # [..., K/128, 128]
    scale = tiles.abs().amax(-1, keepdim=True).clamp(min=AMAX_FLOOR) / E4M3_MAX
    q = (tiles / scale).to(E4M3).flatten(-2)[..., :k]
    return q, scale.squeeze(-1)


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 blocks over the last two dims, zero-padded at the edges (DeepSeek's rule):
    (e4m3 [..., N, K], fp32 weight_scale_inv [..., ceil(N/128), ceil(K/128)]); w ≈ q * s per block."""
    n, k = w.shape[-2:]
    padded = _pad_to(_pad_to(w.float(), -1, FP8_BLOCK), -2, FP8_BLOCK)
    blocks = padded.unflatten(-1, (-1, FP8_BLOCK)).unflatten(-3, (-1, FP8_BLOCK))  # [..., N/128, 128, K/128, 128]
    scale = blocks.abs().amax(dim=(-3, -1), keepdim=True).clamp(min=AMAX_FLOOR) / E4M3_MAX
    q = (blocks / scale).to(E4M3).flatten(-2).flatten(-3, -2)[..., :n, :k]
    return q, scale.squeeze(-1).squeeze(-2)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Inverse of quantize_blocks: q [..., N, K] e4m3, scale [..., ceil(N/128), ceil(K/128)]."""
    n, k = q.shape[-2:]
    s = scale.repeat_interleave(FP8_BLOCK, -2)[..., :n, :].repeat_interleave(FP8_BLOCK, -1)[..., :k]
    return (q.float() * s).to(dtype)


def fake_tiles(x: torch.Tensor) -> torch.Tensor:
    """x rounded through 1x128-tile e4m3, in fp32."""
    q, s = quantize_tiles(x)
    return (_pad_to(q.float(), -1, FP8_BLOCK).unflatten(-1, (-1, FP8_BLOCK)) * s.unsqueeze(-1)).flatten(-2)[..., :x.shape[-1]]


def fake_blocks(w: torch.Tensor) -> torch.Tensor:
    """w rounded through 128x128-block e4m3, in fp32."""
    return dequantize_blocks(*quantize_blocks(w))


# ---- GEMMs: a [m, k] (1x128 tiles along k) times b [k, n] (128x128 blocks, or 1x128 tiles along k) ----

_route: dict[tuple, bool] = {}  # (m, k, n, b_blocks, dtype) -> the real FP8 kernel measured faster and correct


def _scaled_mm_available(a: torch.Tensor) -> bool:
    return (a.is_cuda and hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(a.device) == (9, 0)
            and a.dim() == 2 and all(d % FP8_BLOCK == 0 for d in a.shape))


def _gpu_blockwise_mm(a: torch.Tensor, b: torch.Tensor, b_blocks: bool, out_dtype) -> torch.Tensor:
    """torch._scaled_mm with DeepSeek's (1x128, 128x128) or (1x128, 1x128) recipe on SM90 (cuBLASLt,
    CUDA >= 12.9). Scale layouts follow pytorch/pytorch#166752: A scales M-major, K-blocks padded to 4."""
    m, k = a.shape
    a_q, a_s = quantize_tiles(a)                                   # [m, k], [m, k/128]
    if b_blocks:
        b_q, b_s = quantize_blocks(b.t())                          # [n, k], [n/128, k/128]
        b_s = _pad_to(b_s, -1, 4).t()                              # [L4, n/128], stride [1, L4]
    else:
        b_q, b_s = quantize_tiles(b.t())                           # [n, k], [n, k/128]
        b_s = _pad_to(b_s, -1, 4).t().contiguous()                 # [L4, n]
    a_s = _pad_to(a_s, -1, 4).t().contiguous().t()                 # [m, L4] M-major
    return torch._scaled_mm(a_q, b_q.t(), scale_a=a_s[:, : k // FP8_BLOCK], scale_b=b_s[: k // FP8_BLOCK],
                            out_dtype=out_dtype)


def _emulated_mm(a: torch.Tensor, b: torch.Tensor, b_blocks: bool) -> torch.Tensor:
    b_deq = fake_blocks(b.t()).t() if b_blocks else fake_tiles(b.t()).t()
    return fake_tiles(a) @ b_deq


def _gpu_route(a, b, b_blocks) -> bool:
    """Use the real FP8 kernel for this shape only if it agrees with the emulation and is faster."""
    key = (*a.shape, b.shape[1], b_blocks, a.dtype)
    if key not in _route:
        try:
            ref = _emulated_mm(a, b, b_blocks)
            got = _gpu_blockwise_mm(a, b, b_blocks, torch.float32)
            ok = ((got - ref).norm() / ref.norm().clamp(min=1e-12)).item() < 1e-2
        except (RuntimeError, ValueError):
            ok = False
        if ok:
            timings = []
            for fn in (lambda: _gpu_blockwise_mm(a, b, b_blocks, a.dtype),
                       lambda: (a.to(torch.bfloat16) @ b.to(torch.bfloat16))):
                fn()
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(5):
                    fn()
                torch.cuda.synchronize()
                timings.append(time.perf_counter() - start)
            ok = timings[0] < timings[1]
        _route[key] = ok
    return _route[key]


def fp8_mm(a: torch.Tensor, b: torch.Tensor, b_blocks: bool) -> torch.Tensor:
    """a @ b in block-wise FP8, fp32 result. a [m, k]; b [k, n]."""
    if _scaled_mm_available(a) and b.shape[1] % FP8_BLOCK == 0 and _gpu_route(a, b, b_blocks):
        return _gpu_blockwise_mm(a, b, b_blocks, torch.float32)
    return _emulated_mm(a, b, b_blocks)


class FP8Linear(torch.autograd.Function):
    """y = x Wᵀ with FP8 Fprop/Dgrad/Wgrad. x [M, K], weight [N, K]; the grouped form takes
    weight [E, N, K] and int32 `offs` (cumulative rows per expert of the expert-sorted x)."""

    @staticmethod
    def forward(ctx, x, weight, offs=None):
        ctx.save_for_backward(x, weight, offs)
        if offs is None:
            return fp8_mm(x, weight.t(), b_blocks=True).to(x.dtype)                  # [M, N]
        return frozen_fp8_grouped_linear(x, fake_blocks(weight), offs)

    @staticmethod
    def backward(ctx, dy):
        x, weight, offs = ctx.saved_tensors
        if offs is None:
            dx = fp8_mm(dy, weight, b_blocks=True)                                   # [M, K]
            dw = fp8_mm(dy.t(), x, b_blocks=False)                                   # [N, K]
        else:
            # Wgrad tiles run along the expert-sorted tokens; a tile that straddles two experts
            # shares one scale (never finer than DeepSeek's per-expert tiles).
            dx = grouped_mm(fake_tiles(dy), fake_blocks(weight), offs=offs)          # [M, K]
            dw = grouped_mm(fake_tiles(dy.t()), fake_tiles(x.t()).t(), offs=offs)    # [E, N, K]
        return dx.to(x.dtype), dw.to(weight.dtype), None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear (no bias) in block-wise FP8; x [..., K] -> [..., N]."""
    return FP8Linear.apply(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per-expert x_e W_eᵀ in block-wise FP8; x [S, K] sorted by expert, weight [E, N, K] -> [S, N]."""
    return FP8Linear.apply(x, weight, offs)


# ---- a frozen FP8 copy (fp8_compute: a rollout's weights do not change), no autograd ----

def frozen_fp8_linear(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """fp8_linear's forward with the weight already rounded (fake_blocks(weight)): the same product."""
    return (fake_tiles(x.reshape(-1, x.shape[-1])) @ rounded.t()).to(x.dtype).view(*x.shape[:-1], rounded.shape[0])


def frozen_fp8_grouped_linear(x: torch.Tensor, rounded: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """fp8_grouped_linear's forward with the weights already rounded: the same product."""
    return grouped_mm(fake_tiles(x), rounded.transpose(1, 2), offs=offs).to(x.dtype)
