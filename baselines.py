"""Baseline tokenizers behind the aligned tokenizer's interface, to run the same diffusion pipeline
on their latents: the paper's comparisons are against VA-VAE (ImageNet) and the FLUX VAE
(text-to-image).

    DiffusersVAE: any `diffusers.AutoencoderKL` (SD-VAE f8c4, FLUX VAE f8c16, ...), a hub name or
                  a folder
    VAVAE:        hustvl's VA-VAE f16d32 (the LDM autoencoder architecture), from its checkpoint
                  file

Both offer what the pipeline uses of a tokenizer (`load_tokenizer`, at the end, picks the kind
once): `encode(x) -> z` for images in [-1, 1], `decode(z) -> x`, `latent_shape`, `config` (recorded
with the latents), `decoding_modules()` (what sampling moves to the GPU). Encoding takes the
posterior's mean, so that latents are deterministic like the aligned tokenizer's; the diffusion
pipeline normalises latents per channel itself, so the VAEs' scaling and shift factors are not used.
"""

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, load_checkpoint, refuse_sharded
from tokenizer import AttnBlock, Decoder, ResnetBlock, _group_norm, load_aligned_tokenizer


class DiffusersVAE(nn.Module):
    """A `diffusers.AutoencoderKL`: encode to the posterior mean, decode its `.sample`."""

    def __init__(self, vae, source: str, image_size: int):
        super().__init__()
        self.vae, self.source = vae.eval(), source
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if image_size % factor:
            raise UserError(f"{source} downsamples by {factor}: --image_size {image_size} is not "
                            "a multiple of it")
        self.latent_shape = (vae.config.latent_channels, image_size // factor, image_size // factor)
        self.config = {"kind": "diffusers", "source": source, "image_size": image_size,
                       "latent_channels": vae.config.latent_channels}
        self.stage, self.random_encoder = None, False

    def encode(self, x):  # (B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f)
        return self.vae.encode(x).latent_dist.mean

    def decode(self, z):
        return self.vae.decode(z).sample

    def forward(self, x):
        z = self.encode(x)
        return self.decode(z), z

    def decoding_modules(self):
        post = [self.vae.post_quant_conv] if self.vae.post_quant_conv is not None else []
        return [self.vae.decoder, *post]


def load_diffusers_vae(source: str, image_size: int) -> DiffusersVAE:
    """An AutoencoderKL from a local folder (config.json + weights, or a pipeline folder with vae/)
    or a hub name ("stabilityai/sd-vae-ft-ema", "black-forest-labs/FLUX.1-dev", whose VAE is in
    vae/). Loaded by text.from_pretrained: weights missing from the files are an error, not
    random."""
    from diffusers import AutoencoderKL

    from text import from_pretrained, is_path

    if is_path(source):
        if not os.path.isdir(source):
            raise UserError(f"the diffusers VAE folder {source} does not exist (--tokenizer)")
        sub = "" if os.path.isfile(os.path.join(source, "config.json")) else "vae"
        try:
            with open(os.path.join(source, sub, "config.json")) as f:
                kind = json.load(f).get("_class_name")
        except (OSError, ValueError, AttributeError):  # missing, not JSON, or not an object
            kind = None
        if kind != "AutoencoderKL":
            raise UserError(f"{source} is not a diffusers VAE folder: expected config.json of an "
                            "AutoencoderKL (in it or in its vae/ subfolder) beside its weights")
        vae = from_pretrained(AutoencoderKL, source, "diffusers VAE", subfolder=sub or None,
                              low_cpu_mem_usage=False)
    else:
        offline = (". Offline, download it on a machine with internet (e.g. `AutoencoderKL"
                   ".from_pretrained(name).save_pretrained(folder)`) and pass that folder as "
                   "--tokenizer")
        for sub in (None, "vae"):  # a VAE repository, or a pipeline repository with its VAE in vae/
            try:
                vae = from_pretrained(AutoencoderKL, source, "diffusers VAE", offline,
                                      subfolder=sub, low_cpu_mem_usage=False)
                break
            except UserError:
                if sub == "vae":
                    raise
    return DiffusersVAE(vae, source, image_size)


# --------------------------------------------------------------------------------------------------
# VA-VAE: the LDM autoencoder (encoder, quant_conv, post_quant_conv, decoder), with LDM's
# parameter names


class Downsample(nn.Module):
    """x2 downsampling: LDM pads right and bottom by one, then a stride-2 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class LDMEncoder(nn.Module):
    """LDM's encoder, named as in its checkpoints: image (B, 3, H, W) -> moments
    (B, 2 z, H/16, W/16)."""

    def __init__(self, z_channels: int = 32, ch: int = 128, ch_mult=(1, 1, 2, 2, 4),
                 num_res_blocks: int = 2):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down, width = nn.ModuleList(), ch
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList(ResnetBlock(width if i == 0 else ch * mult, ch * mult)
                                        for i in range(num_res_blocks))
            width = ch * mult
            last = level == len(ch_mult) - 1
            # attention only at the lowest resolution, as VA-VAE's config
            attention_blocks = num_res_blocks if last else 0
            stage.attn = nn.ModuleList(AttnBlock(width) for _ in range(attention_blocks))
            if not last:
                stage.downsample = Downsample(width)
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(width, width)
        self.mid.attn_1 = AttnBlock(width)
        self.mid.block_2 = ResnetBlock(width, width)
        self.norm_out = _group_norm(width)
        self.conv_out = nn.Conv2d(width, 2 * z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                h = stage.attn[i](h) if len(stage.attn) else h
            h = stage.downsample(h) if hasattr(stage, "downsample") else h
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class VAVAE(nn.Module):
    """hustvl's VA-VAE: LDM's autoencoder with a 32-channel latent at 1/16 resolution. The decoder
    is ours (tokenizer.Decoder: the same layers, other names); `load_vavae` maps the checkpoint onto
    it."""

    def __init__(self, source: str = "", image_size: int = 256, z_channels: int = 32, ch: int = 128,
                 ch_mult=(1, 1, 2, 2, 4), num_res_blocks: int = 2):
        super().__init__()
        self.encoder = LDMEncoder(z_channels, ch, ch_mult, num_res_blocks)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)
        self.decoder = Decoder(z_channels, ch, ch_mult, num_res_blocks)
        factor = 2 ** (len(ch_mult) - 1)
        self.latent_shape = (z_channels, image_size // factor, image_size // factor)
        self.config = {"kind": "vavae", "source": source, "image_size": image_size,
                       "latent_channels": z_channels}
        self.stage, self.random_encoder = None, False

    def encode(self, x):  # the posterior's mean: the first half of the moments
        return self.quant_conv(self.encoder(x)).chunk(2, dim=1)[0]

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x):
        z = self.encode(x)
        return self.decode(z), z

    def decoding_modules(self):
        return [self.post_quant_conv, self.decoder]


def ldm_names(model: VAVAE) -> dict:
    """{our parameter name: the LDM checkpoint's name}. Attention's fused qkv maps to LDM's q, k and
    v, which `load_vavae` concatenates; our decoder's flat `up` list maps to LDM's
    up.{level}.block/attn/upsample."""
    names = {}
    for name in model.state_dict():
        part, rest = name.split(".", 1)
        if part == "decoder":
            rest = _ldm_decoder_name(model.decoder, rest)
        names[name] = f"{part}.{rest}"
    return names


def _ldm_decoder_name(decoder: Decoder, rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head == "mid":  # mid.0 / mid.1 / mid.2 -> block_1 / attn_1 / block_2
        index, _, tail = tail.partition(".")
        return f"mid.{('block_1', 'attn_1', 'block_2')[int(index)]}.{tail}"
    if head != "up":
        return rest
    index, _, tail = tail.partition(".")
    return f"up.{_decoder_layout(decoder)[int(index)]}.{tail}"


def _decoder_layout(decoder: Decoder) -> list[str]:
    """LDM names of our decoder's `up` entries, in order: from the lowest resolution (the last LDM
    level)."""
    layout, block, attn = [], 0, 0
    # the number of upsamplings
    level = sum(1 for m in decoder.up if not isinstance(m, (ResnetBlock, AttnBlock)))
    for m in decoder.up:
        if isinstance(m, ResnetBlock):
            layout.append(f"{level}.block.{block}")
            block += 1
        elif isinstance(m, AttnBlock):
            layout.append(f"{level}.attn.{attn}")
            attn += 1
        else:  # an Upsample closes the level
            layout.append(f"{level}.upsample")
            level, block, attn = level - 1, 0, 0
    return layout


def load_vavae(path: str, state: dict, image_size: int) -> VAVAE:
    """A VA-VAE from its checkpoint (LDM names, possibly under "state_dict", with training-only
    entries such as the loss networks beside the autoencoder's), loaded strictly into our
    modules."""
    state = state.get("state_dict", state)
    model = VAVAE(path, image_size)
    ours = {}
    for name, ldm in ldm_names(model).items():
        if name.endswith(("qkv.weight", "qkv.bias")):
            prefix, kind = ldm.rsplit(".qkv.", 1)
            parts = [state.get(f"{prefix}.{x}.{kind}") for x in "qkv"]
            ours[name] = None if any(p is None for p in parts) else torch.cat(parts)
        else:
            ours[name] = state.get(ldm)
    missing = [ldm_names(model)[n] for n, v in ours.items() if v is None]
    if missing:
        raise UserError(f"{path} is not a VA-VAE f16d32 checkpoint: {len(missing)} of its "
                        f"autoencoder's weights are missing (e.g. {', '.join(missing[:3])})")
    try:
        model.load_state_dict(ours, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path} does not fit the VA-VAE f16d32 architecture: "
                        f"{str(e)[:300]}") from None
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Any tokenizer, ours or a baseline


def load_tokenizer(path: str, image_size: int | None = None):
    """The tokenizer at `path`, chosen once for extraction, training grids, sampling and --eval:
    ours (tokenizer.py), or a baseline: a diffusers AutoencoderKL (a folder or a hub name) or a
    VA-VAE checkpoint, at `image_size` (default 256). All offer encode, decode, latent_shape, config
    and decoding_modules."""
    refuse_sharded(path, "tokenizer")
    if os.path.isdir(path) or not (os.path.exists(path) or path.endswith((".pt", ".pth", ".ckpt"))):
        return load_diffusers_vae(path, image_size or 256)
    ckpt = load_checkpoint(path, "tokenizer checkpoint")
    if isinstance(ckpt, dict) and "encoder.conv_in.weight" in ckpt.get("state_dict", ckpt):
        return load_vavae(path, ckpt, image_size or 256)
    return load_aligned_tokenizer(path, ckpt)
