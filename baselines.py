"""Baseline tokenizers behind the aligned tokenizer's interface (encode: the posterior's mean), so
the same diffusion pipeline runs on them: the paper compares with VA-VAE and the FLUX VAE (T2I).

    DiffusersVAE: any diffusers AutoencoderKL (SD-VAE f8c4, FLUX VAE f8c16...), a folder or hub name
    VAVAE:        hustvl's VA-VAE f16d32 (the LDM autoencoder), from its checkpoint file
"""

import importlib
import os
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, load_checkpoint
from tokenizer import AttnBlock, Decoder, ResnetBlock, group_norm, load_aligned_tokenizer


class Baseline(nn.Module):
    """What both baselines share: a latent (ch channels) f times smaller than the image."""

    def __init__(self, kind: str, source: str, image_size: int, ch: int, f: int):
        super().__init__()
        if image_size % f:
            raise UserError(f"--image_size {image_size}: not a multiple of {f} ({source}'s factor)")
        self.latent_shape = (ch, image_size // f, image_size // f)
        self.config = dict(kind=kind, source=source, image_size=image_size, latent_channels=ch)
        self.stage, self.random_encoder = None, False

    def forward(self, x):
        z = self.encode(x)
        return self.decode(z), z


class DiffusersVAE(Baseline):
    def __init__(self, vae, source: str, image_size: int):
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        super().__init__("diffusers", source, image_size, vae.config.latent_channels, f)
        self.vae = vae.eval()

    def encode(self, x):  # (B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f), unscaled (the DiT's job)
        return self.vae.encode(x).latent_dist.mean

    def decode(self, z):
        return self.vae.decode(z).sample

    def decoding_modules(self):  # FLUX's VAE has no post_quant_conv
        return [m for m in (self.vae.decoder, self.vae.post_quant_conv) if m is not None]


def from_pretrained(cls, name: str, what: str, **kwargs):
    """cls.from_pretrained(name) of transformers or diffusers, any failure one UserError, strictly:
    both fill missing weights at random, and a random VAE, text encoder or CLIP looks plausible."""
    library = importlib.import_module(cls.__module__.split(".")[0])  # transformers or diffusers
    library.utils.logging.disable_progress_bar()
    library.utils.logging.set_verbosity_error()  # its load report: our error says what matters
    report = {"output_loading_info": True} if issubclass(cls, nn.Module) else {}  # what is missing
    try:
        loaded = cls.from_pretrained(name, **kwargs, **report)
    except Exception as e:  # OSError, ValueError, an unpickling error...: one line, no traceback
        why = (str(e).strip() or type(e).__name__).splitlines()[0]
        folder = name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.path.exists(name)
        if folder and not os.path.isdir(name):  # not a hub name ("org/model")
            raise UserError(f"the {what} folder {name} does not exist") from None
        offline = "" if folder else (
            f". Offline, save it on a machine with internet (`{cls.__name__}.from_pretrained(name)"
            ".save_pretrained(folder)`) and pass that folder")
        raise UserError(f"could not load the {what} {name!r} ({why}){offline}") from None
    if not report:
        return loaded
    model, info = loaded
    missing = sorted(info["missing_keys"]) + [str(k) for k in info.get("mismatched_keys", ())]
    if missing:
        raise UserError(f"{name} is not a complete {what}: {len(missing)} of its weights are not "
                        f"in its files (e.g. {missing[0]}) and would be random")
    return model


def load_diffusers_vae(source: str, image_size: int) -> DiffusersVAE:
    """An AutoencoderKL from a folder or a hub name ("stabilityai/sd-vae-ft-ema"), or from the vae/
    subfolder of a pipeline's ("black-forest-labs/FLUX.1-dev"); the first error if neither loads."""
    import diffusers

    errors = []
    for subfolder in (None, "vae"):
        try:
            vae = from_pretrained(diffusers.AutoencoderKL, source, "diffusers VAE",
                                  subfolder=subfolder, low_cpu_mem_usage=False)
            return DiffusersVAE(vae, source, image_size)
        except UserError as e:
            errors.append(e)
    raise errors[0]


# VA-VAE: LDM's autoencoder, its decoder tokenizer.Decoder
class LDMEncoder(nn.Module):
    """The mirror of tokenizer.Decoder: image (B, 3, H, W) -> moments (B, 2z, H/16, W/16)."""

    def __init__(self, z_channels: int = 32, ch: int = 128, ch_mult=(1, 1, 2, 2, 4),
                 num_res_blocks: int = 2):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        down, width, last = [], ch, len(ch_mult) - 1
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                down.append(ResnetBlock(width, ch * mult))
                width = ch * mult
                if level == last:  # attention at the lowest resolution only, as VA-VAE
                    down.append(AttnBlock(width))
            if level < last:  # x2: LDM pads right and bottom by one, then a stride-2 conv
                down.append(nn.Sequential(OrderedDict(pad=nn.ZeroPad2d((0, 1, 0, 1)),
                                                      conv=nn.Conv2d(width, width, 3, stride=2))))
        self.down = nn.Sequential(*down)
        self.mid = nn.Sequential(ResnetBlock(width, width), AttnBlock(width),
                                 ResnetBlock(width, width))
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, 2 * z_channels, 3, padding=1)

    def forward(self, x):
        h = self.mid(self.down(self.conv_in(x)))  # (B, 4ch, H/16, W/16)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAVAE(Baseline):
    """hustvl's VA-VAE f16d32: a 32-channel latent at 1/16 resolution."""

    def __init__(self, source: str = "", image_size: int = 256):
        super().__init__("vavae", source, image_size, 32, 16)
        self.encoder = LDMEncoder(32)
        self.quant_conv, self.post_quant_conv = nn.Conv2d(64, 64, 1), nn.Conv2d(32, 32, 1)
        self.decoder = Decoder(32)

    def encode(self, x):  # the posterior's mean: the first half of the moments
        return self.quant_conv(self.encoder(x)).chunk(2, dim=1)[0]

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def decoding_modules(self):
        return [self.post_quant_conv, self.decoder]


