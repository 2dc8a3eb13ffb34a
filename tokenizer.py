"""The aligned tokenizer: a pretrained DINOv2 encoder turned into the image tokenizer of a latent
diffusion model (paper section "Method"; SPEC section 1).

    image 256x256 in [-1, 1]
      -> resize to 224, ImageNet-normalise                       (preprocess)
      -> DINOv2 ViT/14: 16x16 patch tokens of width D             (DINOv2)
      -> per-token MLP D -> D -> 32: the latent z, 32 x 16 x 16    (Adapter)
      -> convolutional decoder, x16 upsampling: image 256x256     (Decoder)

The three training stages (train_tokenizer.py) differ only in which of these parts train and in
the losses, which are all defined here:
  - reconstruction: L1 + LPIPS + adaptive-weight hinge GAN with a PatchGAN discriminator, every stage;
  - semantic preservation (stage 2): the latent must stay close to that of the frozen stage-1 model.

The encoder keeps the official DINOv2 parameter names, so the published checkpoints load strictly.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common import MissingWeightsError, load_checkpoint, pretrained_file

# ----------------------------------------------------------------------------------------------------
# DINOv2 (the encoder)

# The six hub variants. The "_reg" models were trained with 4 register tokens and interpolate
# their position embeddings differently (official hub settings).
_PLAIN = dict(num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1)
_REG = dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
DINOV2_VARIANTS = {
    "dinov2_vits14": dict(embed_dim=384, depth=12, num_heads=6, **_PLAIN),
    "dinov2_vitb14": dict(embed_dim=768, depth=12, num_heads=12, **_PLAIN),
    "dinov2_vitl14": dict(embed_dim=1024, depth=24, num_heads=16, **_PLAIN),
    "dinov2_vits14_reg": dict(embed_dim=384, depth=12, num_heads=6, **_REG),
    "dinov2_vitb14_reg": dict(embed_dim=768, depth=12, num_heads=12, **_REG),
    "dinov2_vitl14_reg": dict(embed_dim=1024, depth=24, num_heads=16, **_REG),
}
# A small encoder with the same code path, for the demo and tests (random weights only).
TINY_ENCODER = dict(embed_dim=64, depth=2, num_heads=2, **_PLAIN)


def dinov2_url(name: str) -> str:
    """Official weight URL, e.g. .../dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth."""
    base = name.removesuffix("_reg")
    suffix = "_reg4" if name.endswith("_reg") else ""
    return f"https://dl.fbaipublicfiles.com/dinov2/{base}/{base}{suffix}_pretrain.pth"


class PatchEmbed(nn.Module):
    """Non-overlapping 14x14 patches -> tokens: (B, 3, H, W) -> (B, H/14 * W/14, D)."""

    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (names as in DINOv2)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, D/heads)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Learned per-channel scale of a residual branch (DINOv2 initialises it to 1.0 on the hub)."""

    def __init__(self, dim: int, init: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2(nn.Module):
    """The DINOv2 ViT/14 backbone, returning the final-norm patch tokens (CLS/registers dropped).

    Parameter names equal the official checkpoints' (`cls_token`, `pos_embed`, `register_tokens`,
    `mask_token`, `patch_embed.proj`, `blocks.i.*`, `norm`) so they load with strict=True.
    `mask_token` is unused here (it is for DINOv2's masked pre-training) but kept for that reason.
    """

    def __init__(self, embed_dim: int, depth: int, num_heads: int, patch_size: int = 14,
                 num_register_tokens: int = 0, img_size: int = 518, interpolate_antialias: bool = False,
                 interpolate_offset: float = 0.1, mlp_ratio: float = 4.0):
        super().__init__()
        self.patch_size = patch_size
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.embed_dim = embed_dim
        self.num_prefix = 1 + num_register_tokens  # tokens before the patches: CLS, registers
        grid = img_size // patch_size  # 37 for the hub models: pos_embed has 37*37 + 1 positions

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.grad_checkpointing = False  # recompute blocks in backward: less memory when the encoder trains
        self._init_weights()

    def _init_weights(self):
        # Only matters for random-weight runs (tests, demo); real runs load the official weights.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, h_patches: int, w_patches: int, dtype: torch.dtype):
        """Position embeddings for an h x w patch grid, resized exactly as the official model does:
        bicubic, in float32, with the hub's antialias flag; the plain models pass a scale factor of
        (n + 0.1) / M instead of a size (a historical offset that changes the sampling positions, so
        it is needed to reproduce the official features). Returns (1, 1 + h*w, D)."""
        pos = self.pos_embed
        M = math.isqrt(pos.shape[1] - 1)
        if h_patches == w_patches == M:
            return pos
        pos = pos.float()
        patch_pos = pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)  # (1, D, M, M)
        if self.interpolate_offset:
            scale = ((h_patches + self.interpolate_offset) / M, (w_patches + self.interpolate_offset) / M)
            patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic",
                                      antialias=self.interpolate_antialias)
        else:
            patch_pos = F.interpolate(patch_pos, size=(h_patches, w_patches), mode="bicubic",
                                      antialias=self.interpolate_antialias)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h_patches * w_patches, -1)
        return torch.cat([pos[:, :1], patch_pos], dim=1).to(dtype)

    def forward(self, x):
        """Normalised images (B, 3, H, W), H and W multiples of 14 -> patch tokens (B, H/14*W/14, D)."""
        B, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"DINOv2 input sides must be multiples of {self.patch_size}, got {H}x{W}")
        x = self.patch_embed(x)  # (B, N, D)
        # No casts here, as in the official model: under bf16 autocast the concatenation with the
        # float32 CLS token promotes the tokens to float32, and the position embeddings are added in float32.
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1 + N, D)
        x = x + self.interpolate_pos_encoding(H // self.patch_size, W // self.patch_size, x.dtype)
        if self.register_tokens is not None:  # registers go after CLS and carry no position
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)[:, self.num_prefix:]  # (B, N, D): drop CLS and registers


