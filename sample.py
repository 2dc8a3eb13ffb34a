"""Sampling: a trained LightningDiT (train_dit.py) and the tokenizer's decoder turn noise into
images.

  noise (B, 32, 16, 16) at t = 0
    -> the ODE dx/dt = v(x, t, y) integrated to t = 1 (Euler or Heun) on a shifted time grid,
       with classifier-free guidance (CFG)
    -> undo the per-channel latent normalisation of training -> tokenizer decoder -> image

  python sample.py --cfg 1.5                                 # a PNG grid of 16 random classes
  torchrun --nproc_per_node=8 sample.py --npz --cfg 1.5      # 50K samples as ADM's .npz, for fid.py
  python sample.py --ckpt runs/t2i/ckpt.pt --prompt "a red disc on the left" --size 224x288 --cfg 4

Conventions of the LightningDiT code: `--steps N` is N time points from 0 to 1, so N - 1 model
evaluations (the paper's "250 steps"); the time shift t' = s t / (1 + (s - 1) t), s = 0.3, puts more
steps near the noise; guidance v = v_u + w (v_c - v_u) comes from one batched forward over [x; x]
with labels [y; null]. LightningDiT's published protocol guides only the first 3 latent channels and
only for t >= 0.10 (`--cfg_channels 3 --cfg_interval_start 0.10`; its best w is about 10); plain
guidance on every channel is the default. Each sample's noise and label come from a generator seeded
by (--seed, its index), so any number of ranks gives the same samples, and `--npz` writes fixed-size
shards from which an interrupted run resumes. A text-to-image model (train_t2i.py) takes prompts
instead of labels, and guidance compares each with the empty caption.
"""

import argparse
import math
import os
import time
import warnings
import zipfile

import numpy as np
import torch
from tqdm import tqdm

from captions import parse_size
from common import (HelpFormatter, Logger, UserError, add_compile_arg, at_least, atomic_write,
                    autocast, check_writable, cleanup_distributed, in_range, load_checkpoint,
                    load_json, refuse_sharded, save_json, script_main, setup_distributed, use_bf16,
                    use_compile)
from data import save_grid, to_uint8
from dit import build_dit
from t2i import build_t2i
from text import TextEncoder, read_prompts
from baselines import load_tokenizer
from tokenizer import latent_fingerprint

# --------------------------------------------------------------------------------------------------
# Time grid and ODE solvers


def shift_timesteps(t, shift: float):
    """t' = s t / (1 + (s - 1) t): keeps 0 and 1, monotone; s < 1 moves the points towards t = 0.
    Written s t / (s t + 1 - t), the same value, so that t = 1 maps to exactly 1 in floating
    point."""
    return shift * t / (shift * t + (1 - t))


def time_grid(steps: int, shift: float) -> torch.Tensor:
    """`steps` time points from 0 (noise) to 1 (data), shifted: (steps,) float64 on the CPU."""
    return shift_timesteps(torch.linspace(0, 1, steps, dtype=torch.float64), shift)


def euler(velocity_fn, x, ts):
    """x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i): len(ts) - 1 evaluations. The times are host
    numbers, so the loop never waits for the GPU."""
    ts = [float(t) for t in ts]
    for t0, t1 in zip(ts[:-1], ts[1:]):
        x = x + (t1 - t0) * velocity_fn(x, t0)
    return x


def heun(velocity_fn, x, ts):
    """Heun's method (explicit trapezoid): an Euler predictor, then the mean of the velocities at
    both ends. Second order, 2 (len(ts) - 1) evaluations."""
    ts = [float(t) for t in ts]
    for t0, t1 in zip(ts[:-1], ts[1:]):
        v0 = velocity_fn(x, t0)
        x = x + (t1 - t0) * 0.5 * (v0 + velocity_fn(x + (t1 - t0) * v0, t1))
    return x


SOLVERS = {"euler": euler, "heun": heun}

# --------------------------------------------------------------------------------------------------
# Classifier-free guidance


