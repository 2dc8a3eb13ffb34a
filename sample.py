"""Sampling: noise at t = 0 -> the ODE dx/dt = v(x, t, y) of a class-conditional LightningDiT to
t = 1 (Euler/Heun, shifted times, CFG) -> normalisation undone -> decoder. Sample i: (--seed, i).

  python sample.py --cfg 1.5                                 # a PNG grid of 16 random classes
  torchrun --nproc_per_node=8 sample.py --npz --cfg 1.5      # 50K samples as ADM's .npz, for fid.py
"""

import argparse
import os
import time
import warnings
import zipfile

import numpy as np
import torch
from tqdm import tqdm

from baselines import load_tokenizer
from common import (HelpFormatter, Logger, UserError, at_least, atomic_write, autocast,
                    check_writable, cleanup_distributed, in_range, load_checkpoint, load_json,
                    save_json, script_main, setup_distributed, use_bf16, use_compile)
from data import save_grid, to_uint8
from dit import build_dit
from tokenizer import latent_fingerprint


@torch.no_grad()
def sample_latents(model, y, noise, steps: int = 250, cfg_scale: float = 1.0, shift: float = 0.3,
                   solver: str = "euler", cfg_channels=None, cfg_interval_start: float = 0.0,
                   null=None):
    """Normalised latents (B, C, H, W) from noise of that shape. CFG for t >= cfg_interval_start on
    channels [:cfg_channels]: v = v_u + w (v_c - v_u), one forward over [y; null]."""
    null = torch.full_like(y, model.num_classes) if null is None else null
    y2 = tuple(map(torch.cat, zip(y, null))) if isinstance(y, tuple) else torch.cat([y, null])

    def velocity(x, t):  # x: (B, C, H, W); t: a host number
        t_dev = torch.full((), t, device=x.device)  # a fill kernel: no copy, no sync
        if cfg_scale == 1.0 or t < cfg_interval_start:
            return model(x, t_dev, y).to(x.dtype)
        v_c, v_u = model(torch.cat([x, x]), t_dev, y2).to(x.dtype).chunk(2)  # each (B, C, H, W)
        k = cfg_channels or x.shape[1]
        return torch.cat([v_u[:, :k] + cfg_scale * (v_c[:, :k] - v_u[:, :k]), v_c[:, k:]], dim=1)

    # Host times (no syncs) s t / (s t + 1 - t), 0 (noise) to 1 (data); Heun: both ends' mean v.
    u = torch.linspace(0, 1, steps, dtype=torch.float64)
    x, ts = noise, (shift * u / (shift * u + (1 - u))).tolist()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        v = velocity(x, t0)
        if solver == "heun":
            v = 0.5 * (v + velocity(x + (t1 - t0) * v, t1))
        x = x + (t1 - t0) * v
    return x


def per_index(seed: int, indices, draw, stream: int = 0) -> torch.Tensor:
    """draw(g) stacked over indices i, g seeded by (seed, i, stream) only: the same on any rank."""
    states = [np.random.SeedSequence([seed, int(i), stream]).generate_state(1, np.uint64)[0]
              for i in indices]
    return torch.stack([draw(torch.Generator().manual_seed(int(s) & (2**63 - 1))) for s in states])


@torch.no_grad()
def decode_to_uint8(tokenizer, z_norm, latent_stats) -> torch.Tensor:
    """Normalised latents (B, C, h, w) -> (B, 3, 16h, 16w) uint8 images, decoded in float32."""
    mean, std = (torch.as_tensor(latent_stats[k], device=z_norm.device).float().view(1, -1, 1, 1)
                 for k in ("mean", "std"))
    with torch.autocast(z_norm.device.type, enabled=False):
        return to_uint8(tokenizer.decode(z_norm.float() * std + mean))  # training's z undone


def load_dit(path: str, ema: bool = True, kind: str = "dit", build=build_dit):
    """(model in eval mode, the rest of the checkpoint) of train_dit.py (or kind "t2i", `build`)."""
    ckpt = load_checkpoint(path, "LightningDiT checkpoint")
    found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
    if found != kind:  # the other kind is named with its script
        raise UserError({"dit": f"{path} is a class-conditional checkpoint: use sample.py",
                         "t2i": f"{path} is a text-to-image checkpoint: use sample_t2i.py"}.get(
            found, f"{path} is not a LightningDiT checkpoint of this project (kind: {found})"))
    weights = "ema" if ema else "model"
    if weights not in ckpt:  # export.pt holds only the EMA
        raise UserError(f"{path} has no '{weights}' weights")
    model = build(ckpt["model_name"], **ckpt["model_args"])
    model.load_state_dict(ckpt[weights])
    return model.eval(), {k: v for k, v in ckpt.items() if k not in ("model", "ema", "opt")}


