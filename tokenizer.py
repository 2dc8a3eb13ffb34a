"""The aligned tokenizer: a pretrained DINOv2 encoder turned into the image tokenizer of a latent
diffusion model ("Aligning Visual Foundation Encoders to Tokenizers for Diffusion Models",
Chen et al., ICLR 2026), and the three stages that train it.

    image 256x256 in [-1, 1]
      -> resize to 224, ImageNet-normalise                      (AlignedTokenizer.preprocess)
      -> DINOv2 ViT/14: 16x16 patch tokens of width D            (DINOv2)
      -> per-token MLP D -> D -> 32: the latent z, 32 x 16 x 16   (adapter)
      -> convolutional decoder, x16 upsampling: image 256x256    (Decoder)

Stage 1, latent alignment: DINOv2 frozen; the adapter and decoder learn to reconstruct, which turns
    DINOv2's semantic features into a compact latent that is easy to diffuse.
Stage 2, perceptual alignment: everything trains, so the encoder also learns colour and texture; the
    semantic-preservation loss keeps the latent close to that of the frozen stage-1 model.
Stage 3, decoder refinement: only the decoder trains (the latent space is final), even post-DiT.
Every stage: L1 + LPIPS + w_g * hinge GAN (PatchGAN, adaptive weight w_g); stage 2 adds w_sp * L_sp.
"""

import copy
import hashlib
import warnings
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common import MissingWeightsError, UserError, load_checkpoint, pretrained_file, unwrap

TRAINABLE = {1: ("adapter", "decoder"), 2: ("encoder", "adapter", "decoder"), 3: ("decoder",)}


def set_trainable(model: "AlignedTokenizer", stage: int):
    """Only this stage's parts learn: frozen ones build no autograd graph (no backward cost)."""
    model.requires_grad_(False)
    for name in TRAINABLE[stage]:
        getattr(model, name).requires_grad_(True)
    model.encoder.mask_token.requires_grad_(False)  # unused: DDP fails on a grad that never comes


def semantic_reference(model: "AlignedTokenizer") -> "AlignedTokenizer":
    """Stage 2's reference: a frozen copy of the stage-1 encoder + adapter."""
    ref = copy.deepcopy(model).requires_grad_(False).eval()
    ref.decoder = None
    return ref


def tokenizer_loss(model, x, lpips, disc=None, ref=None, *, lpips_weight=1.0, disc_weight=0.5,
                   sp_weight=1.0, sp_loss="mse"):
    """The loss of every stage on images x (B, 3, H, W) in [-1, 1] -> (loss, x_hat, {part: value}):
        L1(x, x_hat) + lpips_weight * LPIPS(x, x_hat)  (the reconstruction L_nll)
        + sp_weight * L_sp(z, z_ref)                   (stage 2: given the frozen reference `ref`)
        + w_g * L_G, L_G = -mean D(x_hat)              (once the discriminator `disc` is on)"""
    x_hat, z = model(x)
    x_hat = x_hat.float()
    parts = {"l1": (x_hat - x).abs().mean()}
    if lpips_weight:  # 0 skips the VGG network altogether
        parts["lpips"] = lpips(x_hat, x).mean()
    nll = parts["l1"] + lpips_weight * parts.get("lpips", 0)
    loss = nll
    if ref is not None:
        z_ref = ref.encode(x)  # frozen: no autograd graph
        parts["sp"] = semantic_preservation_loss(z, z_ref, sp_loss)
        loss = loss + sp_weight * parts["sp"]
    if disc is not None:
        disc.requires_grad_(False)  # D judges here but does not learn from this loss
        parts["g_loss"] = -disc(x_hat).float().mean()
        disc.requires_grad_(True)
        last_layer = unwrap(model).decoder.conv_out.weight
        parts["w_g"] = adaptive_gan_weight(nll, parts["g_loss"], last_layer, disc_weight)
        loss = loss + parts["w_g"] * parts["g_loss"]
    parts["loss"] = loss
    return loss, x_hat, parts