def guided_velocity(model, y, cfg_scale: float, cfg_channels=None, cfg_interval_start: float = 0.0,
                    null=None):
    """velocity_fn(x, t) for conditions y: v_u + w (v_c - v_u), w = cfg_scale, from one forward over
    2B rows [y; null]. y: labels (B,), and null the label table's extra row (model.num_classes) by
    default; or a text model's (states, mask), and null those of the empty caption. cfg_channels=K
    guides channels [:K] only and keeps the conditional velocity on the rest; below
    cfg_interval_start, and everywhere when w = 1, the velocity is the conditional one, and the
    unconditional rows are not computed at all."""
    null = torch.full_like(y, model.num_classes) if null is None else null
    y2 = tuple(map(torch.cat, zip(y, null))) if isinstance(y, tuple) else torch.cat([y, null])

    def velocity_fn(x, t):  # x: (B, C, H, W); t: a host number
        # a fill kernel: no host-to-device copy, no sync
        t_dev = torch.full((), float(t), device=x.device)
        if cfg_scale == 1.0 or t < cfg_interval_start:
            return model(x, t_dev, y).to(x.dtype)
        v_c, v_u = model(torch.cat([x, x]), t_dev, y2).to(x.dtype).chunk(2)  # each (B, C, H, W)
        k = cfg_channels or x.shape[1]
        return torch.cat([v_u[:, :k] + cfg_scale * (v_c[:, :k] - v_u[:, :k]), v_c[:, k:]], dim=1)

    return velocity_fn


def sample_latents(model, y, noise, steps: int = 250, cfg_scale: float = 1.0, shift: float = 0.3,
                   solver: str = "euler", cfg_channels=None, cfg_interval_start: float = 0.0,
                   bar=None, null=None):
    """Normalised latents (B, C, H, W) from noise (B, C, H, W) and conditions y (labels (B,), or a
    text model's (states, mask)), on the model's device. No autocast in here: the caller chooses the
    precision. `bar` (tqdm) counts the model evaluations."""
    velocity_fn = guided_velocity(model, y, cfg_scale, cfg_channels, cfg_interval_start, null)
    if bar is not None:
        guided = velocity_fn
        velocity_fn = lambda x, t: (bar.update(1), guided(x, t))[1]  # noqa: E731
    with torch.no_grad():
        return SOLVERS[solver](velocity_fn, noise, time_grid(steps, shift))


# --------------------------------------------------------------------------------------------------
# Per-sample seeds and decoding


def _generator(seed: int, index: int, stream: int) -> torch.Generator:
    """A CPU generator for one sample: SeedSequence mixes (seed, index, stream) into a 63-bit seed,
    so neighbouring seeds and indices give unrelated streams (stream 0: noise, 1: label)."""
    state = np.random.SeedSequence([seed, index, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2 ** 63 - 1))


def sample_noise(seed: int, indices, shape) -> torch.Tensor:
    """(len(indices), *shape) float32 CPU noise; row i depends only on (seed, indices[i])."""
    rows = [torch.randn(tuple(shape), generator=_generator(seed, int(i), 0)) for i in indices]
    return torch.stack(rows) if rows else torch.empty(0, *shape)


def sample_labels(seed: int, indices, num_classes: int) -> torch.Tensor:
    """(len(indices),) int64 class labels, uniform over [0, num_classes), one generator per
    index."""
    labels = [int(torch.randint(num_classes, (1,), generator=_generator(seed, int(i), 1)))
              for i in indices]
    return torch.tensor(labels, dtype=torch.long)


