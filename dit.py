"""LightningDiT, the latent diffusion transformer, and its flow-matching objective.

The second half of the method: once the aligned tokenizer (tokenizer.py) maps a 256x256 image to a
32x16x16 latent, a class-conditional LightningDiT (Yao et al., 2025: DiT/SiT with modern blocks)
learns to generate such latents by flow matching. The paper uses XL/1: patch 1, 256 tokens.

    flow matching: t = 0 is noise, t = 1 is data; x_t = t x1 + (1 - t) eps; the model predicts the
    velocity v = x1 - eps; loss = MSE + (1 - cosine similarity); t ~ logit-normal(0, 1)
    a block: RMSNorm -> attention (qkv bias, optional QK-norm, 2D RoPE) -> RMSNorm -> SwiGLU, each
    branch modulated and gated by AdaLN-Zero from c = t_emb + y_emb

Parameter names and conventions follow the public LightningDiT code (hustvl/LightningDiT), so that
its checkpoints load with strict=True.
"""

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from common import UserError, load_checkpoint

# ----------------------------------------------------------------------------------------------------
# Flow matching


def flow_matching_loss(model, x1, y, generator=None):
    """The loss of a velocity model on clean latents x1 (B, C, H, W) with labels y (B,).

    t ~ sigmoid(N(0, 1)), most samples near t = 0.5 where the velocity is hardest to predict;
    eps ~ N(0, I); x_t = t x1 + (1 - t) eps; target v = x1 - eps; loss = MSE(v_pred, v) + mean over
    positions of (1 - cos(v_pred, v)) over channels, in float32 even under bf16 autocast. `generator`
    makes t and eps reproducible. Returns (loss, {"mse", "cos"} detached: no host sync)."""
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


# ----------------------------------------------------------------------------------------------------
# The model


class LightningDiT(nn.Module):
    """Class-conditional velocity model v(x_t, t, y) on latents (B, C, H, W); the defaults are XL/1 on
    the paper's 32x16x16 latent. `grad_checkpointing` recomputes each block in the backward pass (less
    activation memory, about a third more compute)."""

    def __init__(self, input_size: int = 16, patch_size: int = 1, in_channels: int = 32,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 class_dropout_prob: float = 0.1, num_classes: int = 1000, use_qknorm: bool = False,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.in_channels = self.out_channels = in_channels  # no learned sigma
        self.patch_size, self.hidden_size, self.depth, self.num_heads = patch_size, hidden_size, depth, num_heads
        self.num_classes, self.grad_checkpointing = num_classes, grad_checkpointing
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.grid_size, self.num_patches = self.x_embedder.grid_size, self.x_embedder.num_patches
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # The fixed sin-cos table: a frozen Parameter, not a buffer, so that the state dict is the reference's.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size), requires_grad=False)
        self.feat_rope = VisionRoPE(hidden_size // num_heads, self.grid_size)
        self.blocks = nn.ModuleList([LightningDiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.pos_embed.copy_(get_2d_sincos_pos_embed(self.hidden_size, self.grid_size).unsqueeze(0))
        w = self.x_embedder.proj.weight  # a linear map of each flattened patch: initialised like one
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # AdaLN-Zero: zero modulation (gates 0: every block starts as the identity) and a zero output
        # layer, so the initial model predicts v = 0 exactly.
        for m in [*(b.adaLN_modulation[-1] for b in self.blocks), self.final_layer.adaLN_modulation[-1],
                  self.final_layer.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, t, y, force_drop_ids=None):
        """x_t (B, C, H, W); t (B,) or scalar in [0, 1]; labels y (B,), y == num_classes for the null
        class. Returns the velocity (B, C, H, W)."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        x = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(y, force_drop_ids)  # (B, D)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, self.feat_rope, use_reentrant=False)
            else:
                x = block(x, c, self.feat_rope)
        return self.unpatchify(self.final_layer(x, c))

    def unpatchify(self, x):  # (B, N, p*p*C), each token laid out (p, q, c) -> (B, C, H, W)
        B, p, g, c = x.shape[0], self.patch_size, self.grid_size, self.out_channels
        x = x.view(B, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (B, c, h, p, w, q)
        return x.reshape(B, c, g * p, g * p)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class LightningDiTBlock(nn.Module):
    """Pre-norm block with AdaLN-Zero: c gives a shift, scale and gate for each branch. The gates start
    at zero, so a deep network starts shallow and stable and learns how much each block contributes."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, use_qknorm: bool = False):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(hidden_size), RMSNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, use_qknorm)
        self.mlp = SwiGLU(hidden_size, int(2 / 3 * int(hidden_size * mlp_ratio)))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c, rope):  # x: (B, N, D), c: (B, D)
        mods = self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)  # six (B, 1, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
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


class Attention(nn.Module):
    """Multi-head self-attention with qkv bias, optional QK-norm (it bounds the attention logits, which
    prevents the loss spikes of very long runs), 2D RoPE, and fused SDPA."""

    def __init__(self, dim: int, num_heads: int, use_qknorm: bool = False):
        super().__init__()
        assert dim % num_heads == 0, f"width {dim} is not divisible by {num_heads} heads"
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim) if use_qknorm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if use_qknorm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope):
        q, k, v = self.heads(x)
        x = F.scaled_dot_product_attention(rope(q), rope(k), v)  # (B, heads, N, head_dim)
        return self.proj(x.transpose(1, 2).flatten(2))

    def heads(self, x):
        """(B, N, C) -> q, k, v, each (B, heads, N, head_dim); QK-norm comes before RoPE, as in the reference."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v


class SwiGLU(nn.Module):
    """w3(silu(a) * b) with [a, b] = w12(x); hidden = int(2/3 * 4 * dim) keeps a 4x MLP's parameter count."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in float32 (a mean of squares in bf16 loses precision), then cast
    to the compute dtype: the input's, as in the reference, or under autocast bf16, so that what follows
    (modulation, the next matmul) runs in bf16 instead of being promoted to float32 by the weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype) * self.weight.to(dtype)


