"""Sampling: turn a trained LightningDiT (dit.py, train_dit.py) into images with the aligned tokenizer's
decoder (tokenizer.py). This is the generation half of the method (SPEC section 2, "Sampling").

    noise (B, 32, 16, 16) at t = 0
      -> ODE dx/dt = v(x, t, y) integrated to t = 1 (Euler, or Heun), on a shifted time grid,
         with classifier-free guidance (CFG)                            -> normalised latent
      -> undo the per-channel latent normalisation of training         -> tokenizer latent
      -> tokenizer decoder                                              -> image (B, 3, 256, 256)

Conventions, as in the reference code (hustvl/LightningDiT, transport/integrators.py and inference.py):
- `--steps N` means N time points from 0 to 1, so N - 1 model evaluations per sample with Euler
  (the paper's "250 steps" and "30 steps"). Heun uses two evaluations per interval.
- Time shift t' = s t / (1 + (s - 1) t), s = 0.3: s < 1 spends more of the steps near t = 0 (noise).
  s = 1 is no shift (the reference writes `timestep_shift: 0` for that).
- CFG: v = v_u + w (v_c - v_u) from one batched forward over [x; x] with labels [y; null].
  `--cfg 1` runs the conditional model alone. LightningDiT's published protocol adds two quirks that
  make its best scales large: guidance only on the first 3 latent channels (`--cfg_channels 3`) and
  no guidance while t < 0.10 (`--cfg_interval_start 0.10`; 0.125 for its 800-epoch model), e.g.
      python sample.py --npz --cfg 10 --cfg_channels 3 --cfg_interval_start 0.10
  Plain CFG on all channels is the default.

Two outputs:
- a PNG grid (default) of `--classes` or of random classes, to look at;
- `--npz`: an ADM-format `<out>/samples.npz` (`arr_0` uint8 NHWC images, `arr_1` int64 labels) for
  fid.py or the ADM evaluator, usually 50K samples under `torchrun`. Labels are drawn uniformly at
  random per sample, as ADM and LightningDiT do for their FID runs (or cycle through `--classes`).
  Samples are grouped into fixed-size shards by global index; each rank writes the missing shards it is
  given, so an interrupted run resumes where it stopped and any number of ranks can finish it.

Every sample has its own noise and label generator seeded from (`--seed`, global index): the same
seed gives the same noise and labels whatever the number of ranks or the batch size (with the same
batch size the images are bit-identical; a different batch size can change the last bits of the
GPU/CPU kernels' results, hence rarely one uint8 level).
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from common import Logger, autocast, cleanup_distributed, setup_distributed, use_bf16
from data import save_grid, to_uint8
from dit import load_dit
from tokenizer import load_tokenizer

# ----------------------------------------------------------------------------------------------------
# Time grid and ODE solvers


def shift_timesteps(t, shift: float):
    """t' = s t / (1 + (s - 1) t): keeps 0 and 1, monotone for s > 0; s < 1 moves points towards 0.

    Written as s t / (s t + (1 - t)), the same value, so that t = 1 maps to exactly 1 in floating point."""
    if shift <= 0:
        raise ValueError(f"--shift must be > 0 (1.0 = no shift), got {shift}")
    return shift * t / (shift * t + (1 - t))


def time_grid(steps: int, shift: float, device=None) -> torch.Tensor:
    """`steps` time points from 0 (noise) to 1 (data), shifted: (steps,) float32 on `device`."""
    if steps < 2:
        raise ValueError(f"--steps must be at least 2 (N time points from 0 to 1 = N-1 model evaluations), "
                         f"got {steps}")
    t = shift_timesteps(torch.linspace(0, 1, steps, dtype=torch.float64), shift)
    return t.float().to(device)


def euler(velocity_fn, x, ts):
    """x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i): len(ts) - 1 evaluations. `ts` lives on x's device,
    so indexing it and the step sizes stay on the device (no host sync per step)."""
    for i in range(len(ts) - 1):
        x = x + (ts[i + 1] - ts[i]) * velocity_fn(x, ts[i]).to(x.dtype)
    return x


def heun(velocity_fn, x, ts):
    """Heun's method (explicit trapezoid): an Euler predictor, then the average of the velocities at
    both ends. Second order, 2 (len(ts) - 1) evaluations."""
    for i in range(len(ts) - 1):
        dt = ts[i + 1] - ts[i]
        v0 = velocity_fn(x, ts[i]).to(x.dtype)
        v1 = velocity_fn(x + dt * v0, ts[i + 1]).to(x.dtype)
        x = x + dt * 0.5 * (v0 + v1)
    return x


SOLVERS = {"euler": euler, "heun": heun}

# ----------------------------------------------------------------------------------------------------
# Classifier-free guidance


def guided_velocity(model, y, cfg_scale: float, cfg_channels=None, cfg_interval_start: float = 0.0,
                    null_class=None):
    """velocity_fn(x, t) for labels y (B,): v_u + w (v_c - v_u), from one forward over 2B rows.

    cfg_channels=K guides channels [:K] only and keeps the conditional velocity on the rest (the
    reference's first-3-channels protocol); for t < cfg_interval_start the velocity is v_c. The
    interval is applied with torch.where, not an `if`, so that t never has to be read on the host.
    cfg_scale == 1 is the conditional model alone: no unconditional pass at all.
    """
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, y).to(x.dtype)
    null = model.num_classes if null_class is None else null_class  # the label table's extra row
    y2 = torch.cat([y, torch.full_like(y, null)])  # (2B,): [y; null]

    def velocity_fn(x, t):  # x: (B, C, H, W)
        v_c, v_u = model(torch.cat([x, x]), t, y2).to(x.dtype).chunk(2)  # each (B, C, H, W)
        k = x.shape[1] if cfg_channels is None else cfg_channels
        if not 1 <= k <= x.shape[1]:  # a host-side int check, no sync
            raise ValueError(f"--cfg_channels must be between 1 and {x.shape[1]} (the latent channels), got {k}")
        v = torch.cat([v_u[:, :k] + cfg_scale * (v_c[:, :k] - v_u[:, :k]), v_c[:, k:]], dim=1)
        if cfg_interval_start > 0:
            v = torch.where(torch.as_tensor(t, device=x.device) < cfg_interval_start, v_c, v)
        return v

    return velocity_fn


def sample_latents(model, y, noise, steps: int = 250, cfg_scale: float = 1.0, shift: float = 0.3,
                   solver: str = "euler", cfg_channels=None, cfg_interval_start: float = 0.0):
    """Normalised latents (B, C, H, W) from noise (B, C, H, W) and labels y (B,), both on the model's
    device. No autocast in here: callers choose the precision around this call."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    ts = time_grid(steps, shift, device=noise.device)
    velocity_fn = guided_velocity(model, y, cfg_scale, cfg_channels, cfg_interval_start)
    with torch.no_grad():
        return SOLVERS[solver](velocity_fn, noise, ts)


# ----------------------------------------------------------------------------------------------------
# Per-sample seeds and decoding


def _generator(seed: int, index: int, stream: int) -> torch.Generator:
    """A CPU generator for one sample: SeedSequence mixes (seed, index, stream) into a 63-bit seed, so
    neighbouring seeds and indices give unrelated streams (stream 0: noise, 1: label)."""
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    state = np.random.SeedSequence([seed, index, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2 ** 63 - 1))


def sample_noise(seed: int, indices, shape) -> torch.Tensor:
    """(len(indices), *shape) float32 CPU noise; row i depends only on (seed, indices[i])."""
    rows = [torch.randn(tuple(shape), generator=_generator(seed, int(i), 0)) for i in indices]
    return torch.stack(rows) if rows else torch.empty(0, *shape)


def sample_labels(seed: int, indices, num_classes: int) -> torch.Tensor:
    """(len(indices),) int64 class labels, uniform over [0, num_classes), one generator per index."""
    return torch.tensor([int(torch.randint(num_classes, (1,), generator=_generator(seed, int(i), 1)))
                         for i in indices], dtype=torch.long)


def denormalize(z, latent_stats):
    """Undo training's per-channel normalisation (z - mean) / std: (B, C, H, W) -> tokenizer latents."""
    mean, std = (torch.as_tensor(latent_stats[k], dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
                 for k in ("mean", "std"))
    return z * std + mean


def decode_to_uint8(tokenizer, z_norm, latent_stats) -> torch.Tensor:
    """Normalised latents (B, C, h, w) -> uint8 images (B, 3, 16h, 16w), rounded to nearest (data.to_uint8)."""
    with torch.no_grad():
        return to_uint8(tokenizer.decode(denormalize(z_norm.float(), latent_stats)))


# ----------------------------------------------------------------------------------------------------
# Loading, with the checks that turn a wrong file into a clear message


def dit_latent_shape(model) -> tuple[int, int, int]:
    side = model.grid_size * model.patch_size
    return (model.in_channels, side, side)


def load_models(ckpt: str, tokenizer_path: str | None, ema: bool):
    """(LightningDiT, tokenizer, checkpoint metadata) on the CPU, checked against each other."""
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"no LightningDiT checkpoint at {ckpt}: train one first (python train_dit.py) "
                                "or pass --ckpt PATH")
    try:
        model, meta = load_dit(ckpt, ema=ema)
    except KeyError as e:
        hint = " (pass --raw_weights to sample with the raw weights)" if e.args == ("ema",) else ""
        raise ValueError(f"{ckpt} has no {e} entry{hint}: is it a complete checkpoint written by train_dit.py?") from e
    stats = meta.get("latent_stats")
    C = model.in_channels
    if not isinstance(stats, dict) or not {"mean", "std"} <= set(stats):
        raise ValueError(f"{ckpt} has no latent statistics ('latent_stats' with per-channel 'mean' and 'std' of "
                         "the training latents), so its samples cannot be mapped back to the tokenizer's latent "
                         "space. Use a checkpoint written by train_dit.py, or add the statistics of the latents "
                         "it was trained on.")
    stats = {k: torch.as_tensor(stats[k], dtype=torch.float32).flatten() for k in ("mean", "std")}
    if any(v.numel() != C for v in stats.values()):
        raise ValueError(f"{ckpt}: latent_stats have {stats['mean'].numel()} channels but the model has {C}")
    meta["latent_stats"] = stats

    tokenizer_path = tokenizer_path or meta.get("tokenizer")
    if not tokenizer_path:
        raise ValueError(f"{ckpt} does not name its tokenizer: pass --tokenizer PATH (the tokenizer.pt its "
                         "latents were extracted with)")
    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"tokenizer {tokenizer_path} not found (named by {ckpt} or --tokenizer): pass "
                                "--tokenizer PATH to the tokenizer.pt the DiT's latents came from")
    tokenizer = load_tokenizer(tokenizer_path)
    if tuple(tokenizer.latent_shape) != dit_latent_shape(model):
        raise ValueError(f"tokenizer {tokenizer_path} makes latents of shape {tuple(tokenizer.latent_shape)} but "
                         f"the LightningDiT in {ckpt} generates {dit_latent_shape(model)}: pass the tokenizer "
                         "it was trained with (--tokenizer)")
    # A stage-3 tokenizer (new decoder, same encoder) is a legitimate swap; another encoder is not.
    stored = meta.get("tokenizer_config") or {}
    differ = [k for k in ("encoder", "latent_channels", "adapter_hidden", "image_size")
              if k in stored and stored[k] != tokenizer.config.get(k)]
    if differ:
        print(f"WARNING: tokenizer {tokenizer_path} differs from the one the DiT was trained on in {differ}: "
              "the latents may not match", file=sys.stderr)
    meta["tokenizer"] = tokenizer_path
    return model, tokenizer, meta


