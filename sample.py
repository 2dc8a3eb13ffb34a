"""Sampling: noise (B, 32, 16, 16) at t = 0 -> the ODE dx/dt = v(x, t, y) of a class-conditional
LightningDiT (train_dit.py), integrated to t = 1 (Euler or Heun) on a shifted time grid with
classifier-free guidance -> undo the latent normalisation -> tokenizer decoder -> image.

  python sample.py --cfg 1.5                                 # a PNG grid of 16 random classes
  torchrun --nproc_per_node=8 sample.py --npz --cfg 1.5      # 50K samples as ADM's .npz, for fid.py

As in LightningDiT's code, `--steps N` is N time points (N - 1 model evaluations, the paper's "250
steps"); the shift s = 0.3 puts more of them near the noise; its protocol guides only the first 3
latent channels for t >= 0.10 (`--cfg_channels 3 --cfg_interval_start 0.10`, w about 10). Sample i's
noise and label come from (--seed, i): any number of ranks gives the same samples, and `--npz`
resumes from fixed-size shards. Text-to-image models: sample_t2i.py.
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


def shift_timesteps(t, shift: float):
    """t' = s t / (1 + (s - 1) t), written s t / (s t + 1 - t) so that t = 1 maps to exactly 1."""
    return shift * t / (shift * t + (1 - t))


def time_grid(steps: int, shift: float) -> torch.Tensor:
    """`steps` shifted time points from 0 (noise) to 1 (data): (steps,) float64 on the CPU."""
    return shift_timesteps(torch.linspace(0, 1, steps, dtype=torch.float64), shift)


def euler(velocity_fn, x, ts):
    """x += (t1 - t0) v(x, t0): len(ts) - 1 evaluations at host times (the loop never syncs)."""
    ts = [float(t) for t in ts]
    for t0, t1 in zip(ts[:-1], ts[1:]):
        x = x + (t1 - t0) * velocity_fn(x, t0)
    return x


def heun(velocity_fn, x, ts):
    """An Euler predictor, then the mean velocity of both ends: 2nd order, 2 evaluations a step."""
    ts = [float(t) for t in ts]
    for t0, t1 in zip(ts[:-1], ts[1:]):
        v0 = velocity_fn(x, t0)
        x = x + (t1 - t0) * 0.5 * (v0 + velocity_fn(x + (t1 - t0) * v0, t1))
    return x


SOLVERS = {"euler": euler, "heun": heun}


def guided_velocity(model, y, cfg_scale: float, cfg_channels=None, cfg_interval_start: float = 0.0,
                    null=None):
    """velocity_fn(x, t) = v_u + w (v_c - v_u) from one forward over [y; null]: y labels (B,) and
    null the extra label row (model.num_classes), or a text model's (states, mask) and those of the
    empty caption. Only channels [:cfg_channels] are guided; below cfg_interval_start, and for
    w = 1, the velocity is the conditional one and the unconditional rows are not computed."""
    null = torch.full_like(y, model.num_classes) if null is None else null
    y2 = tuple(map(torch.cat, zip(y, null))) if isinstance(y, tuple) else torch.cat([y, null])

    def velocity_fn(x, t):  # x: (B, C, H, W); t: a host number
        t_dev = torch.full((), float(t), device=x.device)  # a fill kernel: no copy, no sync
        if cfg_scale == 1.0 or t < cfg_interval_start:
            return model(x, t_dev, y).to(x.dtype)
        v_c, v_u = model(torch.cat([x, x]), t_dev, y2).to(x.dtype).chunk(2)  # each (B, C, H, W)
        k = cfg_channels or x.shape[1]
        return torch.cat([v_u[:, :k] + cfg_scale * (v_c[:, :k] - v_u[:, :k]), v_c[:, k:]], dim=1)

    return velocity_fn


def sample_latents(model, y, noise, steps: int = 250, cfg_scale: float = 1.0, shift: float = 0.3,
                   solver: str = "euler", cfg_channels=None, cfg_interval_start: float = 0.0,
                   bar=None, null=None):
    """Normalised latents (B, C, H, W) from noise of that shape, under the caller's precision.
    `bar` (tqdm) counts the model evaluations."""
    velocity_fn = guided_velocity(model, y, cfg_scale, cfg_channels, cfg_interval_start, null)
    if bar is not None:
        guided = velocity_fn
        velocity_fn = lambda x, t: (bar.update(1), guided(x, t))[1]  # noqa: E731
    with torch.no_grad():
        return SOLVERS[solver](velocity_fn, noise, time_grid(steps, shift))