def semantic_preservation_loss(z, z_ref, kind: str = "mse"):
    """L_sp: MSE(z, z_ref) (default), or "cosine": 1 - cos(z, z_ref) over channels, per position."""
    if kind == "mse":
        return F.mse_loss(z.float(), z_ref.float())
    if kind == "cosine":
        return (1 - F.cosine_similarity(z.float(), z_ref.float(), dim=1)).mean()
    raise ValueError(f"sp_loss must be mse or cosine, not {kind!r}")


def hinge_d_loss(logits_real, logits_fake):
    """The discriminator's hinge loss: push real logits above +1 and fake ones below -1."""
    return 0.5 * (F.relu(1 - logits_real.float()).mean() + F.relu(1 + logits_fake.float()).mean())


def adaptive_gan_weight(nll_loss, g_loss, last_layer, scale: float = 0.5):
    """w_g = scale * clamp(||dL_nll/dW|| / (||dL_G/dW|| + 1e-4), 0, 1e4) at W = the decoder's last
    layer (a constant for backward), so that the GAN neither dominates nor vanishes."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return scale * (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4)


def default_config(**overrides) -> dict:
    """The tokenizer's architecture as a plain dict (stored in every checkpoint)."""
    cfg = dict(encoder="dinov2_vitl14", latent_channels=32, adapter_hidden=None, image_size=256,
               decoder_ch=128, decoder_ch_mult=(1, 1, 2, 2, 4), decoder_res_blocks=2)
    if unknown := set(overrides) - set(cfg):
        raise ValueError(f"unknown tokenizer config keys: {sorted(unknown)}")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    cfg["decoder_ch_mult"] = tuple(cfg["decoder_ch_mult"])
    return cfg