# ----------------------------------------------------------------------------------------------------
# Embeddings of the inputs: patches, time, class, positions


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D): a conv with kernel = stride = patch, one linear map per patch."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        assert input_size % patch_size == 0, f"input_size {input_size} is not a multiple of patch {patch_size}"
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D), row-major


class TimestepEmbedder(nn.Module):
    """t -> 256 sinusoidal features [cos(t f), sin(t f)], f_i = exp(-ln(1e4) i / 128) -> Linear, SiLU,
    Linear. t is the raw flow time in [0, 1], not x1000 as in DDPM-style DiT: the reference (SiT,
    LightningDiT) trains this way, so its checkpoints only make sense with raw t."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)

    def forward(self, t):  # (B,) -> (B, D)
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class label -> vector. Row `num_classes` of the table is the null class of classifier-free
    guidance: in training each label becomes null with probability `dropout_prob`, so that one model
    learns both p(x|y) and p(x). force_drop_ids == 1 makes those rows null (instead of random drops)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels, force_drop_ids=None):  # (B,) long -> (B, D)
        if force_drop_ids is not None:
            labels = torch.where(force_drop_ids.bool(), self.num_classes, labels)
        elif self.training and self.dropout_prob > 0:
            labels = torch.where(torch.rand(labels.shape, device=labels.device) < self.dropout_prob,
                                 self.num_classes, labels)
        return self.embedding_table(labels)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """The MAE-style 2D sin-cos table (grid_size**2, embed_dim), tokens in row-major order: the first
    half of the channels encodes the column, the second half the row, each half [sin(p w_k), cos(p w_k)]
    with w_k = 1e4^(-k / (D/4)); computed in float64, returned in float32."""
    assert embed_dim % 4 == 0, "sin-cos position embedding needs a width divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))  # (D/4,)
    pos = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")  # token k sits at (row k // G, col k % G)

    def emb_1d(p):  # (N,) -> (N, D/2)
        angles = p.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([emb_1d(cols), emb_1d(rows)], dim=1).float()  # (N, D)


class VisionRoPE(nn.Module):
    """2D axial rotary position embedding of q and k: the first head_dim/2 channels rotate with the
    token's row, the last head_dim/2 with its column, at f_j = 1e4^(-2j / (head_dim/2)), j < head_dim/4,
    one frequency per pair of adjacent channels (2i, 2i+1). The (N, head_dim) cos/sin tables are
    persistent buffers because the reference checkpoints hold them."""

    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0):
        super().__init__()
        cos, sin = rope_tables(head_dim, grid_size, grid_size, theta)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def forward(self, x):  # (B, heads, N, head_dim)
        return apply_rope(x, self.freqs_cos, self.freqs_sin)


def rope_tables(head_dim: int, rows: int, cols: int, theta: float = 10000.0, device=None):
    """cos and sin (rows*cols, head_dim), float32, of the 2D RoPE angles of a rows x cols grid, row-major."""
    assert head_dim % 4 == 0, "2D RoPE needs a head dim divisible by 4"
    half, f64 = head_dim // 2, dict(dtype=torch.float64, device=device)
    freqs = (1.0 / theta ** (torch.arange(0, half, 2, **f64) / half)).repeat_interleave(2)
    r, c = torch.meshgrid(torch.arange(rows, **f64), torch.arange(cols, **f64), indexing="ij")
    angles = torch.cat([r.reshape(-1, 1) * freqs, c.reshape(-1, 1) * freqs], dim=1)  # (N, head_dim)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """Rotate adjacent pairs (a, b) of x (..., N, head_dim) by their angles: (a cos - b sin, b cos + a sin).
    The tables in x's dtype: under autocast q and k stay bf16 instead of being promoted to float32."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return x * cos.to(x.dtype) + torch.stack((-b, a), dim=-1).flatten(-2) * sin.to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# The text-to-image model