# ----------------------------------------------------------------------------------------------------
# Generation


def generate(model, tokenizer, latent_stats, indices, labels, args, device, bf16, bar=None):
    """Images for the global `indices` with `labels`: (n, H, W, 3) uint8 numpy, in batches."""
    out = []
    for s in range(0, len(indices), args.batch_size):
        idx = indices[s: s + args.batch_size]
        noise = sample_noise(args.seed, idx, dit_latent_shape(model)).to(device)  # (b, C, h, w)
        y = labels[s: s + args.batch_size].to(device)
        with autocast(device, bf16):
            z = sample_latents(model, y, noise, args.steps, args.cfg, args.shift, args.solver,
                               args.cfg_channels, args.cfg_interval_start)
        # The decoder runs in float32: it is a small share of the time and sets the final pixels.
        out.append(decode_to_uint8(tokenizer, z, latent_stats).permute(0, 2, 3, 1).cpu())  # (b, H, W, 3)
        if bar is not None:
            bar.update(len(idx))
    return torch.cat(out).numpy()


def labels_for(indices, classes, seed, num_classes) -> torch.Tensor:
    """`classes` cycled over the indices, else a random class per index."""
    if classes:
        return torch.tensor([classes[i % len(classes)] for i in indices], dtype=torch.long)
    return sample_labels(seed, indices, num_classes)