class AlignedTokenizer(nn.Module):
    """DINOv2 encoder + adapter + decoder: `encode(x) -> z`, `decode(z) -> x`, images in [-1, 1].
    DINOv2 sees the image at 14/16 of its size (224 px at 256): its grid is the decoder's x16."""

    def __init__(self, config: dict, encoder: "DINOv2 | None" = None):
        super().__init__()
        self.config = config = default_config(**config)
        if config["image_size"] % 16 or len(config["decoder_ch_mult"]) != 5:
            raise UserError("image_size must be a multiple of 16 and decoder_ch_mult 5 entries "
                            f"(x16), not {config['image_size']} and {config['decoder_ch_mult']}")
        self.encoder = encoder or build_dinov2(config["encoder"], pretrained=False)
        D = self.encoder.embed_dim
        # The adapter's output is the latent: no KL, no sampling.
        self.adapter = mlp(D, config["adapter_hidden"] or D, config["latent_channels"])
        self.decoder = Decoder(config["latent_channels"], config["decoder_ch"],
                               config["decoder_ch_mult"], config["decoder_res_blocks"])
        side = config["image_size"] // 16
        self.latent_shape = (config["latent_channels"], side, side)
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)  # ImageNet's
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)
        self.stage, self.random_encoder = None, False  # set by load_aligned_tokenizer

    def preprocess(self, x):
        """[-1, 1] images (B, 3, H, W) -> DINOv2's input (B, 3, 14H/16, 14W/16), normalised."""
        size = [side // 16 * self.encoder.patch_size for side in x.shape[-2:]]
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True)
        return ((x + 1) / 2 - self.mean) / self.std

    def encode(self, x):
        """Images (B, 3, H, W) in [-1, 1], sides multiples of 16 -> latents z (B, C, H/16, W/16)."""
        bad_shape = x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % 16 or x.shape[3] % 16
        if bad_shape or not x.is_floating_point():
            raise UserError("the tokenizer encodes float images (B, 3, H, W), sides multiples of "
                            f"16, not {tuple(x.shape)} {x.dtype} (see data.to_model_range)")
        # Contiguous, or mm (grad) and bmm (no grad) round apart and L_sp does not start at 0.
        tokens = self.encoder(self.preprocess(x)).contiguous()  # (B, h*w, D)
        z = self.adapter(tokens)  # (B, h*w, C)
        return z.transpose(1, 2).reshape(z.shape[0], -1, x.shape[2] // 16, x.shape[3] // 16)

    def decode(self, z):  # (B, C, h, w) -> images (B, 3, 16h, 16w), about [-1, 1]: clamp them
        return self.decoder(z)

    def decoding_modules(self):  # what decoding needs (sampling moves only these to the GPU)
        return [self.decoder]

    def forward(self, x):
        z = self.encode(x)
        return self.decode(z), z


def load_aligned_tokenizer(path: str, ckpt) -> AlignedTokenizer:
    """The EMA weights of train_tokenizer.py's tokenizer.pt or ckpt.pt (older exports: "model")."""
    if isinstance(ckpt, dict) and ckpt.get("kind", "tokenizer") != "tokenizer":
        raise UserError(f"{path} is a {ckpt['kind']} checkpoint, not a tokenizer checkpoint")
    if not isinstance(ckpt, dict) or "config" not in ckpt or not ({"model", "ema"} & set(ckpt)):
        raise UserError(f"{path} is not a tokenizer checkpoint of this project, nor a VA-VAE one")
    model = AlignedTokenizer(ckpt["config"])
    model.load_state_dict(ckpt["ema"] if "ema" in ckpt else ckpt["model"])
    model.stage, model.random_encoder = ckpt.get("stage"), bool(ckpt.get("random_encoder", False))
    return model.eval()


def latent_fingerprint(tokenizer) -> str:
    """A short hash of a strided sample of the weights that make the latents (all but the decoding
    side): latents must be decoded by the tokenizer that made them, or its stage-3 refinement."""
    decoding = {id(p) for m in tokenizer.decoding_modules() for p in m.parameters()}
    digest = hashlib.sha1()
    for name, p in tokenizer.named_parameters():
        if id(p) not in decoding:
            sample = p.detach().float().flatten()[:: max(1, p.numel() // 4096)]
            digest.update(name.encode() + sample.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# DINOv2, the encoder: the six hub variants ("_reg": 4 registers, another position resize)
_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}
DINOV2_VARIANTS = {f"dinov2_vit{s}14{r}": dict(embed_dim=d, depth=n, num_heads=h, registers=bool(r))
                   for s, (d, n, h) in _SIZES.items() for r in ("", "_reg")}


def dinov2_url(name: str) -> str:
    """Official weight URL, e.g. .../dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth."""
    base, reg = name.removesuffix("_reg"), "_reg4" if name.endswith("_reg") else ""
    return f"https://dl.fbaipublicfiles.com/dinov2/{base}/{base}{reg}_pretrain.pth"


def mlp(dim: int, hidden: int, out_dim: int | None = None) -> nn.Sequential:
    """Linear -> GELU -> Linear: DINOv2's MLP, and the adapter (D -> hidden -> latent channels)."""
    return nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(),
                                     fc2=nn.Linear(hidden, out_dim or dim)))


class Block(nn.Module):
    """Pre-norm block, x + attn(norm1(x)) * ls1, then x + mlp(norm2(x)) * ls2: official names."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.norm1 = num_heads, nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.ModuleDict(dict(qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim)))
        self.ls1 = nn.ParameterDict(dict(gamma=nn.Parameter(torch.ones(dim))))
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), mlp(dim, 4 * dim)
        self.ls2 = nn.ParameterDict(dict(gamma=nn.Parameter(torch.ones(dim))))

    def forward(self, x):  # (B, N, D)
        B, N, D = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(B, N, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, D/heads)
        h = F.scaled_dot_product_attention(q, k, v)
        x = x + self.attn.proj(h.transpose(1, 2).reshape(B, N, D)) * self.ls1.gamma
        return x + self.mlp(self.norm2(x)) * self.ls2.gamma


class DINOv2(nn.Module):
    """The DINOv2 ViT/14 backbone, official names (the hub weights load strictly): final-norm patch
    tokens out, CLS and registers dropped; `mask_token` (for masked pre-training) is unused."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, registers: bool = False):
        super().__init__()
        self.patch_size, self.embed_dim = 14, embed_dim
        self.antialias, self.offset = registers, 0.0 if registers else 0.1  # hub's position resize
        self.num_prefix = 1 + 4 * registers  # tokens before the patches: CLS, 4 registers
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 1e-6)  # random: tests, demo
        self.pos_embed = nn.Parameter(torch.zeros(1, 37 * 37 + 1, embed_dim))  # 37 = 518 px / 14
        self.register_tokens = (nn.Parameter(torch.randn(1, 4, embed_dim) * 1e-6)
                                if registers else None)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv2d(3, embed_dim, 14, 14)))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.grad_checkpointing = False  # recompute blocks in backward: less memory in stage 2
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, h: int, w: int, dtype: torch.dtype):
        """Position embeddings (1, 1 + h*w, D) for an h x w grid, resized as the hub does: bicubic
        in float32 with its antialias flag; the plain models pass scale factor (n + 0.1) / 37."""
        M = 37  # the hub's grid
        if h == w == M:
            return self.pos_embed
        pos = self.pos_embed.float()
        grid = pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)  # (1, D, M, M)
        a = self.offset
        size = dict(scale_factor=((h + a) / M, (w + a) / M)) if a else dict(size=(h, w))
        grid = F.interpolate(grid, mode="bicubic", antialias=self.antialias, **size)
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)  # (1, h*w, D)
        return torch.cat([pos[:, :1], grid], dim=1).to(dtype)

    def forward(self, x, cls: bool = False):  # `cls`: the hub model's output, FD_DINOv2's
        """Normalised images (B, 3, H, W) -> patch tokens (B, H/14 * W/14, D), or CLS (B, D)."""
        B, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"DINOv2 input sides must be multiples of {self.patch_size}: {H}x{W}")
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, D), 14x14 patches
        # No casts, as in the official model: under bf16 autocast the CLS token promotes x to fp32.
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1 + N, D)
        x = x + self.interpolate_pos_encoding(H // self.patch_size, W // self.patch_size, x.dtype)
        if self.register_tokens is not None:  # registers go after CLS and carry no position
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        x = self.norm(x)
        return x[:, 0] if cls else x[:, self.num_prefix:]  # (B, D) or (B, N, D)


def build_dinov2(name: str, pretrained: bool = True, ckpt: str | None = None,
                 flags=("--encoder_ckpt", "--random_encoder")) -> DINOv2:
    """A hub variant ("dinov2_vitl14", ..., "dinov2_vitl14_reg") or "tiny" (random); pretrained:
    loaded strictly from `ckpt`, the hub cache or the URL (`flags`: the caller's, for messages)."""
    if name == "tiny":
        if pretrained:
            raise MissingWeightsError("the 'tiny' encoder has no weights: pass --random_encoder")
        return DINOv2(embed_dim=384, depth=1, num_heads=6)
    if name not in DINOV2_VARIANTS:
        raise UserError(f"unknown encoder {name!r}: not one of {', '.join(DINOV2_VARIANTS)}, tiny")
    model = DINOv2(**DINOV2_VARIANTS[name])
    if pretrained:
        path = pretrained_file(dinov2_url(name), ckpt, f"DINOv2 weights for {name}", *flags)
        try:
            model.load_state_dict(load_checkpoint(path, "DINOv2 weights"), strict=True)
        except RuntimeError as e:
            raise UserError(f"{path} does not hold {name} weights (another variant?): "
                            f"{' '.join(str(e).split())[:300]}") from None  # one line
    return model


# The decoder: the LDM / VA-VAE convolutional decoder (baselines.py builds VA-VAE from its pieces)
def group_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a skip (1x1-projected where the widths differ)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = group_norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm, self.qkv = group_norm(ch), nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, 1, C, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj_out(h.transpose(-1, -2).reshape(B, C, H, W))


class Decoder(nn.Module):
    """Latent (B, C, h, w) -> image (B, 3, 16h, 16w): conv_in, middle (res, attention, res), per
    level num_res_blocks + 1 residual blocks and x2 upsampling, conv_out. 41.4M: VA-VAE's size."""

    def __init__(self, z_channels: int = 32, ch: int = 128, ch_mult=(1, 1, 2, 2, 4),
                 num_res_blocks: int = 2):
        super().__init__()
        widths, width = [ch * m for m in ch_mult], ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = nn.Sequential(ResnetBlock(width, width), AttnBlock(width),
                                 ResnetBlock(width, width))
        up = []
        for level in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                up.append(ResnetBlock(width, widths[level]))
                width = widths[level]
                if level == len(ch_mult) - 1:  # global attention only where it is cheap
                    up.append(AttnBlock(width))
            if level > 0:  # nearest x2, then a conv: no checkerboard of transposed convs
                up.append(nn.Sequential(OrderedDict(up=nn.Upsample(scale_factor=2.0),
                                                    conv=nn.Conv2d(width, width, 3, padding=1))))
        self.up = nn.Sequential(*up)
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, 3, 3, padding=1)  # the "last layer" of the GAN weight

    def forward(self, z):
        h = self.up(self.mid(self.conv_in(z)))  # (B, 4ch, h, w) -> (B, ch, 16h, 16w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, 16h, 16w)