class TextToImageDiT(nn.Module):
    """Velocity model v(x_t, t, text) for text-to-image: (B, C, H, W) latents of any grid (the aspect-ratio
    buckets), text = (states (B, L, text_dim), mask (B, L)) of a frozen text encoder.

    The paper says only "2B parameters"; a secondary source says the model follows FLUX, so the layout is
    FLUX's: `depth_double` double-stream blocks, in which text and image tokens keep their own weights
    but attend jointly, then `depth_single` single-stream blocks over the joined sequence, each with
    attention and MLP side by side. The blocks are LightningDiT's (RMSNorm, SwiGLU, QK-norm, 2D RoPE on
    the image tokens, AdaLN-Zero). Ours where the paper and FLUX differ or are silent: the conditioning
    vector is t_emb + an MLP of the caption's mean text state (FLUX uses CLIP's pooled embedding), text
    tokens get no rotation, there is no absolute position embedding, and QK-norm is on.
    """

    def __init__(self, in_channels: int = 32, patch_size: int = 1, hidden_size: int = 1728, depth_double: int = 10,
                 depth_single: int = 20, num_heads: int = 27, text_dim: int = 4096, mlp_ratio: float = 4.0,
                 use_qknorm: bool = True, grad_checkpointing: bool = False):
        super().__init__()
        self.in_channels = self.out_channels = in_channels
        self.patch_size, self.hidden_size, self.num_heads = patch_size, hidden_size, num_heads
        self.depth, self.grad_checkpointing = depth_double + depth_single, grad_checkpointing
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.context_embedder = nn.Linear(text_dim, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.text_pool = nn.Sequential(nn.Linear(text_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(hidden_size, num_heads, mlp_ratio, use_qknorm)
                                           for _ in range(depth_double))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(hidden_size, num_heads, mlp_ratio, use_qknorm)
                                           for _ in range(depth_single))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        with torch.no_grad():  # as LightningDiT: xavier linears, and AdaLN-Zero: the initial model predicts 0
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
            nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
            for m in self.modules():
                if isinstance(m, (LightningDiTBlock, SingleStreamBlock, FinalLayer)):
                    nn.init.zeros_(m.adaLN_modulation[-1].weight)
                    nn.init.zeros_(m.adaLN_modulation[-1].bias)
            nn.init.zeros_(self.final_layer.linear.weight)
            nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x, t, text):
        states, mask = text
        B, _, H, W = x.shape
        p, L = self.patch_size, states.shape[1]
        h, w = H // p, W // p
        t = t.expand(B) if t.dim() == 0 else t
        img = self.x_embedder(x).flatten(2).transpose(1, 2)  # (B, h*w, D)
        txt = self.context_embedder(states)  # (B, L, D)
        weight = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weight).sum(1) / weight.sum(1).clamp_min(1)  # (B, text_dim): the caption's mean state
        c = self.t_embedder(t) + self.text_pool(pooled)  # (B, D)
        cos, sin = rope_tables(self.hidden_size // self.num_heads, h, w, device=x.device)  # made there: no copy
        rope = (torch.cat([cos.new_ones(L, cos.shape[1]), cos]),  # text tokens: no rotation
                torch.cat([sin.new_zeros(L, sin.shape[1]), sin]))  # (L + h*w, head_dim)
        attend = torch.cat([mask, mask.new_ones(B, h * w)], dim=1)[:, None, None, :]  # padding is never attended
        for block in self.double_blocks:
            txt, img = self._run(block, txt, img, c, rope, attend)
        x = torch.cat([txt, img], dim=1)  # (B, L + h*w, D)
        for block in self.single_blocks:
            x = self._run(block, x, c, rope, attend)
        out = self.final_layer(x[:, L:], c)  # (B, h*w, p*p*C), each token laid out (p, q, c)
        out = out.view(B, h, w, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(B, self.out_channels, H, W)

    def _run(self, block, *args):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


# cuDNN's fused attention fails in backward with a padding mask (H200, torch 2.11): the others take masks.
MASKED_SDPA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def joint_attention(q, k, v, rope, attend):
    """Attention over the joined text and image tokens (B, heads, L + N, head_dim), RoPE on q and k."""
    cos, sin = rope
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attend)
    with sdpa_kernel(MASKED_SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attend)


class DoubleStreamBlock(nn.Module):
    """Text and image tokens, each with the weights of a LightningDiT block of their own (norms, qkv,
    QK-norm, projection, SwiGLU, modulation), attending jointly: FLUX's double-stream block."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, use_qknorm: bool):
        super().__init__()
        self.txt = LightningDiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm)
        self.img = LightningDiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm)

    def forward(self, txt, img, c, rope, attend):
        streams, L = (self.txt, self.img), txt.shape[1]
        mods = [s.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1) for s in streams]  # per stream, six (B, 1, D)
        heads = [s.attn.heads(modulate(s.norm1(x), m[0], m[1])) for s, x, m in zip(streams, (txt, img), mods)]
        q, k, v = (torch.cat(parts, dim=2) for parts in zip(*heads))  # (B, heads, L + N, head_dim)
        out = joint_attention(q, k, v, rope, attend).transpose(1, 2).flatten(2)  # (B, L + N, D)
        results = []
        for s, x, o, (_, _, gate_msa, shift_mlp, scale_mlp, gate_mlp) in zip(streams, (txt, img),
                                                                              (out[:, :L], out[:, L:]), mods):
            x = x + gate_msa * s.attn.proj(o)
            results.append(x + gate_mlp * s.mlp(modulate(s.norm2(x), shift_mlp, scale_mlp)))
        return results


class SingleStreamBlock(nn.Module):
    """One stream over the joined tokens, attention and SwiGLU MLP side by side from one input projection
    and into one output projection (FLUX's single-stream block), modulated by (shift, scale, gate)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, use_qknorm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.mlp_hidden = (int(2 / 3 * int(hidden_size * mlp_ratio)) + 7) // 8 * 8  # aligned: v is a slice of linear1
        self.norm = RMSNorm(hidden_size)
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + 2 * self.mlp_hidden)  # qkv and SwiGLU's two halves
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden, hidden_size)
        self.q_norm = RMSNorm(self.head_dim) if use_qknorm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if use_qknorm else nn.Identity()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 3 * hidden_size))

    def forward(self, x, c, rope, attend):  # x: (B, S, D)
        B, S, D = x.shape
        shift, scale, gate = self.adaLN_modulation(c).unsqueeze(1).chunk(3, dim=-1)
        qkv, a, b = self.linear1(modulate(self.norm(x), shift, scale)).split([3 * D, self.mlp_hidden, self.mlp_hidden], -1)
        q, k, v = qkv.view(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = joint_attention(self.q_norm(q), self.k_norm(k), v, rope, attend).transpose(1, 2).flatten(2)
        return x + gate * self.linear2(torch.cat([attn, F.silu(a) * b], dim=-1))


# ----------------------------------------------------------------------------------------------------
# Configurations, checkpoints, FLOPs

_SIZES = {"B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}  # depth, width, heads
DiT_models = {f"{size}/{p}": partial(LightningDiT, depth=d, hidden_size=w, num_heads=h, patch_size=p)
              for size, (d, w, h) in _SIZES.items() for p in (1, 2)}
# Text-to-image sizes: double-stream blocks, single-stream blocks, width, heads of 64 (2B: 2.00B parameters with
# T5-XXL's 4096-d states; a width of 192k keeps the SwiGLU's 8/3 x width a multiple of 64 for the GPU's
# matrix units). Patch 1 for our 16x16 latent, patch 2 for an f8 VAE's 32x32 (256 tokens each).
_T2I_SIZES = {"tiny": (1, 1, 64, 4), "S": (4, 8, 384, 6), "B": (6, 12, 768, 12), "L": (8, 16, 1152, 18),
              "2B": (10, 20, 1728, 27)}
DiT_models.update({f"T2I-{size}/{p}": partial(TextToImageDiT, depth_double=dd, depth_single=ds, hidden_size=w,
                                              num_heads=h, patch_size=p)
                   for size, (dd, ds, w, h) in _T2I_SIZES.items() for p in (1, 2)})


def build_dit(name: str, **kwargs):
    """E.g. build_dit("XL/1", input_size=16, in_channels=32, use_qknorm=True), build_dit("T2I-2B/1", text_dim=4096)."""
    if name not in DiT_models:
        raise UserError(f"unknown model configuration {name!r}; choose one of {sorted(DiT_models)}")
    return DiT_models[name](**kwargs)


def load_dit(path: str, ema: bool = True) -> tuple[LightningDiT, dict]:
    """(LightningDiT in eval mode with its EMA or raw weights, the rest of the checkpoint): the latter
    holds `latent_stats` (per-channel mean and std, to undo the latent normalisation) and `tokenizer`."""
    ckpt = load_checkpoint(path, "LightningDiT checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("kind") not in ("dit", "t2i"):
        found = ckpt.get("kind", "unknown") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path} is not a LightningDiT checkpoint of this project (kind: {found})")
    weights = "ema" if ema else "model"
    if weights not in ckpt:
        raise UserError(f"{path} has no '{weights}' weights" + (" (--raw_weights uses the raw ones)" if ema else ""))
    model = build_dit(ckpt["model_name"], **ckpt["model_args"])
    model.load_state_dict(ckpt[weights])
    return model.eval(), {k: v for k, v in ckpt.items() if k not in ("model", "ema", "opt", "rng", "data")}


def forward_flops_per_image(model: LightningDiT) -> int:
    """Model FLOPs of one forward pass of one image (a multiply-add is 2 FLOPs):
    2 P_token N + 2 P_cond + depth 4 N^2 D, with P_token the matmul weights applied to every token,
    P_cond those applied once to the conditioning (t-MLP, adaLN), and attention's q k^T and attn v.
    Norms, RoPE, softmax and other elementwise work are not counted. Pass the unwrapped module."""
    per_token = per_image = 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if "adaLN_modulation" in name or "t_embedder" in name:
                per_image += m.weight.numel()
            else:
                per_token += m.weight.numel()
    N, D = model.num_patches, model.hidden_size
    return 2 * per_token * N + 2 * per_image + model.depth * 4 * N * N * D


def training_flops_per_image(model: LightningDiT) -> int:
    """FLOPs of one training step per image, for MFU: the backward pass costs twice the forward."""
    return 3 * forward_flops_per_image(model)


def t2i_forward_flops(model: TextToImageDiT, image_tokens: int, text_tokens: int) -> int:
    """forward_flops_per_image for the text-to-image model: each matmul weight times the tokens it sees
    (a stream's weights its own tokens, the single-stream blocks all), plus joint attention."""
    flops = 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            tokens = (1 if "adaLN_modulation" in name or name.startswith(("t_embedder", "text_pool")) else
                      text_tokens if name.startswith("context_embedder") or ".txt." in name else
                      image_tokens if name.startswith(("x_embedder", "final_layer")) or ".img." in name else
                      image_tokens + text_tokens)
            flops += 2 * m.weight.numel() * tokens
    return flops + model.depth * 4 * (image_tokens + text_tokens) ** 2 * model.hidden_size


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, for model FLOPs utilisation.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
                   "L40S": 362e12, "B200": 2250e12}


def peak_bf16_flops(device: torch.device) -> float | None:
    """The GPU's bf16 peak if we know it (None on CPU and unknown GPUs: then no MFU is reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