def save_npz(path: str, **arrays):
    """np.savez (uncompressed: fid.py memory-maps arr_0) to a temporary file, then renamed: a crash
    never leaves a half-written file under `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, **arrays)
    os.replace(tmp, path)


def wait_for(paths, poll_s: float = 1.0):
    """Wait until all `paths` exist. Used instead of a barrier at the end of a long run: ranks can
    finish minutes apart, longer than a collective's timeout (10 minutes with NCCL)."""
    while not all(os.path.exists(p) for p in paths):
        time.sleep(poll_s)


def run_npz(args, env, model, tokenizer, meta, bf16, log):
    """The 50K-style run: shards of `--shard_size` samples by global index, the missing ones split over
    ranks, then concatenated by rank 0 into `<out>/samples.npz`. Returns its path."""
    N, S = args.num_samples, args.shard_size
    final, settings_path = os.path.join(args.out, "samples.npz"), os.path.join(args.out, "settings.json")
    shard_dir = os.path.join(args.out, "shards")

    def shard_path(k):  # shard k holds the samples [k S, (k + 1) S)
        return os.path.join(shard_dir, f"shard_{k:06d}.npz")

    # Everything that changes the images; a resumed run must match it, or shards would mix settings.
    settings = dict(ckpt=os.path.abspath(args.ckpt), step=meta.get("step"),
                    weights="raw" if args.raw_weights else "ema",
                    tokenizer=os.path.abspath(meta["tokenizer"]), cfg=args.cfg, cfg_channels=args.cfg_channels,
                    cfg_interval_start=args.cfg_interval_start, steps=args.steps, shift=args.shift,
                    solver=args.solver, seed=args.seed, classes=args.classes, num_samples=N, shard_size=S,
                    precision="bf16" if bf16 else "fp32")
    settings = json.loads(json.dumps(settings))  # as it reads back from the file
    if env.is_main:
        os.makedirs(shard_dir, exist_ok=True)
        if os.path.exists(settings_path):
            with open(settings_path) as f:
                old = json.load(f)
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            if diff:
                raise ValueError(f"{args.out} holds samples made with other settings (was, now: {diff}); "
                                 "choose another --out or delete that folder")
        else:
            with open(settings_path, "w") as f:
                json.dump(settings, f, indent=2)
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
    bar = tqdm(total=sum(min(S, N - k * S) for k in mine), unit="img", disable=not env.is_main,
               desc=f"sampling (rank 0 of {env.world_size})", dynamic_ncols=True)
    for k in mine:
        indices = list(range(k * S, min(N, (k + 1) * S)))
        labels = labels_for(indices, args.classes, args.seed, model.num_classes)
        images = generate(model, tokenizer, meta["latent_stats"], indices, labels, args, env.device, bf16, bar)
        save_npz(shard_path(k), arr_0=images, arr_1=labels.numpy())
    bar.close()

    if not env.is_main:
        wait_for([final])
        return final
    paths = [shard_path(k) for k in range(num_shards)]
    wait_for(paths)
    images, labels = None, np.empty(N, dtype=np.int64)
    for k, p in enumerate(paths):
        with np.load(p) as shard:
            if images is None:  # (N, H, W, 3), filled shard by shard (50K x 256 px = 9.8 GB)
                images = np.empty((N, *shard["arr_0"].shape[1:]), dtype=np.uint8)
            images[k * S: (k + 1) * S], labels[k * S: (k + 1) * S] = shard["arr_0"], shard["arr_1"]
    save_npz(final, arr_0=images, arr_1=labels)
    if not args.keep_shards:
        for p in paths:
            os.remove(p)
        if not os.listdir(shard_dir):
            os.rmdir(shard_dir)
    return final