def _ldm_levels(layers: nn.Sequential, level: int, step: int) -> list[str]:
    """LDM's names of flat levels: `{level}.block.{i}`, `{level}.attn.{i}`, `{level}.*sample`."""
    names, seen = [], []
    for m in layers:
        if isinstance(m, (ResnetBlock, AttnBlock)):
            kind = "block" if isinstance(m, ResnetBlock) else "attn"
            names.append(f"{level}.{kind}.{seen.count(kind)}")
            seen.append(kind)
        else:  # the down- or upsampling that closes the level
            names.append(f"{level}.{'downsample' if step > 0 else 'upsample'}")
            level, seen = level + step, []
    return names


def ldm_names(model: VAVAE) -> dict[str, list[str]]:
    """{our parameter name: its names in an LDM checkpoint}: our flat lists are LDM's nested levels
    (the decoder's from LDM's last level), our fused attention qkv is LDM's q, k and v."""
    mid = ["block_1", "attn_1", "block_2"]
    index = {"encoder.down": _ldm_levels(model.encoder.down, 0, 1), "encoder.mid": mid,
             "decoder.up": _ldm_levels(model.decoder.up, 4, -1), "decoder.mid": mid}
    names = {}
    for name in model.state_dict():
        parts = name.split(".")
        if ".".join(parts[:2]) in index:
            parts[2] = index[".".join(parts[:2])][int(parts[2])]
        ldm = ".".join(parts)
        prefix, qkv, kind = ldm.rpartition(".qkv.")
        names[name] = [f"{prefix}.{x}.{kind}" for x in "qkv"] if qkv else [ldm]
    return names


def load_vavae(path: str, state: dict, image_size: int) -> VAVAE:
    """A VA-VAE, loaded strictly from its checkpoint (LDM names, maybe under "state_dict")."""
    state = state.get("state_dict", state)
    model = VAVAE(path, image_size)
    names = ldm_names(model)
    missing = [k for keys in names.values() for k in keys if k not in state]
    if missing:
        raise UserError(f"{path} is not a VA-VAE f16d32 checkpoint: {len(missing)} of its "
                        f"autoencoder's weights are missing (e.g. {', '.join(missing[:3])})")
    try:
        model.load_state_dict({n: torch.cat([state[k] for k in keys]) for n, keys in names.items()})
    except RuntimeError as e:  # the right names, other shapes: another VA-VAE variant
        why = str(e).splitlines()[-1].strip()[:200]
        raise UserError(f"{path} does not fit VA-VAE f16d32: {why}") from None
    return model.eval()


def load_tokenizer(path: str, image_size: int | None = None):
    """The tokenizer at `path`: ours, a VA-VAE checkpoint, or a diffusers VAE folder or hub name."""
    sharded = os.path.isfile(os.path.join(path, ".metadata"))  # which load_checkpoint refuses
    if not sharded and (os.path.isdir(path) or not (os.path.exists(path)
                                                    or path.endswith((".pt", ".pth", ".ckpt")))):
        return load_diffusers_vae(path, image_size or 256)
    ckpt = load_checkpoint(path, "tokenizer checkpoint")
    if isinstance(ckpt, dict) and "encoder.conv_in.weight" in ckpt.get("state_dict", ckpt):
        return load_vavae(path, ckpt, image_size or 256)
    return load_aligned_tokenizer(path, ckpt)
