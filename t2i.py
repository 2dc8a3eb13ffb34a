"""The text-to-image model of the paper's LAION experiment: a FLUX-style transformer built from
LightningDiT's blocks (dit.py), trained with the same flow-matching loss (train_t2i.py).

    text (B, L, text_dim) ---context_embedder--> txt tokens (B, L, D)
    latent (B, C, H, W) -----x_embedder--------> img tokens (B, h*w, D)
    double-stream blocks: txt and img keep their own weights, attend jointly
    single-stream blocks: one sequence [txt; img], attention and MLP side by side
    final layer on the img tokens -> velocity (B, C, H, W)

The paper says only "2B parameters"; a secondary source, that it follows FLUX. Ours where FLUX
differs or is silent: c = t_emb + an MLP of the caption's mean text state (FLUX: CLIP's pooled
embedding), no rotation of text tokens, no absolute position embedding, QK-norm on.
"""

from contextlib import nullcontext
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from dit import (FinalLayer, LightningDiTBlock, RMSNorm, TimestepEmbedder, attention, compute_dtype,
                 init_adaln_zero, modulate, rope_tables, split_heads, unpatchify)


class TextToImageDiT(nn.Module):
    """Velocity model v(x_t, t, text) on (B, C, H, W) latents of any grid (the aspect-ratio
    buckets), text = (states (B, L, text_dim), mask (B, L)) of a frozen text encoder."""

    def __init__(self, in_channels: int = 32, patch_size: int = 1, hidden_size: int = 1728,
                 depth_double: int = 10, depth_single: int = 20, num_heads: int = 27,
                 text_dim: int = 4096, mlp_ratio: float = 4.0, use_qknorm: bool = True,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.in_channels, self.patch_size = in_channels, patch_size
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.depth, self.grad_checkpointing = depth_double + depth_single, grad_checkpointing
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.context_embedder = nn.Linear(text_dim, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.text_pool = nn.Sequential(nn.Linear(text_dim, hidden_size), nn.SiLU(),
                                       nn.Linear(hidden_size, hidden_size))
        args = (hidden_size, num_heads, mlp_ratio, use_qknorm)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(*args) for _ in range(depth_double))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(*args) for _ in range(depth_single))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        init_adaln_zero(self)  # as LightningDiT (v = 0 at first); the patch conv as torch does

    def forward(self, x, t, text):
        (states, mask), (B, _, H, W), p = text, x.shape, self.patch_size
        L, h, w = states.shape[1], H // p, W // p
        t = t.expand(B) if t.dim() == 0 else t
        img = self.x_embedder(x).flatten(2).transpose(1, 2)  # (B, h*w, D)
        txt = self.context_embedder(states)  # (B, L, D)
        weight = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weight).sum(1) / weight.sum(1).clamp_min(1)  # (B, text_dim): mean state
        c = self.t_embedder(t) + self.text_pool(pooled)  # (B, D)
        # RoPE (L + h*w, head_dim), made on the device (no host copy), cast once; text: angle 0.
        cos, sin = rope_tables(self.hidden_size // self.num_heads, h, w, device=x.device)
        dtype = compute_dtype(img)
        rope = F.pad(cos, (0, 0, L, 0), value=1).to(dtype), F.pad(sin, (0, 0, L, 0)).to(dtype)
        attend = F.pad(mask, (0, h * w), value=True)[:, None, None, :]  # not the caption's padding
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        run = partial(checkpoint, use_reentrant=False) if recompute else lambda block, *a: block(*a)
        for block in self.double_blocks:
            txt, img = run(block, txt, img, c, rope, attend)
        x = torch.cat([txt, img], dim=1)  # (B, L + h*w, D)
        for block in self.single_blocks:
            x = run(block, x, c, rope, attend)
        return unpatchify(self.final_layer(x[:, L:], c), p, h, w)  # (B, C, H, W)


def joint_attention(qk, v, rope, attend):
    """dit.attention over the L + N joined text and image tokens, the caption's padding masked."""
    # cuDNN's fused attention fails in backward with a padding mask (H200, torch 2.11).
    backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(backends) if qk.is_cuda else nullcontext():
        return attention(qk, v, *rope, attn_mask=attend)


class DoubleStreamBlock(nn.Module):
    """FLUX's double-stream block: one LightningDiT block per stream, attending jointly."""

    def __init__(self, *block_args):  # LightningDiTBlock's
        super().__init__()
        self.txt, self.img = LightningDiTBlock(*block_args), LightningDiTBlock(*block_args)

    def forward(self, txt, img, c, rope, attend):
        mods = self.txt.modulation(c), self.img.modulation(c)
        heads = self.txt.attention_input(txt, mods[0]), self.img.attention_input(img, mods[1])
        qk, v = (torch.cat(parts, dim=1) for parts in zip(*heads))  # tokens L + N at dim 1
        out = joint_attention(qk, v, rope, attend).split([txt.shape[1], img.shape[1]], dim=1)
        return self.txt.residuals(txt, out[0], mods[0]), self.img.residuals(img, out[1], mods[1])


class SingleStreamBlock(nn.Module):
    """FLUX's single-stream block over the joined tokens: attention and SwiGLU side by side, from
    one input matmul (qkv, SwiGLU's halves) into one output matmul, with AdaLN-Zero's modulation."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, use_qknorm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        # Rounded to 8: GPU kernels want v and the MLP halves (slices of linear1's output) aligned.
        self.mlp_hidden = (int(2 / 3 * int(hidden_size * mlp_ratio)) + 7) // 8 * 8
        self.norm = RMSNorm(hidden_size)
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + 2 * self.mlp_hidden)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden, hidden_size)
        self.q_norm = RMSNorm(self.head_dim) if use_qknorm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if use_qknorm else nn.Identity()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 3 * hidden_size))

    def forward(self, x, c, rope, attend):  # x: (B, S, D)
        D = x.shape[-1]
        shift, scale, gate = self.adaLN_modulation(c).unsqueeze(1).chunk(3, dim=-1)
        h = modulate(self.norm(x), shift, scale)
        qkv, a, b = self.linear1(h).split([3 * D, self.mlp_hidden, self.mlp_hidden], -1)
        qk, v = split_heads(qkv, self.num_heads, self.q_norm, self.k_norm)
        attn = joint_attention(qk, v, rope, attend)
        return x + gate * self.linear2(torch.cat([attn, F.silu(a) * b], dim=-1))


# Double-, single-stream blocks, width (192k: SwiGLU's 8/3 x width a multiple of 64), heads of 64;
# 2B: 2.00B parameters with T5-XXL. Patch 1 for our 16x16 latent, 2 for an f8 VAE's 32x32.
_SIZES = {"tiny": (1, 1, 64, 4), "S": (4, 8, 384, 6), "B": (6, 12, 768, 12),
          "L": (8, 16, 1152, 18), "2B": (10, 20, 1728, 27)}
T2I_models = {f"T2I-{size}/{p}": partial(TextToImageDiT, depth_double=dd, depth_single=ds,
                                         hidden_size=w, num_heads=h, patch_size=p)
              for size, (dd, ds, w, h) in _SIZES.items() for p in (1, 2)}


def build_t2i(name: str, **kwargs) -> TextToImageDiT:
    """E.g. build_t2i("T2I-2B/1", in_channels=32, text_dim=4096)."""
    return T2I_models[name](**kwargs)