def run_grid(args, model, tokenizer, meta, device, bf16):
    """A PNG grid of `--num_samples` samples (default: one per `--classes` entry, or 16 random)."""
    indices = list(range(args.num_samples))
    labels = labels_for(indices, args.classes, args.seed, model.num_classes)
    images = generate(model, tokenizer, meta["latent_stats"], indices, labels, args, device, bf16)
    solver = "" if args.solver == "euler" else f"_{args.solver}"
    path = os.path.join(args.out, f"grid_cfg{args.cfg:g}_steps{args.steps}{solver}.png")
    save_grid(torch.from_numpy(images).permute(0, 3, 1, 2), path)
    return path


# ----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="runs/dit/ckpt.pt", help="LightningDiT checkpoint from train_dit.py")
    p.add_argument("--tokenizer", help="tokenizer.pt to decode with (default: the one named in the checkpoint)")
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale w; 1 = no guidance")
    p.add_argument("--steps", type=int, default=250, help="time points from 0 to 1 (N-1 Euler evaluations)")
    p.add_argument("--shift", type=float, default=0.3, help="time shift s; 1 = uniform grid")
    p.add_argument("--solver", default="euler", choices=sorted(SOLVERS))
    p.add_argument("--cfg_channels", type=int, default=None,
                   help="guide only the first K latent channels (LightningDiT: 3; default: all)")
    p.add_argument("--cfg_interval_start", type=float, default=0.0,
                   help="no guidance for t below this (LightningDiT: 0.10, or 0.125 at 800 epochs)")
    p.add_argument("--classes", default=None,
                   help="comma-separated class ids, e.g. 207,360,387 (cycled); default: random per sample")
    p.add_argument("--num_samples", type=int, default=None,
                   help="default: len(--classes) or 16 for a grid, 50000 with --npz")
    p.add_argument("--batch_size", type=int, default=64, help="samples per forward pass per rank")
    p.add_argument("--seed", type=int, default=0, help="sample i uses a generator seeded from (seed, i)")
    p.add_argument("--out", default=None, help="output folder (default: samples/ beside the checkpoint)")
    p.add_argument("--npz", action="store_true", help="write an ADM .npz for FID (the 50K mode)")
    p.add_argument("--shard_size", type=int, default=1000, help="--npz: samples per resumable shard")
    p.add_argument("--keep_shards", action="store_true", help="--npz: keep the shards after concatenation")
    p.add_argument("--raw_weights", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="DiT precision (auto: bf16 autocast on CUDA, fp32 on CPU); decoding is fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT")
    args = p.parse_args(argv)

    # Checks that need no model come first, so a typo fails at once.
    time_grid(args.steps, args.shift)
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    for name in ("batch_size", "shard_size", "num_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.classes is not None:
        try:
            args.classes = [int(c) for c in args.classes.split(",") if c.strip()]
        except ValueError:
            raise ValueError(f"--classes must be comma-separated integers, got {args.classes!r}") from None
    if args.num_samples is None:
        args.num_samples = 50_000 if args.npz else (len(args.classes) if args.classes else 16)
    if args.out is None:
        args.out = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "samples")
        if args.npz:  # one folder per setting, so that runs with other settings never meet
            tag = f"cfg{args.cfg:g}_steps{args.steps}_{args.solver}_seed{args.seed}_n{args.num_samples}"
            tag += f"_k{args.cfg_channels}" if args.cfg_channels else ""
            tag += f"_from{args.cfg_interval_start:g}" if args.cfg_interval_start else ""
            tag += f"_shift{args.shift:g}" if args.shift != 0.3 else ""
            args.out = os.path.join(args.out, tag)
    return args