def refined_tokenizer(path: str | None) -> str | None:
    """<run>/stage3/tokenizer.pt if it was refined from `path` (same latents, better decoder)."""
    folder = os.path.dirname(os.path.abspath(path)) if path and os.path.isfile(path) else ""
    stage3 = os.path.join(os.path.dirname(folder), "stage3", "tokenizer.pt")
    if os.path.basename(folder) not in ("stage1", "stage2") or not os.path.isfile(stage3):
        return path  # a baseline, another layout, or no stage 3
    try:
        init = load_checkpoint(stage3, "stage-3 tokenizer").get("init")
    except (UserError, AttributeError):  # a damaged or foreign file there: decode with `path`
        warnings.warn(f"{stage3} is not a readable tokenizer checkpoint; decoding with {path}")
        return path
    return stage3 if init and os.path.exists(init) and os.path.samefile(init, path) else path


def load_models(ckpt: str, tokenizer_path: str | None, ema: bool, kind="dit", build=build_dit):
    """(model, tokenizer, checkpoint metadata) on the CPU, checked against each other."""
    model, meta = load_dit(ckpt, ema, kind, build)
    C, stats = model.in_channels, meta.get("latent_stats") or {}
    meta["latent_stats"] = {k: torch.as_tensor(stats.get(k, []), dtype=torch.float32).flatten()
                            for k in ("mean", "std")}
    if any(v.numel() != C for v in meta["latent_stats"].values()):
        raise UserError(f"{ckpt} has no latent statistics (mean, std) for its {C} channels")
    path = tokenizer_path or refined_tokenizer(meta.get("tokenizer"))
    if not path or (path.endswith((".pt", ".pth", ".ckpt")) and not os.path.isfile(path)):
        raise UserError(f"tokenizer {path} not found (named by {ckpt}): pass --tokenizer PATH")
    tokenizer = load_tokenizer(path, (meta.get("tokenizer_config") or {}).get("image_size"))
    side = getattr(model, "grid_size", 0) * getattr(model, "patch_size", 0)
    expected = (C, side, side) if side else (C,)  # a text model (no grid) takes any size
    shape, fp = tuple(tokenizer.latent_shape), meta.get("tokenizer_fingerprint")  # stage 3 keeps it
    if shape[:len(expected)] != expected or fp not in (None, latent_fingerprint(tokenizer)):
        raise UserError(f"the model in {ckpt} was trained on latents of {meta.get('tokenizer')}, "
                        f"but {path} makes other latents (shape {shape}, the model's {expected}; "
                        "or other encoder weights): decode with that tokenizer or its stage 3")
    meta["tokenizer"] = path
    return model, tokenizer, meta


class Sampler:
    """A model on the device that draws sample i: noise from (--seed, i) in `shape`, its label from
    `labels(indices)`, (cond, uncond) from `conditions(labels)`; `record`: what else matters."""

    def __init__(self, args, env, model, tokenizer, meta, shape, labels, conditions, **record):
        if args.cfg_channels is not None and args.cfg_channels > model.in_channels:
            raise UserError(f"--cfg_channels must be between 1 and {model.in_channels}")
        self.args, self.env, self.meta, self.shape = args, env, meta, tuple(shape)
        self.labels, self.conditions, self.record = labels, conditions, record
        self.bf16 = use_bf16(args.precision, env.device)
        self.model, self.tokenizer = model.to(env.device), tokenizer
        for module in tokenizer.decoding_modules():  # the encoder stays on the CPU
            module.to(env.device)
        if use_compile(args.compile, env.device):
            model.compile()  # in place (the first batch includes the compilation)

    def images(self, indices, bar) -> np.ndarray:
        """(n, H, W, 3) uint8 images of the global `indices`, in batches; `bar` counts them."""
        a, dev, out = self.args, self.env.device, []
        for s in range(0, len(indices), a.batch_size):
            idx = indices[s: s + a.batch_size]
            noise = per_index(a.seed, idx, lambda g: torch.randn(self.shape, generator=g)).to(dev)
            y, null = self.conditions(self.labels(idx))
            with autocast(dev, self.bf16):
                z = sample_latents(self.model, y, noise, a.steps, a.cfg, a.shift, a.solver,
                                   a.cfg_channels, a.cfg_interval_start, null=null)
            x = decode_to_uint8(self.tokenizer, z, self.meta["latent_stats"])  # (b, 3, H, W)
            out.append(x.permute(0, 2, 3, 1).cpu())  # (b, H, W, 3)
            bar.update(len(idx))
        return torch.cat(out).numpy()

    def settings(self) -> dict:
        """Everything that changes the images: --npz's and cfg_search.py's settings records."""
        same = ("raw_weights", "cfg", "cfg_channels", "cfg_interval_start", "steps", "shift",
                "solver", "seed", "num_samples", "shard_size")
        return dict(ckpt=os.path.abspath(self.args.ckpt), step=self.meta.get("step"),
                    tokenizer=os.path.abspath(self.meta["tokenizer"]),
                    **{k: getattr(self.args, k) for k in same},
                    precision="bf16" if self.bf16 else "fp32", **self.record)