def build_dinov2(name: str, pretrained: bool = True, ckpt: str | None = None) -> DINOv2:
    """A hub variant by name ("dinov2_vitl14", ... "dinov2_vitl14_reg"), or "tiny" (random only).

    pretrained=True loads the published weights strictly: from `ckpt`, else the torch.hub cache,
    else the official URL; offline with no file it fails, naming the file and where to put it."""
    if name == "tiny":
        if pretrained:
            raise MissingWeightsError("the 'tiny' encoder has no pretrained weights: it is for tests and "
                                      "the demo; pass --random_encoder with it")
        return DINOv2(**TINY_ENCODER)
    if name not in DINOV2_VARIANTS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(DINOV2_VARIANTS)} or 'tiny'")
    model = DINOv2(**DINOV2_VARIANTS[name])
    if pretrained:
        path = pretrained_file(dinov2_url(name), ckpt, f"DINOv2 weights for {name}", "--encoder_ckpt")
        state = load_checkpoint(path, f"DINOv2 weights for {name}")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise RuntimeError(f"{path} does not hold {name} weights (is it another variant?): {e}") from e
    return model


# ----------------------------------------------------------------------------------------------------
# Adapter and decoder


class Adapter(nn.Module):
    """Per-token MLP from the encoder width D to the latent width (32): the bottleneck that makes a
    compact, diffusable latent out of DINOv2's 1024-d features. Deterministic: no KL, no sampling."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _group_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a (1x1-projected when widths differ) skip."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = _group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map (used at 16x16)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, 1, C, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj_out(h.transpose(-1, -2).reshape(B, C, H, W))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (no checkerboard artefacts of transposed convs)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """The convolutional decoder of the LDM / VA-VAE family: latent (B, C, h, w) -> image (B, 3, 16h, 16w).

    conv_in -> middle (res, attention, res) at the latent resolution -> for each level from the
    widest: `num_res_blocks + 1` residual blocks (LDM's decoder convention; at the latent resolution
    each is followed by self-attention), then x2 nearest upsampling (len(ch_mult) - 1 times) ->
    norm, SiLU, conv_out. With the defaults (width 128, multipliers 1,1,2,2,4, num_res_blocks 2) it
    has 41.4M parameters, the size of the LDM / VA-VAE decoder (the paper does not give its decoder's
    size; this is the project default).
    """

    def __init__(self, z_channels: int = 32, ch: int = 128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks: int = 2):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        width = widths[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = nn.Sequential(ResnetBlock(width, width), AttnBlock(width), ResnetBlock(width, width))
        up = []
        for level in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                up.append(ResnetBlock(width, widths[level]))
                width = widths[level]
                if level == len(ch_mult) - 1:  # global attention only where it is cheap: 16x16
                    up.append(AttnBlock(width))
            if level > 0:
                up.append(Upsample(width))
        self.up = nn.Sequential(*up)
        self.norm_out = _group_norm(width)
        self.conv_out = nn.Conv2d(width, 3, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the adaptive GAN weight is measured at."""
        return self.conv_out.weight

    def forward(self, z):
        h = self.mid(self.conv_in(z))  # (B, 4*ch, h, w)
        h = self.up(h)  # (B, ch, 16h, 16w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, 16h, 16w)