def denormalize(z, latent_stats):
    """Undo training's per-channel normalisation (z - mean) / std: (B, C, H, W) -> tokenizer
    latents."""
    mean, std = (torch.as_tensor(latent_stats[k], dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
                 for k in ("mean", "std"))
    return z * std + mean


@torch.no_grad()
def decode_to_uint8(tokenizer, z_norm, latent_stats) -> torch.Tensor:
    """Normalised latents (B, C, h, w) -> uint8 images (B, 3, 16h, 16w). The decoder runs in
    float32: a small share of the time, and it sets the final pixels."""
    with torch.autocast(z_norm.device.type, enabled=False):
        return to_uint8(tokenizer.decode(denormalize(z_norm.float(), latent_stats)))


# --------------------------------------------------------------------------------------------------
# Loading, with the checks that turn a wrong file into a clear message


def dit_latent_shape(model) -> tuple[int, ...]:
    """(C, H, W) for a class-conditional LightningDiT; (C,) for a text-to-image model, which takes
    any size."""
    if not hasattr(model, "grid_size"):
        return (model.in_channels,)
    side = model.grid_size * model.patch_size
    return (model.in_channels, side, side)


def load_models(ckpt: str, tokenizer_path: str | None, ema: bool):
    """(LightningDiT, tokenizer, checkpoint metadata) on the CPU, checked against each other."""
    refuse_sharded(ckpt, "LightningDiT checkpoint")
    if not os.path.isfile(ckpt):
        raise UserError(f"no LightningDiT checkpoint at {ckpt}: train one first "
                        "(python train_dit.py) or pass --ckpt")
    model, meta = load_dit(ckpt, ema=ema)
    stats, C = meta.get("latent_stats"), model.in_channels
    if not isinstance(stats, dict) or not {"mean", "std"} <= set(stats):
        raise UserError(f"{ckpt} has no latent statistics ('latent_stats': per-channel 'mean' and "
                        "'std' of the training latents), so its samples cannot be mapped back to "
                        "the tokenizer's latent space: use a checkpoint written by train_dit.py")
    stats = {k: torch.as_tensor(stats[k], dtype=torch.float32).flatten() for k in ("mean", "std")}
    if any(v.numel() != C for v in stats.values()):
        raise UserError(f"{ckpt}: latent_stats have {stats['mean'].numel()} channels but the "
                        f"model has {C}")
    meta["latent_stats"] = stats
    tokenizer_path = tokenizer_path or refined_tokenizer(meta.get("tokenizer"))
    if not tokenizer_path or (tokenizer_path.endswith((".pt", ".pth", ".ckpt"))
                              and not os.path.isfile(tokenizer_path)):
        raise UserError(f"tokenizer {tokenizer_path} not found (named by {ckpt} or --tokenizer): "
                        "pass --tokenizer PATH to the tokenizer whose latents the LightningDiT was "
                        "trained on")
    image_size = (meta.get("tokenizer_config") or {}).get("image_size")
    tokenizer = load_tokenizer(tokenizer_path, image_size)
    expected = dit_latent_shape(model)
    if tuple(tokenizer.latent_shape)[:len(expected)] != expected:
        raise UserError(f"tokenizer {tokenizer_path} makes latents of shape "
                        f"{tuple(tokenizer.latent_shape)} but the LightningDiT in {ckpt} "
                        f"generates {expected}: pass the tokenizer it was trained with "
                        "(--tokenizer)")
    # A stage-3 tokenizer (new decoder, same encoder and adapter) is a legitimate swap; any other
    # is not.
    if meta.get("tokenizer_fingerprint") not in (None, latent_fingerprint(tokenizer)):
        raise UserError(f"the LightningDiT in {ckpt} was trained on latents of "
                        f"{meta.get('tokenizer')}, but {tokenizer_path} makes other latents (other "
                        "encoder weights): decode with that tokenizer or its stage-3 refinement "
                        "(--tokenizer)")
    meta["tokenizer"] = tokenizer_path
    return model, tokenizer, meta


def load_dit(path: str, ema: bool = True):
    """(the LightningDiT or text-to-image model of a train_dit.py/train_t2i.py checkpoint, in eval
    mode with its EMA or raw weights; the rest of the checkpoint): the latter holds `latent_stats`
    (per-channel mean and std, to undo the latent normalisation) and `tokenizer`."""
    ckpt = load_checkpoint(path, "LightningDiT checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("kind") not in ("dit", "t2i"):
        found = ckpt.get("kind", "unknown") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path} is not a LightningDiT checkpoint of this project (kind: {found})")
    weights = "ema" if ema else "model"
    if weights not in ckpt:
        raise UserError(f"{path} has no '{weights}' weights"
                        + (" (--raw_weights uses the raw ones)" if ema else ""))
    build = build_t2i if ckpt["kind"] == "t2i" else build_dit
    model = build(ckpt["model_name"], **ckpt["model_args"])
    model.load_state_dict(ckpt[weights])
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "ema", "opt", "rng", "data")}
    return model.eval(), meta




