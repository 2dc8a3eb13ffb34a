"""LightningDiT, the latent diffusion transformer, and its flow-matching objective.

The second half of the method: a class-conditional LightningDiT (Yao et al., 2025: DiT/SiT with
modern blocks) learns to generate the tokenizer's 32x16x16 latents; the paper's: XL/1, 256 tokens.

    flow matching: t = 0 is noise, t = 1 is data; x_t = t x1 + (1 - t) eps; the model predicts the
    velocity v = x1 - eps; loss = MSE + (1 - cosine similarity); t ~ logit-normal(0, 1)
    a block: RMSNorm -> attention (qkv bias, optional QK-norm, 2D RoPE) -> RMSNorm -> SwiGLU, each
    branch modulated and gated by AdaLN-Zero from c = t_emb + y_emb

Parameter names and conventions follow hustvl/LightningDiT: its checkpoints load with strict=True.
"""

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def flow_matching_loss(model, x1, y, generator=None):
    """The loss above of a velocity model on clean latents x1 (B, C, H, W), labels y (B,), float32
    (cosine over channels, mean over positions) -> (loss, {"mse", "cos"} detached: no sync)."""
    B = x1.shape[0]
    t = torch.sigmoid(torch.randn(B, device=x1.device, generator=generator))  # (B,)
    eps = torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)
    t_ = t.view(B, *([1] * (x1.dim() - 1))).to(x1.dtype)
    x_t = t_ * x1 + (1 - t_) * eps
    v = (x1 - eps).float()
    v_pred = model(x_t, t, y).float()
    mse = (v_pred - v).pow(2).mean()
    cos = (1 - F.cosine_similarity(v_pred, v, dim=1)).mean()
    return mse + cos, {"mse": mse.detach(), "cos": cos.detach()}