# The networks of the losses: PatchGAN discriminator and LPIPS
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


class PatchGAN(nn.Module):
    """The LDM / pix2pix PatchGAN: a real/fake logit per patch, for texture L1 and LPIPS blur."""

    def __init__(self, ch: int = 64, n_layers: int = 3):
        super().__init__()
        layers, mult = [nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)], 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(ch * prev, ch * mult, 4, 2 if n < n_layers else 1, 1, bias=False),
                       nn.BatchNorm2d(ch * mult), nn.LeakyReLU(0.2, True)]
        self.main = nn.Sequential(*layers, nn.Conv2d(ch * mult, 1, 4, 1, 1))
        for m in self.modules():  # the pix2pix initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)  # bias: 0 already

    def forward(self, x):
        return self.main(x)  # (B, 1, h', w') patch logits


def build_lpips(vgg_ckpt: str | None = None, random_backbone: bool = False, seed: int = 0):
    """LPIPS-VGG of the `lpips` package (its linear heads ship inside it), frozen, on torchvision's
    VGG16 (`vgg_ckpt`, the hub cache or the URL); random_backbone: drawn from `seed` instead."""
    import lpips

    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        # torchvision's "'pretrained' is deprecated", from inside lpips
        warnings.filterwarnings("ignore", message=".*(pretrained|weights).*", category=UserWarning)
        torch.manual_seed(seed)
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if not random_backbone:
        path = pretrained_file(VGG16_URL, vgg_ckpt, "LPIPS VGG16", "--vgg_ckpt", "--random_lpips")
        state = load_checkpoint(path, "VGG16 weights")
        # lpips splits vgg16.features into slice1..5: `features.{i}.*` is `slice{k}.{i}.*`.
        renamed = {f"slice{k}.{i}.{p}": state[f"features.{i}.{p}"] for k in range(1, 6)
                   for i, layer in getattr(model.net, f"slice{k}").named_children()
                   for p, _ in layer.named_parameters()}
        model.net.load_state_dict(renamed, strict=True)
    return model.eval().requires_grad_(False)