# ----------------------------------------------------------------------------------------------------
# The tokenizer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_config(**overrides) -> dict:
    """The tokenizer's architecture as a plain dict (stored in every checkpoint)."""
    cfg = dict(encoder="dinov2_vitl14", latent_channels=32, adapter_hidden=None, image_size=256,
               decoder_ch=128, decoder_ch_mult=(1, 1, 2, 2, 4), decoder_res_blocks=2)
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown tokenizer config keys: {sorted(unknown)}")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    cfg["decoder_ch_mult"] = tuple(cfg["decoder_ch_mult"])
    return cfg


class AlignedTokenizer(nn.Module):
    """DINOv2 encoder + adapter + decoder. `encode(x) -> z`, `decode(z) -> x`, images in [-1, 1].

    The latent grid is image_size / 16 (16 x 16 at 256 px): the encoder sees the image resized to
    14 * image_size / 16 (224 at 256 px) so that its 14-px patches give exactly that grid, and the
    decoder upsamples by 16.
    """

    def __init__(self, config: dict, encoder: DINOv2 | None = None):
        super().__init__()
        self.config = config = default_config(**config)
        if config["image_size"] % 16:
            raise ValueError(f"image_size must be a multiple of 16, got {config['image_size']}")
        if len(config["decoder_ch_mult"]) != 5:
            raise ValueError("the decoder must upsample x16 (5 channel multipliers), "
                             f"got {config['decoder_ch_mult']}")
        self.encoder = encoder if encoder is not None else build_dinov2(config["encoder"], pretrained=False)
        D = self.encoder.embed_dim
        self.adapter = Adapter(D, config["adapter_hidden"] or D, config["latent_channels"])
        self.decoder = Decoder(config["latent_channels"], config["decoder_ch"], config["decoder_ch_mult"],
                               config["decoder_res_blocks"])
        self.latent_size = config["image_size"] // 16
        self.encoder_size = self.latent_size * self.encoder.patch_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # Where the weights come from, set by load_tokenizer: the stage that trained them, and whether
        # stage 1 started from a random encoder (so later stages and their logs can say so).
        self.stage, self.random_encoder = None, False

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.config["latent_channels"], self.latent_size, self.latent_size)

    def preprocess(self, x):
        """[-1, 1] images (B, 3, 256, 256) -> DINOv2 input (B, 3, 224, 224), ImageNet-normalised."""
        x = F.interpolate(x, size=(self.encoder_size, self.encoder_size), mode="bicubic",
                          antialias=True, align_corners=False)
        return ((x + 1) / 2 - self.mean) / self.std

    def encode(self, x):
        """Images (B, 3, S, S) in [-1, 1], S = image_size -> latents z (B, C, S/16, S/16)."""
        S = self.config["image_size"]
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, S, S) or not x.is_floating_point():
            raise ValueError(f"this tokenizer encodes float images of shape (B, 3, {S}, {S}) in [-1, 1], got "
                             f"{tuple(x.shape)} {x.dtype} (centre-crop with data.py, map with data.to_model_range)")
        tokens = self.encoder(self.preprocess(x))  # (B, h*w, D)
        z = self.adapter(tokens)  # (B, h*w, C)
        B = z.shape[0]
        return z.transpose(1, 2).reshape(B, -1, self.latent_size, self.latent_size)

    def decode(self, z):
        """Latents (B, C, h, w) -> images (B, 3, 16h, 16w), about [-1, 1] (clamp before saving)."""
        return self.decoder(z)

    def forward(self, x):
        z = self.encode(x)
        return self.decode(z), z