class LightningDiT(nn.Module):
    """Class-conditional velocity model v(x_t, t, y) on latents (B, C, H, W), by default XL/1 on
    32x16x16. `grad_checkpointing` recomputes blocks in backward: less memory, ~1/3 more compute."""

    def __init__(self, input_size: int = 16, patch_size: int = 1, in_channels: int = 32,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                 mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1, num_classes: int = 1000,
                 use_qknorm: bool = False, grad_checkpointing: bool = False):
        super().__init__()
        assert input_size % patch_size == 0, f"input {input_size} is not a multiple of {patch_size}"
        self.in_channels, self.patch_size, self.hidden_size = in_channels, patch_size, hidden_size
        self.depth, self.num_heads = depth, num_heads
        self.num_classes, self.grad_checkpointing = num_classes, grad_checkpointing
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size ** 2
        # A conv with kernel = stride = patch: one linear map per patch.
        self.x_embedder = nn.ModuleDict(dict(proj=nn.Conv2d(in_channels, hidden_size, patch_size,
                                                            stride=patch_size)))
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed tables as in the reference's state dict: sin-cos a frozen Parameter, RoPE buffers.
        pos_embed = get_2d_sincos_pos_embed(hidden_size, self.grid_size)[None]  # (1, N, D)
        self.pos_embed = nn.Parameter(pos_embed, requires_grad=False)
        self.feat_rope = nn.Module()
        cos, sin = rope_tables(hidden_size // num_heads, self.grid_size, self.grid_size)
        self.feat_rope.register_buffer("freqs_cos", cos)
        self.feat_rope.register_buffer("freqs_sin", sin)
        self.blocks = nn.ModuleList(
            LightningDiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        init_adaln_zero(self)
        # The patch embedding is a linear map of each flattened patch: initialised like one.
        nn.init.xavier_uniform_(self.x_embedder.proj.weight.view(hidden_size, -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

    def forward(self, x, t, y, force_drop_ids=None):
        """x_t (B, C, H, W), t (B,) or scalar in [0, 1], labels y (B,) (num_classes: the null class)
        -> the velocity (B, C, H, W)."""
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(y, force_drop_ids)  # (B, D)
        dtype = compute_dtype(x)  # under autocast q and k stay bf16; cast once, not in every block
        rope = self.feat_rope.freqs_cos.to(dtype), self.feat_rope.freqs_sin.to(dtype)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, rope, use_reentrant=False)
            else:
                x = block(x, c, rope)
        return unpatchify(self.final_layer(x, c), self.patch_size, self.grid_size, self.grid_size)


def init_adaln_zero(model):
    """Xavier linears, N(0, 0.02) for the timestep MLP, and AdaLN-Zero: zero modulations and output
    layer, so v = 0 at first and each block starts as the identity (a deep net starts shallow)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    for i in (0, 2):
        nn.init.normal_(model.t_embedder.mlp[i].weight, std=0.02)
    zeroed = [m.adaLN_modulation[-1] for m in model.modules() if hasattr(m, "adaLN_modulation")]
    for linear in zeroed + [model.final_layer.linear]:
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)


def unpatchify(x, p: int, h: int, w: int):
    """(B, h*w, p*p*C) tokens, each laid out (p, q, c) -> (B, C, h*p, w*p)."""
    x = x.unflatten(2, (p, p, -1)).unflatten(1, (h, w))  # (B, h, w, p, q, c)
    return x.permute(0, 5, 1, 3, 2, 4).flatten(4, 5).flatten(2, 3)  # via (B, c, h, p, w, q)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class LightningDiTBlock(nn.Module):
    """Pre-norm block with AdaLN-Zero: c gives a shift, scale and gate for each branch. t2i.py's
    double-stream block calls its three parts, with joint attention between them."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 use_qknorm: bool = False):
        super().__init__()
        assert hidden_size % num_heads == 0, f"width {hidden_size} is not divisible by {num_heads}"
        self.num_heads, head_dim = num_heads, hidden_size // num_heads
        self.norm1, self.norm2 = RMSNorm(hidden_size), RMSNorm(hidden_size)
        # QK-norm bounds the attention logits, which prevents the loss spikes of very long runs.
        qk_norm = RMSNorm if use_qknorm else nn.Identity
        self.attn = nn.ModuleDict(dict(qkv=nn.Linear(hidden_size, 3 * hidden_size),
                                       q_norm=qk_norm(head_dim), k_norm=qk_norm(head_dim),
                                       proj=nn.Linear(hidden_size, hidden_size)))
        self.mlp = SwiGLU(hidden_size, int(2 / 3 * int(hidden_size * mlp_ratio)))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c, rope):  # x: (B, N, D), c: (B, D), rope: the (cos, sin) tables
        mods = self.modulation(c)
        qk, v = self.attention_input(x, mods)  # (B, N, 2, heads, head_dim), (B, N, heads, head_dim)
        return self.residuals(x, attention(qk, v, *rope), mods)

    def modulation(self, c):
        """(shift, scale, gate) of the attention branch, then of the MLP branch: six (B, 1, D)."""
        return self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)

    def attention_input(self, x, mods):
        """split_heads of the normalised, modulated tokens: q and k stacked, and v (no RoPE yet)."""
        qkv = self.attn.qkv(modulate(self.norm1(x), mods[0], mods[1]))
        return split_heads(qkv, self.num_heads, self.attn.q_norm, self.attn.k_norm)

    def residuals(self, x, attn, mods):
        """x + gated attention output (B, N, D, heads joined), then + the gated MLP branch."""
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa * self.attn.proj(attn)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """RMSNorm, modulation by (shift, scale) from c, and a linear map to p*p*C values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = RMSNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p*p*C)


def split_heads(qkv, num_heads: int, q_norm, k_norm):
    """qkv (B, N, 3 * D) -> qk (B, N, 2, heads, head_dim) and v (B, N, heads, head_dim), tokens
    first as the matmul writes them: views unless QK-norm (before RoPE, as in the reference)."""
    qkv = qkv.unflatten(-1, (3, num_heads, -1))
    qk, v = qkv[:, :, :2], qkv[:, :, 2]
    if not isinstance(q_norm, nn.Identity):
        qk = torch.stack([q_norm(qk[:, :, 0]), k_norm(qk[:, :, 1])], dim=2)
    return qk, v


def attention(qk, v, cos, sin, attn_mask=None):
    """RoPE on q and k, then SDPA: qk (B, N, 2, heads, head_dim), v (B, N, heads, head_dim) ->
    (B, N, heads * head_dim). SDPA reads the transposed (B, heads, N, head_dim) views in place."""
    q, k = apply_rope(qk, cos, sin).unbind(2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=attn_mask)
    return out.transpose(1, 2).flatten(2)


class SwiGLU(nn.Module):
    """w3(silu(a) * b) with [a, b] = w12(x); hidden = int(2/3 * 4 dim) keeps a 4x MLP's size."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, normalised in float32 (a mean of squares in bf16 loses
    precision), returned in compute_dtype so that what follows under autocast stays bf16."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = compute_dtype(x)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.to(dtype) * self.weight.to(dtype)