def refined_tokenizer(path: str | None) -> str | None:
    """The tokenizer to decode with: the stage-3 refinement of `path` (<run>/stage3/tokenizer.pt,
    started from `path`) when there is one, since it decodes the same latents better; else `path`
    itself."""
    folder = os.path.dirname(os.path.abspath(path)) if path and os.path.isfile(path) else ""
    if os.path.basename(folder) not in ("stage1", "stage2"):  # not train_tokenizer.py's export
        return path  # (or a baseline, named by folder or hub name: no stage 3 either)
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


# --------------------------------------------------------------------------------------------------
# Generation


class Task:
    """What to sample: the latent shape, and for sample i its label (a class, or a prompt's index)
    and the model's conditions (labels, or a text model's states) with their unconditional
    counterpart."""

    def __init__(self, model, args, meta, device, text=None):
        self.args, self.device, self.text, self.prompts = args, device, text, args.prompts
        if text is None:
            self.shape, self.num_classes = dit_latent_shape(model), model.num_classes
        else:
            factor = meta["latent_factor"]
            self.shape = (model.in_channels, args.size[0] // factor, args.size[1] // factor)

    def labels(self, indices) -> torch.Tensor:
        """`--classes` or the prompts cycled over the indices, else a random class per index."""
        if self.text is not None:
            return torch.tensor([i % len(self.prompts) for i in indices], dtype=torch.long)
        if self.args.classes:
            classes = self.args.classes
            return torch.tensor([classes[i % len(classes)] for i in indices], dtype=torch.long)
        return sample_labels(self.args.seed, indices, self.num_classes)

    def conditions(self, labels):
        if self.text is None:
            return labels.to(self.device), None
        prompts = [self.prompts[i] for i in labels]
        return self.text(prompts, warn=True), self.text([""] * len(labels))


def generate(model, tokenizer, latent_stats, indices, task, args, device, bf16, bar=None):
    """Images for the global `indices`: (n, H, W, 3) uint8 numpy, in batches. `bar` counts model
    evaluations."""
    out = []
    for s in range(0, len(indices), args.batch_size):
        idx = indices[s: s + args.batch_size]
        noise = sample_noise(args.seed, idx, task.shape).to(device)  # (b, C, h, w)
        y, null = task.conditions(task.labels(idx))
        with autocast(device, bf16):
            z = sample_latents(model, y, noise, args.steps, args.cfg, args.shift, args.solver,
                               args.cfg_channels, args.cfg_interval_start, bar, null)
        images = decode_to_uint8(tokenizer, z, latent_stats)  # (b, 3, H, W)
        out.append(images.permute(0, 2, 3, 1).cpu())  # (b, H, W, 3)
    return torch.cat(out).numpy()


def progress(counts, args, env=None) -> tqdm:
    """A bar over the model evaluations that generating groups of `counts` images takes (rank 0
    only)."""
    per_batch = (args.steps - 1) * (2 if args.solver == "heun" else 1)
    total = sum(math.ceil(n / args.batch_size) for n in counts) * per_batch
    return tqdm(total=total, unit="eval", desc=f"sampling {sum(counts)} images", dynamic_ncols=True,
                disable=env is not None and not env.is_main)


def save_npz(path: str, **arrays):
    """Uncompressed (fid.py memory-maps arr_0), written atomically."""
    # a file object: np.savez would append ".npz" to a name
    atomic_write(path, lambda f: np.savez(f, **arrays))


def wait_for(paths, poll_s: float = 1.0):
    """Wait until all `paths` exist: ranks can finish minutes apart, longer than a collective's
    timeout."""
    while not all(os.path.exists(p) for p in paths):
        time.sleep(poll_s)


def run_npz(args, env, model, tokenizer, meta, task, bf16, log):
    """Shards of `--shard_size` samples by global index, the missing ones split over the ranks, then
    concatenated by rank 0 into `<out>/samples.npz`. Returns its path."""
    N, S = args.num_samples, args.shard_size
    final = os.path.join(args.out, "samples.npz")
    settings_path = os.path.join(args.out, "settings.json")
    shard_dir = os.path.join(args.out, "shards")

    def shard_path(k):  # shard k holds the samples [k S, (k + 1) S)
        return os.path.join(shard_dir, f"shard_{k:06d}.npz")

    # Everything that changes the images; a resumed run must match it, or shards would mix settings.
    settings = dict(ckpt=os.path.abspath(args.ckpt), step=meta.get("step"),
                    weights="raw" if args.raw_weights else "ema",
                    tokenizer=os.path.abspath(meta["tokenizer"]), cfg=args.cfg,
                    cfg_channels=args.cfg_channels, cfg_interval_start=args.cfg_interval_start,
                    steps=args.steps, shift=args.shift, solver=args.solver, seed=args.seed,
                    classes=args.classes, prompts=args.prompts, size=list(args.size or []),
                    num_samples=N, shard_size=S, precision="bf16" if bf16 else "fp32")
    if env.is_main:
        if os.path.exists(settings_path):
            old = load_json(settings_path, "sample settings")
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            if diff:
                raise UserError(f"{args.out} holds samples made with other settings (was, now: "
                                f"{diff}); choose another --out or delete that folder")
        else:
            save_json(settings, settings_path)
    env.barrier()
    if os.path.exists(final):
        log(f"{final} already holds these {N} samples")
        return final
    num_shards = math.ceil(N / S)
    missing = [k for k in range(num_shards) if not os.path.exists(shard_path(k))]
    env.barrier()  # every rank has listed the shards before any rank writes a new one
    mine = missing[env.rank::env.world_size]
    if len(missing) < num_shards:
        log(f"resuming: {num_shards - len(missing)} of {num_shards} shards already on disk")
    bar = progress([min(S, N - k * S) for k in mine], args, env)
    for k in mine:
        indices = list(range(k * S, min(N, (k + 1) * S)))
        images = generate(model, tokenizer, meta["latent_stats"], indices, task, args, env.device,
                          bf16, bar)
        save_npz(shard_path(k), arr_0=images, arr_1=task.labels(indices).numpy())
    bar.close()
    if not env.is_main:
        wait_for([final])
        return final
    paths = [shard_path(k) for k in range(num_shards)]
    wait_for(paths)
    images, labels = None, np.empty(N, dtype=np.int64)
    for k, p in enumerate(paths):
        try:  # shards are written atomically: a damaged one was damaged on disk, or is not ours
            with np.load(p) as shard:
                if images is None:  # (N, H, W, 3), filled shard by shard (50K x 256 px = 9.8 GB)
                    images = np.empty((N, *shard["arr_0"].shape[1:]), dtype=np.uint8)
                images[k * S: (k + 1) * S] = shard["arr_0"]
                labels[k * S: (k + 1) * S] = shard["arr_1"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            why = f"{type(e).__name__}: {str(e).split('. ')[0]}"
            raise UserError(f"the sample shard {p} is damaged ({why}): delete it and run the same "
                            "command again to draw it anew") from None
    save_npz(final, arr_0=images, arr_1=labels)
    if not args.keep_shards:
        for p in paths:
            os.remove(p)
        if not os.listdir(shard_dir):
            os.rmdir(shard_dir)
    return final


def grid_path(args) -> str:
    solver = "" if args.solver == "euler" else f"_{args.solver}"
    return os.path.join(args.out, f"grid_cfg{args.cfg:g}_steps{args.steps}{solver}.png")


def run_grid(args, model, tokenizer, meta, task, device, bf16):
    """A PNG grid of `--num_samples` samples (default: one per `--classes` entry, or 16 random)."""
    indices = list(range(args.num_samples))
    bar = progress([len(indices)], args)
    images = generate(model, tokenizer, meta["latent_stats"], indices, task, args, device, bf16,
                      bar)
    bar.close()
    save_grid(torch.from_numpy(images).permute(0, 3, 1, 2), grid_path(args))
    return grid_path(args)


# --------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", default="runs/dit/ckpt.pt",
                   help="LightningDiT checkpoint from train_dit.py")
    p.add_argument("--tokenizer", help="tokenizer.pt to decode with (default: the one named in the "
                   "checkpoint, or its stage-3 refinement beside it if there is one)")
    p.add_argument("--cfg", type=at_least(0.0, float), default=1.0,
                   help="guidance scale w; 1 = no guidance")
    p.add_argument("--steps", type=at_least(2), default=250,
                   help="time points from 0 to 1 (N-1 Euler evaluations)")
    p.add_argument("--shift", type=in_range(0, math.inf, lo_open=True), default=0.3,
                   help="time shift s; 1 = uniform grid")
    p.add_argument("--solver", default="euler", choices=sorted(SOLVERS), help="ODE solver")
    p.add_argument("--cfg_channels", type=at_least(1),
                   help="guide only the first K latent channels (LightningDiT: 3; default: all)")
    p.add_argument("--cfg_interval_start", type=in_range(0, 1), default=0.0,
                   help="no guidance for t below this (LightningDiT: 0.10, or 0.125 at 800 epochs)")
    p.add_argument("--classes",
                   help="comma-separated class ids, e.g. 207,360,387 (cycled); default: random")
    g = p.add_argument_group("text-to-image models (train_t2i.py)")
    g.add_argument("--prompt", help="the caption to draw (--num_samples times)")
    g.add_argument("--prompts", metavar="FILE", help="captions, one per line, cycled over the "
                   "samples (for FID: arr_1 holds each sample's line number)")
    g.add_argument("--size",
                   help="HxW, one of the model's buckets, e.g. 224x288 (default: the square one)")
    g.add_argument("--text_encoder", help="a local copy of the checkpoint's text encoder "
                   "(default: the name it gives)")
    p.add_argument("--num_samples", type=at_least(1), help="default: the number of --classes or "
                   "--prompts, or 16 for a grid; 50000 with --npz")
    p.add_argument("--batch_size", type=at_least(1), default=64,
                   help="samples per forward pass per rank")
    p.add_argument("--seed", type=at_least(0), default=0,
                   help="sample i uses a generator seeded from (seed, i)")
    p.add_argument("--out", help="output folder (default: samples/ beside the checkpoint)")
    p.add_argument("--npz", action="store_true", help="write an ADM .npz for FID (the 50K mode)")
    p.add_argument("--shard_size", type=at_least(1), default=1000,
                   help="--npz: samples per resumable shard")
    p.add_argument("--keep_shards", action="store_true",
                   help="--npz: keep the shards after concatenation")
    p.add_argument("--raw_weights", action="store_true",
                   help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA if present")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="DiT precision (auto: bf16 autocast on CUDA, fp32 on CPU); decoding "
                   "is float32")
    add_compile_arg(p)
    args = p.parse_args(argv)
    if args.classes is not None:
        try:
            args.classes = [int(c) for c in args.classes.split(",") if c.strip()]
        except ValueError:
            p.error(f"argument --classes: comma-separated integers expected, got {args.classes!r}")
    if args.prompt is not None and args.prompts is not None:
        p.error("give --prompt or --prompts, not both")
    return args


def complete_args(args):
    """The defaults that depend on files: the prompts, then the number of samples and the output
    folder."""
    single = [args.prompt] if args.prompt is not None else None
    args.prompts = read_prompts(args.prompts) if args.prompts else single
    if args.num_samples is None:
        given = args.classes or (args.prompts if args.prompt is None else None)
        args.num_samples = len(given) if given else (50_000 if args.npz else 16)
    if args.out is None:
        args.out = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "samples")
        if args.npz:  # one folder per setting, so that runs with other settings never meet
            tag = (f"cfg{args.cfg:g}_steps{args.steps}_{args.solver}_seed{args.seed}"
                   f"_n{args.num_samples}")
            tag += f"_k{args.cfg_channels}" if args.cfg_channels else ""
            tag += f"_from{args.cfg_interval_start:g}" if args.cfg_interval_start else ""
            tag += f"_shift{args.shift:g}" if args.shift != 0.3 else ""
            args.out = os.path.join(args.out, tag)
    return args