def _generator(seed: int, index: int, stream: int) -> torch.Generator:
    """Unrelated streams for neighbouring seeds and indices (stream 0: noise, 1: label)."""
    state = np.random.SeedSequence([seed, index, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2 ** 63 - 1))


def sample_noise(seed: int, indices, shape) -> torch.Tensor:
    """(len(indices), *shape) float32 CPU noise; row i depends only on (seed, indices[i])."""
    rows = [torch.randn(tuple(shape), generator=_generator(seed, int(i), 0)) for i in indices]
    return torch.stack(rows) if rows else torch.empty(0, *shape)


def sample_labels(seed: int, indices, num_classes: int) -> torch.Tensor:
    """(len(indices),) int64 labels, uniform over [0, num_classes), each from (seed, index)."""
    return torch.tensor([int(torch.randint(num_classes, (1,), generator=_generator(seed, i, 1)))
                         for i in map(int, indices)], dtype=torch.long)


def denormalize(z, latent_stats):
    """Undo training's per-channel (z - mean) / std: (B, C, H, W) -> tokenizer latents."""
    mean, std = (torch.as_tensor(latent_stats[k], dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
                 for k in ("mean", "std"))
    return z * std + mean


@torch.no_grad()
def decode_to_uint8(tokenizer, z_norm, latent_stats) -> torch.Tensor:
    """Normalised latents (B, C, h, w) -> uint8 images (B, 3, 16h, 16w), decoded in float32."""
    with torch.autocast(z_norm.device.type, enabled=False):
        return to_uint8(tokenizer.decode(denormalize(z_norm.float(), latent_stats)))


def load_dit(path: str, ema: bool = True, kind: str = "dit", build=build_dit):
    """(model with its EMA or raw weights, in eval mode; the rest of the checkpoint) of train_dit.py
    (train_t2i.py: kind "t2i" and its `build`)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(folder, ".metadata")):  # a file of a sharded (--fsdp) checkpoint
        export = os.path.basename(folder).replace("ckpt", "export", 1) + ".pt"  # common.export
        raise UserError(f"{path} is part of a sharded (--fsdp) checkpoint, without whole weights: "
                        f"sample from {os.path.join(os.path.dirname(folder), export)}, which "
                        f"`python train_dit.py --export {folder}` writes (train_t2i.py for a "
                        "text-to-image run)")
    ckpt = load_checkpoint(path, "LightningDiT checkpoint")
    found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
    if found != kind:  # the other kind is named with its script
        raise UserError({"dit": f"{path} is a class-conditional checkpoint: use sample.py",
                         "t2i": f"{path} is a text-to-image checkpoint: use sample_t2i.py"}.get(
            found, f"{path} is not a LightningDiT checkpoint of this project (kind: {found})"))
    weights = "ema" if ema else "model"
    if weights not in ckpt:
        raise UserError(f"{path} has no '{weights}' weights"
                        + (" (--raw_weights uses the raw ones)" if "model" in ckpt else ""))
    model = build(ckpt["model_name"], **ckpt["model_args"])
    model.load_state_dict(ckpt[weights])
    return model.eval(), {k: v for k, v in ckpt.items() if k not in ("model", "ema", "opt")}


def refined_tokenizer(path: str | None) -> str | None:
    """<run>/stage3/tokenizer.pt if it was refined from `path` (it decodes the same latents
    better), else `path`."""
    folder = os.path.dirname(os.path.abspath(path)) if path and os.path.isfile(path) else ""
    if os.path.basename(folder) not in ("stage1", "stage2"):  # a baseline or another layout
        return path
    stage3 = os.path.join(os.path.dirname(folder), "stage3", "tokenizer.pt")
    if os.path.isfile(stage3):
        try:
            init = load_checkpoint(stage3, "stage-3 tokenizer").get("init")
        except (UserError, AttributeError):  # a damaged or foreign file there: decode with `path`
            warnings.warn(f"{stage3} is not a readable tokenizer checkpoint; decoding with {path}")
            return path
        if init and os.path.exists(init) and os.path.samefile(init, path):
            return stage3
    return path


def load_models(ckpt: str, tokenizer_path: str | None, ema: bool, kind="dit", build=build_dit):
    """(model, tokenizer, checkpoint metadata) on the CPU, checked against each other."""
    if not os.path.exists(ckpt):
        raise UserError(f"{ckpt}: train one first (python train_{kind}.py) or pass --ckpt")
    model, meta = load_dit(ckpt, ema, kind, build)
    stats, C = meta.get("latent_stats"), model.in_channels
    if not isinstance(stats, dict) or not {"mean", "std"} <= set(stats):
        raise UserError(f"{ckpt} has no latent statistics (per-channel 'mean' and 'std' of the "
                        "training latents) to map its samples back to the tokenizer's latents")
    stats = {k: torch.as_tensor(stats[k], dtype=torch.float32).flatten() for k in ("mean", "std")}
    if any(v.numel() != C for v in stats.values()):
        raise UserError(f"{ckpt}: latent_stats for {stats['mean'].numel()} channels, model {C}")
    meta["latent_stats"] = stats
    path = tokenizer_path or refined_tokenizer(meta.get("tokenizer"))
    if not path or (path.endswith((".pt", ".pth", ".ckpt")) and not os.path.isfile(path)):
        raise UserError(f"tokenizer {path} not found (named by {ckpt} or --tokenizer): pass "
                        "--tokenizer PATH to the tokenizer whose latents the model was trained on")
    tokenizer = load_tokenizer(path, (meta.get("tokenizer_config") or {}).get("image_size"))
    side = getattr(model, "grid_size", 0) * getattr(model, "patch_size", 0)
    expected = (C, side, side) if side else (C,)  # a text model (no grid) takes any size
    if tuple(tokenizer.latent_shape)[:len(expected)] != expected:
        raise UserError(f"tokenizer {path} makes latents of shape {tuple(tokenizer.latent_shape)} "
                        f"but the model in {ckpt} generates {expected}: pass the tokenizer it was "
                        "trained with (--tokenizer)")
    # A stage-3 tokenizer (new decoder, same encoder and adapter) is a legitimate swap; no other is.
    if meta.get("tokenizer_fingerprint") not in (None, latent_fingerprint(tokenizer)):
        raise UserError(f"the model in {ckpt} was trained on latents of {meta.get('tokenizer')}, "
                        f"but {path} makes other latents (other encoder weights): decode with that "
                        "tokenizer or its stage-3 refinement (--tokenizer)")
    meta["tokenizer"] = path
    return model, tokenizer, meta


class Sampler:
    """A model on the device that draws sample i for any i: noise from (--seed, i) in `shape`, its
    label from `labels(indices)` (a class, or a prompt's line), the model's conditions and their
    unconditional counterpart from `conditions(labels)`. `record`: what else changes the images."""

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
        a, out = self.args, []
        for s in range(0, len(indices), a.batch_size):
            idx = indices[s: s + a.batch_size]
            noise = sample_noise(a.seed, idx, self.shape).to(self.env.device)  # (b, C, h, w)
            y, null = self.conditions(self.labels(idx))
            with autocast(self.env.device, self.bf16):
                z = sample_latents(self.model, y, noise, a.steps, a.cfg, a.shift, a.solver,
                                   a.cfg_channels, a.cfg_interval_start, null=null)
            x = decode_to_uint8(self.tokenizer, z, self.meta["latent_stats"])  # (b, 3, H, W)
            out.append(x.permute(0, 2, 3, 1).cpu())  # (b, H, W, 3)
            bar.update(len(idx))
        return torch.cat(out).numpy()

    def settings(self) -> dict:
        """Everything that changes the images: --npz's and cfg_search.py's settings records."""
        a = self.args
        return dict(ckpt=os.path.abspath(a.ckpt), step=self.meta.get("step"),
                    weights="raw" if a.raw_weights else "ema",
                    tokenizer=os.path.abspath(self.meta["tokenizer"]), cfg=a.cfg,
                    cfg_channels=a.cfg_channels, cfg_interval_start=a.cfg_interval_start,
                    steps=a.steps, shift=a.shift, solver=a.solver, seed=a.seed,
                    num_samples=a.num_samples, shard_size=a.shard_size,
                    precision="bf16" if self.bf16 else "fp32", **self.record)

    def bar(self, total: int) -> tqdm:  # on rank 0
        return tqdm(total=total, unit="img", desc="sampling", disable=not self.env.is_main)


def match_settings(path: str, settings: dict, what: str):
    """Record `settings` in `path`, or refuse other ones there: a resumed run must not mix them."""
    old = load_json(path, what) if os.path.exists(path) else settings
    diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if diff:
        raise UserError(f"{os.path.dirname(path)} holds {what} made with other settings (was, now: "
                        f"{diff}); choose another --out or delete that folder")
    save_json(settings, path)


def save_npz(path: str, **arrays):
    """Uncompressed (fid.py memory-maps arr_0), written atomically."""
    atomic_write(path, lambda f: np.savez(f, **arrays))  # a file object: no ".npz" appended


def wait_for(paths, poll_s: float = 1.0):
    """Until all `paths` exist: ranks can finish minutes apart, past a collective's timeout."""
    while not all(os.path.exists(p) for p in paths):
        time.sleep(poll_s)


def run_npz(sampler: Sampler, log) -> str:
    """Shards of --shard_size samples by global index, the missing ones split over the ranks, then
    joined by rank 0 into `<out>/samples.npz` (arr_1: labels, `labelling`: how drawn); its path."""
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
    missing = [k for k, p in enumerate(paths) if not os.path.exists(p)]
    env.barrier()  # every rank has listed the shards before any rank writes a new one
    if len(missing) < len(paths):
        log(f"resuming: {len(paths) - len(missing)} of {len(paths)} shards on disk")
    mine = missing[env.rank::env.world_size]
    with sampler.bar(sum(min(S, N - k * S) for k in mine)) as bar:
        for k in mine:  # shard k: the samples [k S, (k + 1) S)
            indices = list(range(k * S, min(N, (k + 1) * S)))
            save_npz(paths[k], arr_0=sampler.images(indices, bar),
                     arr_1=sampler.labels(indices).numpy())
    wait_for(paths if env.is_main else [final])
    if not env.is_main:
        return final
    images, labels = None, np.empty(N, dtype=np.int64)
    for k, p in enumerate(paths):
        try:  # shards are written atomically: a damaged one was damaged on disk, or is not ours
            with np.load(p) as data:
                if images is None:  # (N, H, W, 3), filled shard by shard (50K x 256 px = 9.8 GB)
                    images = np.empty((N, *data["arr_0"].shape[1:]), dtype=np.uint8)
                images[k * S: (k + 1) * S] = data["arr_0"]
                labels[k * S: (k + 1) * S] = data["arr_1"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise UserError(f"the sample shard {p} is damaged ({type(e).__name__}): delete it and "
                            "run the same command again to draw it anew") from None
    save_npz(final, arr_0=images, arr_1=labels,
             **{k: v for k, v in sampler.record.items() if k == "labelling"})
    if not args.keep_shards:
        for p in paths:
            os.remove(p)
        if not os.listdir(os.path.dirname(paths[0])):
            os.rmdir(os.path.dirname(paths[0]))
    return final


def run(sampler: Sampler, log) -> str | None:
    """`--npz`, or a PNG grid of --num_samples samples drawn by rank 0: the file's path."""
    a = sampler.args
    log(", ".join(f"{k} {v}" for k, v in sampler.settings().items() if k not in ("prompts", "ckpt"))
        + f" on {sampler.env.device}")
    if a.npz:
        path = run_npz(sampler, log)
        log(f"{a.num_samples} samples in {path} (arr_0: images NHWC uint8, arr_1: labels)")
        return path
    solver = "" if a.solver == "euler" else "_" + a.solver
    path = os.path.join(a.out, f"grid_cfg{a.cfg:g}_steps{a.steps}{solver}.png")
    if sampler.env.is_main:
        check_writable(path, "output")
        with sampler.bar(a.num_samples) as bar:
            images = torch.from_numpy(sampler.images(list(range(a.num_samples)), bar))
        save_grid(images.permute(0, 3, 1, 2), path)
        log(f"sample grid -> {path}")
    return path if sampler.env.is_main else None


def add_model_args(p, ckpt: str):
    """The model, the ODE and the hardware: the flags of every sampling script."""
    p.add_argument("--ckpt", default=ckpt, help="the training run's checkpoint (or export.pt)")
    p.add_argument("--tokenizer", help="to decode with (default: the checkpoint's, or its stage 3)")
    p.add_argument("--steps", type=at_least(2), default=250, help="time points from 0 to 1")
    p.add_argument("--shift", type=in_range(0, lo_open=True), default=0.3,
                   help="time shift s; 1 = uniform grid")
    p.add_argument("--solver", default="euler", choices=sorted(SOLVERS), help="ODE solver")
    p.add_argument("--cfg_channels", type=at_least(1),
                   help="guide only the first K latent channels (LightningDiT: 3; default: all)")
    p.add_argument("--batch_size", type=at_least(1), default=64, help="per forward, per rank")
    p.add_argument("--seed", type=at_least(0), default=0, help="sample i's generator: (seed, i)")
    p.add_argument("--shard_size", type=at_least(1), default=1000, help="--npz: samples per shard")
    p.add_argument("--raw_weights", action="store_true", help="the raw weights, not the EMA")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="the model's (auto: bf16 on CUDA); decoding is float32")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the model (auto: on CUDA)")


def add_output_args(p):
    """One guidance setting and where its samples go (cfg_search.py sweeps these)."""
    p.add_argument("--cfg", type=in_range(0), default=1.0, help="guidance scale w; 1 = none")
    p.add_argument("--cfg_interval_start", type=in_range(0, 1), default=0.0,
                   help="no guidance for t below this (LightningDiT: 0.10, or 0.125 at 800 epochs)")
    p.add_argument("--num_samples", type=at_least(1), help="default: 16 (grid), 50000 (--npz)")
    p.add_argument("--out", help="output folder (default: samples/ beside the checkpoint)")
    p.add_argument("--npz", action="store_true", help="write an ADM .npz for FID (the 50K mode)")
    p.add_argument("--keep_shards", action="store_true", help="--npz: keep the shards")


def default_out(args) -> str:
    """samples/ beside the checkpoint; with --npz a subfolder per setting, so that none meet."""
    out = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "samples")
    tag = (f"cfg{args.cfg:g}_steps{args.steps}_{args.solver}_seed{args.seed}_n{args.num_samples}"
           + (f"_k{args.cfg_channels}" if args.cfg_channels else "")
           + (f"_from{args.cfg_interval_start:g}" if args.cfg_interval_start else "")
           + (f"_shift{args.shift:g}" if args.shift != 0.3 else ""))
    return os.path.join(out, tag) if args.npz else out


def class_ids(text: str) -> list[int]:
    return [int(c) for c in text.split(",") if c.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p, "runs/dit/ckpt.pt")
    add_output_args(p)
    add_label_args(p)
    args = p.parse_args(argv)
    if args.num_samples is None:
        args.num_samples = len(args.classes) if args.classes else (50_000 if args.npz else 16)
    args.out = args.out or default_out(args)
    return args


def add_label_args(p):  # sample.py's and cfg_search.py's; default: uniformly random labels
    g = p.add_mutually_exclusive_group()
    g.add_argument("--classes", type=class_ids,
                   help="comma-separated class ids, e.g. 207,360,387 (cycled); default: random")
    g.add_argument("--balanced_labels", action="store_true", help="sample i gets class i mod "
                   "classes (50 a class for 50K: FID ~0.1 lower than random labels; state it)")


def class_sampler(args, env) -> Sampler:
    """The model, labels from --classes or all classes (--balanced_labels) cycled, or random."""
    model, tokenizer, meta = load_models(args.ckpt, args.tokenizer, ema=not args.raw_weights)
    if bad := [c for c in args.classes or [] if not 0 <= c < model.num_classes]:
        raise UserError(f"unknown class id(s) {bad}: this model has {model.num_classes} classes")
    cycle = args.classes or (list(range(model.num_classes)) if args.balanced_labels else None)

    def labels(indices):
        if cycle:
            return torch.tensor([cycle[i % len(cycle)] for i in indices])
        return sample_labels(args.seed, indices, model.num_classes)

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