def load_tokenizer(path: str) -> AlignedTokenizer:
    """A trained tokenizer from a file written by train_tokenizer.py (`tokenizer.pt`, or a
    training checkpoint, whose EMA weights are used)."""
    ckpt = load_checkpoint(path, "tokenizer checkpoint")
    if not isinstance(ckpt, dict) or "config" not in ckpt or not ({"model", "ema"} & set(ckpt)):
        raise ValueError(f"{path} is not a tokenizer checkpoint of this project (no 'config'/'model' entries)")
    if ckpt.get("kind", "tokenizer") != "tokenizer":
        raise ValueError(f"{path} is a {ckpt['kind']} checkpoint, not a tokenizer checkpoint")
    model = AlignedTokenizer(ckpt["config"])
    model.load_state_dict(ckpt["ema"] if "ema" in ckpt else ckpt["model"])
    model.stage = ckpt.get("stage")
    model.random_encoder = bool(ckpt.get("args", {}).get("random_encoder", False))
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# Losses

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


def build_lpips(vgg_ckpt: str | None = None, random_backbone: bool = False) -> nn.Module:
    """LPIPS-VGG from the `lpips` package, frozen. Its calibrated linear heads ship inside the
    package; the ImageNet VGG16 backbone is torchvision's `vgg16-397923af.pth`, loaded here from
    `vgg_ckpt` / the torch.hub cache / the URL. random_backbone=True (tests, demo) skips it."""
    import lpips

    model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if not random_backbone:
        path = pretrained_file(VGG16_URL, vgg_ckpt, "LPIPS VGG16 backbone", "--vgg_ckpt")
        state = load_checkpoint(path, "VGG16 weights")
        # lpips splits torchvision's vgg16.features into slice1..slice5, keeping each layer's index
        # as its name, so `features.{i}.*` of the torchvision file maps to `slice{k}.{i}.*`.
        mapped = {}
        for k in range(1, 6):
            for idx, layer in getattr(model.net, f"slice{k}").named_children():
                for pname, _ in layer.named_parameters():
                    mapped[f"slice{k}.{idx}.{pname}"] = state[f"features.{idx}.{pname}"]
        model.net.load_state_dict(mapped, strict=True)
    return model.eval().requires_grad_(False)


class PatchGAN(nn.Module):
    """The LDM/pix2pix PatchGAN discriminator (3 strided conv layers): one real/fake logit per
    overlapping patch rather than per image, which judges local texture, where L1/LPIPS blur."""

    def __init__(self, ch: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ch * prev, ch * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(ch * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ch * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # the pix2pix initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)  # (B, 1, h', w') patch logits


def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss: push real logits above +1 and fake ones below -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(nll_loss, g_loss, last_layer, scale: float = 0.5):
    """w_g = scale * ||d L_nll / d W|| / (||d L_g / d W|| + 1e-4), W = the decoder's last layer,
    clamped to [0, 1e4] and detached. It balances the GAN gradient against the reconstruction
    gradient where they meet, so the GAN neither dominates nor vanishes as their scales drift."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return scale * w.clamp(0.0, 1e4).detach()


def semantic_preservation_loss(z, z_ref, kind: str = "mse"):
    """Stage 2: keep the latent of the encoder being fine-tuned close to that of the frozen stage-1
    model on the same image, so that learning low-level detail does not erase the semantics that
    make the latent easy to diffuse. "mse" (default) or "cosine" (1 - cos over channels, per token)."""
    if kind == "mse":
        return F.mse_loss(z.float(), z_ref.float())
    if kind == "cosine":
        return (1 - F.cosine_similarity(z.float(), z_ref.float(), dim=1)).mean()
    raise ValueError(f"--sp_loss must be mse or cosine, not {kind!r}")