def match_settings(path: str, settings: dict, what: str):
    """Record `settings` in `path`, or refuse other ones there: a resumed run must not mix them."""
    old = load_json(path, what) if os.path.exists(path) else settings
    if diff := {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}:
        raise UserError(f"{os.path.dirname(path)} holds {what} made with other settings (was, now: "
                        f"{diff}); choose another --out or delete that folder")
    save_json(settings, path)


def run_npz(sampler: Sampler, log) -> str:
    """Shards of --shard_size samples by global index, the missing ones split over the ranks, then
    joined by rank 0 into `<out>/samples.npz`, uncompressed (fid.py memory-maps it); its path."""
    args, env = sampler.args, sampler.env
    N, S, final = args.num_samples, args.shard_size, os.path.join(args.out, "samples.npz")
    paths = [os.path.join(args.out, "shards", f"shard_{k:06d}.npz") for k in range(-(-N // S))]
    if env.is_main:
        check_writable(final, "output")
        match_settings(os.path.join(args.out, "settings.json"), sampler.settings(), "samples")
    env.barrier()
    if os.path.exists(final):
        log(f"{final} already holds these {N} samples")
        return final
    mine = [k for k, p in enumerate(paths) if not os.path.exists(p)][env.rank::env.world_size]
    env.barrier()  # every rank has listed the shards before any rank writes a new one
    total = sum(min(S, N - k * S) for k in mine)
    with tqdm(total=total, unit="img", desc="sampling", disable=not env.is_main) as bar:
        for k in mine:  # shard k: the samples [k S, (k + 1) S)
            x = sampler.images(list(range(k * S, min(N, (k + 1) * S))), bar)
            atomic_write(paths[k], lambda f: np.savez(f, arr_0=x))  # to f: no ".npz" appended
    # Polled, not a barrier: ranks can finish minutes apart, past a collective's timeout.
    while not all(map(os.path.exists, paths if env.is_main else [final])):
        time.sleep(1)
    if not env.is_main:
        return final
    images = None
    for k, p in enumerate(paths):
        try:  # shards are written atomically: a damaged one was damaged on disk, or is not ours
            with np.load(p) as data:
                if images is None:  # (N, H, W, 3), filled shard by shard (50K x 256 px = 9.8 GB)
                    images = np.empty((N, *data["arr_0"].shape[1:]), dtype=np.uint8)
                images[k * S: (k + 1) * S] = data["arr_0"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise UserError(f"the sample shard {p} is damaged ({type(e).__name__}): delete it and "
                            "run the same command again to draw it anew") from None
    labels = sampler.labels(range(N)).numpy()  # (N,) int64, from each index alone
    labelling = {k: v for k, v in sampler.record.items() if k == "labelling"}
    atomic_write(final, lambda f: np.savez(f, arr_0=images, arr_1=labels, **labelling))
    if not args.keep_shards:
        for p in paths:
            os.remove(p)
        if not os.listdir(os.path.dirname(paths[0])):  # only ours: --out may be an old folder
            os.rmdir(os.path.dirname(paths[0]))
    log(f"{N} samples in {final} (arr_0: images NHWC uint8, arr_1: labels)")
    return final


def run(sampler: Sampler, log) -> str | None:
    """`--npz`, or a PNG grid of --num_samples samples drawn by rank 0: the file's path."""
    a = sampler.args
    log(", ".join(f"{k} {v}" for k, v in sampler.settings().items() if k not in ("prompts", "ckpt"))
        + f" on {sampler.env.device}")
    if a.npz:
        return run_npz(sampler, log)
    solver = "" if a.solver == "euler" else "_" + a.solver
    path = os.path.join(a.out, f"grid_cfg{a.cfg:g}_steps{a.steps}{solver}.png")
    if not sampler.env.is_main:
        return None
    check_writable(path, "output")
    with tqdm(total=a.num_samples, unit="img", desc="sampling") as bar:
        images = torch.from_numpy(sampler.images(list(range(a.num_samples)), bar))
    save_grid(images.permute(0, 3, 1, 2), path)
    log(f"sample grid -> {path}")
    return path


def add_args(p, ckpt: str, output: bool = True, labels: bool = True):
    """The sampling scripts' flags: model, ODE, hardware; guidance and output; class labels."""
    add = p.add_argument
    add("--ckpt", default=ckpt, help="the training run's checkpoint (or export.pt)")
    add("--tokenizer", help="to decode with (default: the checkpoint's, or its stage 3)")
    add("--steps", type=at_least(2), default=250, help="time points from 0 to 1")
    add("--shift", type=in_range(0, lo_open=True), default=0.3, help="s (1: none)")
    add("--solver", default="euler", choices=["euler", "heun"], help="ODE solver")
    add("--cfg_channels", type=at_least(1),
        help="guide only the first K latent channels (LightningDiT: 3; default: all)")
    add("--batch_size", type=at_least(1), default=64, help="per forward, per rank")
    add("--seed", type=at_least(0), default=0, help="sample i's generator: (seed, i)")
    add("--shard_size", type=at_least(1), default=1000, help="--npz: samples per shard")
    add("--raw_weights", action="store_true", help="the raw weights, not the EMA")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on CUDA")
    add("--compile", default="auto", choices=["auto", "on", "off"], help="auto: on CUDA")
    if output:
        add("--cfg", type=in_range(0), default=1.0, help="guidance scale w; 1 = none")
        add("--cfg_interval_start", type=in_range(0, 1), default=0.0,
            help="no guidance for t below this (LightningDiT: 0.1; 0.125 at 800 epochs)")
        add("--num_samples", type=at_least(1), help="default: 16 (grid), 50000 (--npz)")
        add("--out", help="output folder (default: samples/ beside the checkpoint)")
        add("--npz", action="store_true", help="an ADM .npz for FID (the 50K mode)")
        add("--keep_shards", action="store_true", help="--npz: keep the shards")
    if labels:  # default: uniformly random
        g = p.add_mutually_exclusive_group()
        g.add_argument("--classes", type=lambda text: [int(c) for c in text.split(",") if c],
                       help="comma-separated class ids, e.g. 207,360,387 (cycled); default: random")
        g.add_argument("--balanced_labels", action="store_true", help="sample i gets class i mod "
                       "classes (50 a class for 50K: FID ~0.1 lower than random labels; state it)")


def output_defaults(a, listed):
    """--num_samples: the `listed` classes or prompts once each, else 16 (grid) or 50K (--npz).
    --out: samples/ beside the checkpoint, with --npz a subfolder per setting, so that none meet."""
    a.num_samples = a.num_samples or (len(listed) if listed else 50_000 if a.npz else 16)
    tag = (f"cfg{a.cfg:g}_k{a.cfg_channels or 'all'}_from{a.cfg_interval_start:g}_steps{a.steps}"
           f"_shift{a.shift:g}_{a.solver}_seed{a.seed}_n{a.num_samples}")
    samples = os.path.join(os.path.dirname(os.path.abspath(a.ckpt)), "samples")
    a.out = a.out or (os.path.join(samples, tag) if a.npz else samples)
    return a


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_args(p, "runs/dit/ckpt.pt")
    args = p.parse_args(argv)
    return output_defaults(args, args.classes)


def class_sampler(args, env) -> Sampler:
    """The model, labels from --classes or all classes (--balanced_labels) cycled, or random."""
    model, tokenizer, meta = load_models(args.ckpt, args.tokenizer, ema=not args.raw_weights)
    if bad := [c for c in args.classes or [] if not 0 <= c < model.num_classes]:
        raise UserError(f"unknown class id(s) {bad}: this model has {model.num_classes} classes")
    n = model.num_classes
    cycle = args.classes or (list(range(n)) if args.balanced_labels else None)

    def labels(indices):
        if cycle:
            return torch.tensor([cycle[i % len(cycle)] for i in indices])
        return per_index(args.seed, indices, lambda g: torch.randint(n, (), generator=g), 1)

    return Sampler(args, env, model, tokenizer, meta, tokenizer.latent_shape, labels,
                   lambda y: (y.to(env.device), None), classes=args.classes, labelling="classes"
                   if args.classes else "balanced" if args.balanced_labels else "uniform")


def main(argv=None):
    args = parse_args(argv)
    env = setup_distributed(args.device)
    path = run(class_sampler(args, env), Logger(env).info)
    cleanup_distributed()
    return path


if __name__ == "__main__":
    script_main(main)