def main(argv=None):
    args = parse_args(argv)
    env = setup_distributed(args.device)
    log = Logger(env).info
    model, tokenizer, meta = load_models(args.ckpt, args.tokenizer, ema=not args.raw_weights)
    bad = [c for c in args.classes or [] if not 0 <= c < model.num_classes]
    if bad:
        raise ValueError(f"unknown class id(s) {bad}: this model has {model.num_classes} classes "
                         f"(0..{model.num_classes - 1})")
    if args.cfg_channels is not None and not 1 <= args.cfg_channels <= model.in_channels:
        raise ValueError(f"--cfg_channels must be between 1 and {model.in_channels}, got {args.cfg_channels}")
    bf16 = use_bf16(args.precision, env.device)
    model.to(env.device)
    tokenizer.decoder.to(env.device)  # decoding needs only the decoder; the encoder stays on the CPU
    if args.compile:
        model.compile()  # in place; on the CPU too (slow to compile, but the same code path)
    log(f"LightningDiT {meta.get('model_name')} step {meta.get('step')} ({'raw' if args.raw_weights else 'EMA'} "
        f"weights), tokenizer {meta['tokenizer']}; cfg {args.cfg:g} (channels {args.cfg_channels or 'all'}, "
        f"from t={args.cfg_interval_start:g}), {args.solver} {args.steps} steps, shift {args.shift:g}, "
        f"{'bf16' if bf16 else 'fp32'} on {env.device}")

    if args.npz:
        path = run_npz(args, env, model, tokenizer, meta, bf16, log)
        log(f"{args.num_samples} samples in {path} (arr_0: images NHWC uint8, arr_1: labels)")
    else:
        path = run_grid(args, model, tokenizer, meta, env.device, bf16) if env.is_main else None
        if path:
            print(path)
    cleanup_distributed()
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