def setup(args, env, log):
    """The models on the device, checked against the flags: (model, tokenizer, meta, task, bf16)."""
    model, tokenizer, meta = load_models(args.ckpt, args.tokenizer, ema=not args.raw_weights)
    text = None
    if meta["kind"] == "t2i":
        if not args.prompts or args.classes:
            raise UserError(f"{args.ckpt} is a text-to-image model: give --prompt TEXT or "
                            "--prompts FILE (not --classes)")
        sizes = [tuple(s) for s in meta["buckets"]]
        args.size = parse_size(args.size, sizes) if args.size else sizes[len(sizes) // 2]
        dtype = torch.bfloat16 if use_bf16(args.precision, env.device) else torch.float32
        text = TextEncoder(args.text_encoder or meta["text_encoder"], meta["max_length"],
                           env.device, dtype)
        trained = meta["model_args"]["text_dim"]
        if text.dim != trained:  # now, not as a shape error inside the first batch
            raise UserError(f"the text encoder {text.name} gives {text.dim}-d states, but the "
                            f"model in {args.ckpt} was trained on {trained}-d ones (from "
                            f"{meta['text_encoder']}): pass that encoder (--text_encoder)")
    elif args.prompts or args.size:
        raise UserError(f"{args.ckpt} is a class-conditional model: --prompt, --prompts and "
                        "--size are for text-to-image models (train_t2i.py); use --classes")
    bad = [c for c in args.classes or [] if not 0 <= c < getattr(model, "num_classes", 0)]
    if bad:
        raise UserError(f"unknown class id(s) {bad}: this model has {model.num_classes} classes "
                        f"(0..{model.num_classes - 1})")
    if args.cfg_channels is not None and args.cfg_channels > model.in_channels:
        raise UserError(f"--cfg_channels must be between 1 and {model.in_channels}, got "
                        f"{args.cfg_channels}")
    if env.is_main:  # before the work, not after it
        output = os.path.join(args.out, "samples.npz") if args.npz else grid_path(args)
        check_writable(output, "output")
    bf16 = use_bf16(args.precision, env.device)
    model.to(env.device)
    # decoding needs only these; the encoder stays on the CPU
    for module in tokenizer.decoding_modules():
        module.to(env.device)
    if use_compile(args.compile, env.device):
        model.compile()  # in place (the first batch includes the compilation)
    log(f"LightningDiT {meta.get('model_name')} step {meta.get('step')} "
        f"({'raw' if args.raw_weights else 'EMA'} weights), tokenizer {meta['tokenizer']}; "
        f"cfg {args.cfg:g} (channels {args.cfg_channels or 'all'}, "
        f"from t={args.cfg_interval_start:g}), {args.solver} {args.steps} steps, "
        f"shift {args.shift:g}, {'bf16' if bf16 else 'fp32'} on {env.device}")
    return model, tokenizer, meta, Task(model, args, meta, env.device, text), bf16


def main(argv=None):
    args = complete_args(parse_args(argv))
    env = setup_distributed(args.device)
    log = Logger(env).info
    model, tokenizer, meta, task, bf16 = setup(args, env, log)
    if args.npz:
        path = run_npz(args, env, model, tokenizer, meta, task, bf16, log)
        log(f"{args.num_samples} samples in {path} (arr_0: images NHWC uint8, arr_1: labels)")
    else:
        path = (run_grid(args, model, tokenizer, meta, task, env.device, bf16) if env.is_main
                else None)
        log(f"sample grid -> {path}")
    cleanup_distributed()
    return path


if __name__ == "__main__":
    script_main(main)