def compute_dtype(x):
    """The dtype that matmuls give under autocast (bf16), else x's own."""
    autocast = torch.is_autocast_enabled(x.device.type)
    return torch.get_autocast_dtype(x.device.type) if autocast else x.dtype


class TimestepEmbedder(nn.Module):
    """t -> 256 sinusoidal features [cos(t f), sin(t f)], f_i = 1e4^(-i / 128) -> Linear, SiLU,
    Linear. t is the raw flow time in [0, 1], not x1000 (DDPM's DiT): the reference trains so."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def timestep_embedding(t, dim: int = 256, max_period: float = 10000.0):
        half = dim // 2
        i = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(max_period) * i / half)  # f_i, (half,)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)

    def forward(self, t):  # (B,) -> (B, D)
        return self.mlp(self.timestep_embedding(t))


class LabelEmbedder(nn.Module):
    """Class label -> vector. Row `num_classes` is classifier-free guidance's null class: in
    training each label becomes null with probability `dropout_prob`, so that one model learns both
    p(x|y) and p(x); force_drop_ids == 1 makes those rows null instead."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels, force_drop_ids=None):  # (B,) long -> (B, D)
        if force_drop_ids is None and self.training and self.dropout_prob > 0:
            force_drop_ids = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
        if force_drop_ids is not None:
            labels = torch.where(force_drop_ids.bool(), self.num_classes, labels)
        return self.embedding_table(labels)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """MAE's 2D sin-cos table (grid_size**2, D) float32, tokens row-major: the first D/2 channels
    encode the column, the last the row, as [sin(p w_k), cos(p w_k)] with w_k = 1e4^(-4k/D)."""
    assert embed_dim % 4 == 0, "sin-cos position embedding needs a width divisible by 4"
    k = torch.arange(embed_dim // 4, dtype=torch.float64)
    omega = 1.0 / 10000 ** (k / (embed_dim / 4))  # w_k, (D/4,)
    pos = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    angles = [p.reshape(-1, 1) * omega for p in (cols, rows)]  # 2 x (N, D/4)
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1).float()


def rope_tables(head_dim: int, rows: int, cols: int, theta: float = 10000.0, device=None):
    """2D axial RoPE: cos, sin (rows*cols, head_dim) float32, tokens row-major; the first half turns
    with the row, the second with the column, pair (2i, 2i+1) of each at theta^(-4i / head_dim)."""
    assert head_dim % 4 == 0, "2D RoPE needs a head dim divisible by 4"
    half, f64 = head_dim // 2, dict(dtype=torch.float64, device=device)
    freqs = (1.0 / theta ** (torch.arange(0, half, 2, **f64) / half)).repeat_interleave(2)
    r, c = torch.meshgrid(torch.arange(rows, **f64), torch.arange(cols, **f64), indexing="ij")
    angles = torch.cat([r.reshape(-1, 1) * freqs, c.reshape(-1, 1) * freqs], dim=1)  # (N, head_dim)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """Rotate adjacent pairs (a, b) of x (B, N, ..., head_dim) by their token's angles:
    (a cos - b sin, b cos + a sin); cos and sin (N, head_dim) in x's dtype."""
    shape = (x.shape[1],) + (1,) * (x.dim() - 3) + (x.shape[-1],)  # broadcast over B, heads, ...
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return x * cos.view(shape) + torch.stack((-b, a), dim=-1).flatten(-2) * sin.view(shape)


_SIZES = {"B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}  # depth, width, heads
DiT_models = {f"{s}/{p}": partial(LightningDiT, depth=d, hidden_size=w, num_heads=h, patch_size=p)
              for s, (d, w, h) in _SIZES.items() for p in (1, 2)}


def build_dit(name: str, **kwargs):
    """E.g. build_dit("XL/1", input_size=16, in_channels=32, use_qknorm=True)."""
    return DiT_models[name](**kwargs)
