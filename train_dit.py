"""Train a LightningDiT on the aligned tokenizer's latents with flow matching (SPEC section 2).

Two steps, both under `torchrun` or plain `python`:

    # 1. encode the training set once (each image and its horizontal flip) with a trained tokenizer
    torchrun --nproc_per_node=8 train_dit.py --extract --tokenizer runs/tokenizer/stage2/tokenizer.pt \
        --data /imagenet/train --latents runs/latents
    # 2. train on those latents (XL/1, global batch 1024, AdamW 2e-4, EMA 0.9999, bf16)
    torchrun --nproc_per_node=8 train_dit.py --latents runs/latents --run_dir runs/dit --steps 80000

Pre-extracting makes the diffusion training independent of the tokenizer: one pass of the encoder
instead of one per epoch, and the tokenizer's decoder can still be refined afterwards (stage 3),
because the latent space no longer changes. Latents are normalised per channel with the mean/std of
~10K of them (stored with the latents and in every checkpoint, so sampling can undo it).
"""

import argparse
import contextlib
import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm

import dit
from common import (EMA, Logger, NonFiniteGuard, StopSignal, autocast, cleanup_distributed, fmt_metrics,
                    load_checkpoint, load_training_state, peak_bf16_flops, save_checkpoint, seed_everything,
                    setup_distributed, training_state, use_bf16, wrap_ddp)
from data import Batches, build_dataset, count_skipped, eval_loader, save_grid, to_model_range

# ----------------------------------------------------------------------------------------------------
# Latents on disk: <folder>/latents.npy (2N, C, h, w) float16, labels.npy (2N,), meta.json.
# Row 2i is image i, row 2i+1 its horizontal flip. meta.json is written last: it marks a complete set.


class LatentDataset(torch.utils.data.Dataset):
    """Pre-extracted latents, memory-mapped (ImageNet's 2.5M latents take 42 GB as float16)."""

    def __init__(self, folder: str):
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.isfile(meta_path):
            hint = (" (latents.npy is there: the extraction did not finish, run --extract again)"
                    if os.path.exists(os.path.join(folder, "latents.npy")) else "")
            raise FileNotFoundError(f"no extracted latents in {folder!r}{hint}: run "
                                    "`train_dit.py --extract --tokenizer ... --data ... --latents DIR` first")
        with open(meta_path) as f:
            self.meta = json.load(f)
        if self.meta["num_latents"] == 0:
            raise ValueError(f"{folder!r} holds no latents")
        self.folder = folder
        self._latents = self._labels = None  # opened lazily, once per DataLoader worker

    def __len__(self):
        return self.meta["num_latents"]

    def __getitem__(self, i):
        if self._latents is None:  # np.memmap would be copied whole if it were pickled to workers
            self._latents = np.load(os.path.join(self.folder, "latents.npy"), mmap_mode="r")
            self._labels = np.load(os.path.join(self.folder, "labels.npy"), mmap_mode="r")
        return torch.from_numpy(np.array(self._latents[i])), int(self._labels[i])

    def latent_stats(self) -> dict:
        return {k: torch.tensor(self.meta[k], dtype=torch.float32) for k in ("mean", "std")}


@torch.no_grad()
def extract_latents(args, env):
    """Encode every training image and its mirror image; then per-channel statistics."""
    from tokenizer import load_tokenizer

    log = Logger(env)
    tok = load_tokenizer(args.tokenizer).to(env.device)
    if tok.random_encoder:
        log.info(f"WARNING: {args.tokenizer} grew from a RANDOM encoder (demo/tests only)")
    bf16 = use_bf16(args.precision, env.device)
    dataset = build_dataset(args.data, tok.config["image_size"], demo_images=args.demo_images)
    if not dataset.num_classes:
        raise ValueError(f"{args.data!r} has no class subfolders: the class-conditional DiT needs labels "
                         "(one subfolder per class, as in ImageNet's train/)")
    n, shape = len(dataset), tok.latent_shape
    os.makedirs(args.latents, exist_ok=True)
    paths = {k: os.path.join(args.latents, f"{k}.npy") for k in ("latents", "labels")}
    meta_path = os.path.join(args.latents, "meta.json")
    if env.is_main:
        if os.path.exists(meta_path):
            os.remove(meta_path)  # the set is incomplete until we write it again
        np.lib.format.open_memmap(paths["latents"], mode="w+", dtype=np.float16, shape=(2 * n, *shape))
        np.lib.format.open_memmap(paths["labels"], mode="w+", dtype=np.int64, shape=(2 * n,))
    env.barrier()
    latents = np.load(paths["latents"], mmap_mode="r+")
    labels = np.load(paths["labels"], mmap_mode="r+")
    loader = eval_loader(dataset, args.batch_size, env, args.num_workers)  # this rank: images rank::world
    mine = np.arange(env.rank, n, env.world_size)
    done = 0
    for images, y in tqdm(loader, desc="extract", disable=not env.is_main):
        x = to_model_range(images, env.device)
        with autocast(env.device, bf16):
            z = tok.encode(torch.cat([x, x.flip(-1)]))  # one pass over images and mirrors: (2B, C, h, w)
        z = torch.stack(z.chunk(2), dim=1)  # (B, 2, C, h, w): image i, then its mirror
        rows = (2 * mine[done: done + len(images)])[:, None] + np.arange(2)  # (B, 2): 2i, 2i + 1
        latents[rows.ravel()] = z.float().flatten(0, 1).cpu().numpy().astype(np.float16)
        labels[rows.ravel()] = np.repeat(y.numpy(), 2)
        done += len(images)
    latents.flush()
    labels.flush()
    del latents, labels
    env.barrier()
    skipped = count_skipped(dataset, env)
    if env.is_main:
        # Per-channel mean/std of a fixed random ~10K latents (enough for two moments per channel).
        all_latents = np.load(paths["latents"], mmap_mode="r")
        pick = np.sort(np.random.default_rng(0).permutation(2 * n)[: args.stats_samples])
        sample = torch.from_numpy(all_latents[pick].astype(np.float64))  # (K, C, h, w)
        meta = {"num_latents": 2 * n, "latent_shape": list(shape), "num_classes": dataset.num_classes,
                "classes": dataset.classes, "tokenizer": os.path.abspath(args.tokenizer),
                "tokenizer_config": tok.config, "data": args.data or "demo",
                "mean": sample.mean(dim=(0, 2, 3)).tolist(), "std": sample.std(dim=(0, 2, 3)).tolist()}
        tmp = meta_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, meta_path)
        log.info(f"{2 * n} latents of shape {tuple(shape)} ({n} images and their flips) -> {args.latents}")
        if skipped:
            log.info(f"{skipped} unreadable image files were skipped (see the warnings above)")
    env.barrier()


# ----------------------------------------------------------------------------------------------------
# Training


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latents", default="runs/latents", help="folder of extracted latents")
    p.add_argument("--run_dir", default="runs/dit")
    p.add_argument("--resume", action="store_true", help="continue from <run_dir>/ckpt.pt")
    g = p.add_argument_group("latent extraction (--extract)")
    g.add_argument("--extract", action="store_true", help="encode --data with --tokenizer into --latents, then stop")
    g.add_argument("--tokenizer", default="runs/tokenizer/stage2/tokenizer.pt")
    g.add_argument("--data", default=None, help="image folder with class subfolders; default: built-in demo set")
    g.add_argument("--demo_images", type=int, default=512)
    g.add_argument("--stats_samples", type=int, default=10_000, help="latents used for the mean/std")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="XL/1", choices=sorted(dit.DiT_models))
    g.add_argument("--qknorm", action="store_true", help="QK-norm (use it for long runs: avoids NaN loss spikes)")
    g.add_argument("--hidden_size", type=int, default=None, help="override the named size (small demos)")
    g.add_argument("--depth", type=int, default=None)
    g.add_argument("--num_heads", type=int, default=None)
    g.add_argument("--grad_checkpointing", action="store_true", help="recompute blocks in backward (less memory)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=80_000, help="80K steps at batch 1024 = 64 ImageNet epochs")
    g.add_argument("--batch_size", type=int, default=1024, help="global batch size")
    g.add_argument("--micro_batch", type=int, default=None,
                   help="per-rank batch per forward; smaller than batch_size/world means gradient accumulation")
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--ema_decay", type=float, default=0.9999)
    g.add_argument("--grad_clip", type=float, default=0.0, help="max gradient norm (0: no clipping)")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    g.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="auto: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--num_workers", type=int, default=4)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("logging")
    g.add_argument("--log_every", type=int, default=100)
    g.add_argument("--ckpt_every", type=int, default=5000)
    g.add_argument("--keep_every", type=int, default=0, help="also keep ckpt_<step>.pt every N steps (0: never)")
    g.add_argument("--grid_every", type=int, default=5000, help="sample grid PNG interval (0: never)")
    g.add_argument("--grid_cfg", type=float, default=1.0, help="CFG scale of the sample grid")
    return p.parse_args(argv)


def model_args(args, dataset: LatentDataset) -> dict:
    """build_dit(args.model, **model_args): the latent shape and class count come from the latents."""
    channels, size, _ = dataset.meta["latent_shape"]
    kw = dict(input_size=size, in_channels=channels, num_classes=dataset.meta["num_classes"],
              use_qknorm=args.qknorm)
    kw.update({k: getattr(args, k) for k in ("hidden_size", "depth", "num_heads") if getattr(args, k) is not None})
    return kw


def train(args, env):
    dataset = LatentDataset(args.latents)  # first: a missing latent folder fails before anything is written
    os.makedirs(args.run_dir, exist_ok=True)
    log = Logger(env, args.run_dir if env.is_main else None)
    seed_everything(args.seed, env.rank)
    device, bf16 = env.device, use_bf16(args.precision, env.device)
    if args.batch_size % env.world_size:
        raise ValueError(f"--batch_size {args.batch_size} is not divisible by the {env.world_size} ranks")
    per_rank = args.batch_size // env.world_size
    micro = args.micro_batch or per_rank
    if per_rank % micro:
        raise ValueError(f"--micro_batch {micro} must divide the per-rank batch {per_rank}")
    accum = per_rank // micro  # gradient accumulation steps per optimiser step

    stats = dataset.latent_stats()
    mean, std = (stats[k].to(device).view(1, -1, 1, 1) for k in ("mean", "std"))
    kwargs = model_args(args, dataset)
    model = dit.build_dit(args.model, grad_checkpointing=args.grad_checkpointing, **kwargs).to(device)
    ema = EMA(model, args.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas),
                            weight_decay=args.weight_decay, fused=True)
    batches = Batches(dataset, micro, env, seed=args.seed, num_workers=args.num_workers)
    log.log({"event": "start", "args": vars(args), "model_args": kwargs})
    flops = dit.training_flops_per_image(model)
    peak = peak_bf16_flops(device) if bf16 else None
    log.info(f"LightningDiT-{args.model} {kwargs}: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.1f}M "
             f"parameters, {flops / 3e9:.1f} GFLOPs/image forward; {len(dataset)} latents; global batch "
             f"{args.batch_size} = {env.world_size} ranks x {accum} x {micro}")

    # Built before a resume restores the RNG: building the tokenizer draws random initial weights.
    grid = SampleGrid(args, dataset, device, bf16, log) if env.is_main and args.grid_every else None
    ckpt_path = os.path.join(args.run_dir, "ckpt.pt")
    stateful = {"model": model, "ema": ema, "opt": opt, "data": batches}  # what a checkpoint restores
    start_step = 0
    if not args.resume and os.path.exists(ckpt_path):
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or use another --run_dir")
    if args.resume:
        ckpt = load_checkpoint(ckpt_path, "training checkpoint to resume")
        if ckpt.get("kind") != "dit":
            raise ValueError(f"{ckpt_path} is not a LightningDiT checkpoint")
        if (ckpt["model_name"], ckpt["model_args"]) != (args.model, kwargs):
            raise ValueError(f"{ckpt_path} holds LightningDiT-{ckpt['model_name']} {ckpt['model_args']}, but this run "
                             f"asks for LightningDiT-{args.model} {kwargs} (different --model/--qknorm flags or "
                             "latents from another tokenizer?)")
        start_step = load_training_state(ckpt, stateful, env)
        log.info(f"resumed at step {start_step} from {ckpt_path}")

    train_model = wrap_ddp(model, env)
    if args.compile:  # compile the DDP module, so that gradient all-reduces still overlap the backward
        train_model = torch.compile(train_model)

    def save(step, path=ckpt_path):
        state = training_state(stateful, env)  # a collective: every rank takes part
        if env.is_main:  # + what sampling needs: the latent statistics and the tokenizer
            save_checkpoint({"kind": "dit", "step": step, "model_name": args.model, "model_args": kwargs, **state,
                             "latent_stats": stats, "tokenizer": dataset.meta["tokenizer"],
                             "tokenizer_config": dataset.meta["tokenizer_config"], "classes": dataset.meta["classes"],
                             "args": vars(args)}, path)

    stop = StopSignal()
    stopped = False
    nan_guard = NonFiniteGuard(device)
    loss_sum = torch.zeros(3, device=device)  # loss, mse, cos summed since the last log
    n_sum, t0 = 0, time.time()
    data_iter = iter(batches)
    pbar = tqdm(total=args.steps, initial=start_step, desc="train", disable=not env.is_main, dynamic_ncols=True)
    for step in range(start_step, args.steps):
        for i in range(accum):
            z, y = next(data_iter)
            x1 = (z.to(device, non_blocking=True).float() - mean) / std  # normalised latents (B, C, h, w)
            y = y.to(device, non_blocking=True)
            # Gradients are all-reduced on the last micro-batch only.
            sync = not env.distributed or i == accum - 1
            with contextlib.nullcontext() if sync else train_model.no_sync():
                with autocast(device, bf16):
                    loss, parts = dit.flow_matching_loss(train_model, x1, y)
                (loss / accum).backward()  # outside autocast, as PyTorch recommends
            loss_sum += torch.stack([loss.detach(), parts["mse"], parts["cos"]]) / accum
        nan_guard.update(loss_sum[0], step + 1)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)
        n_sum += 1
        done = step + 1
        pbar.update(1)

        is_log = done % args.log_every == 0 or done == args.steps
        is_ckpt = done % args.ckpt_every == 0 or done == args.steps
        keep = args.keep_every and done % args.keep_every == 0
        stopped = stop.should_stop(env, done)
        if is_log or is_ckpt or keep or stopped:  # never log or save past a non-finite loss
            nan_guard.check(env, ckpt_path, "Resume with --resume and a lower --lr or --grad_clip 1.0; long runs "
                            "should use --qknorm (LightningDiT without QK-norm is known to spike to NaN).")
        if is_log:
            values = (env.all_reduce_mean(loss_sum) / n_sum).tolist()
            elapsed = time.time() - t0
            img_s = n_sum * args.batch_size / elapsed
            # Each image has two latents (itself and its mirror image): an epoch is len(dataset) / 2 samples.
            record = {"step": done, "loss": values[0], "mse": values[1], "cos": values[2], "img_per_s": img_s,
                      "epoch": done * args.batch_size / (len(dataset) / 2)}
            if peak:
                record["mfu"] = img_s * flops / (peak * env.world_size)
            log.log(record)
            pbar.set_postfix_str(fmt_metrics({k: record[k] for k in ("loss", "img_per_s")}))
            loss_sum.zero_()
            n_sum, t0 = 0, time.time()
        if grid is not None and (done % args.grid_every == 0 or done == args.steps):
            grid.save(ema.model, done, args.run_dir)
        if is_ckpt or stopped:
            save(done)
        if keep:
            save(done, os.path.join(args.run_dir, f"ckpt_{done:07d}.pt"))
        if stopped:
            log.info(f"stopped at step {done}; continue with --resume")
            break
    pbar.close()
    stop.restore()
    env.barrier()


class SampleGrid:
    """A grid of EMA samples (fixed noise and classes) decoded with the tokenizer, to watch training.
    Skipped with a warning if the tokenizer file named in the latents is not available."""

    def __init__(self, args, dataset, device, bf16, log):
        from tokenizer import load_tokenizer

        self.args, self.device, self.bf16, self.log = args, device, bf16, log
        path = dataset.meta["tokenizer"]
        try:
            self.tokenizer = load_tokenizer(path)
            self.tokenizer.decoder.to(device)  # decoding needs only the decoder
        except (FileNotFoundError, RuntimeError, ValueError) as e:
            log.info(f"no sample grids: cannot load the tokenizer {path} ({e})")
            self.tokenizer = None
        self.stats = dataset.latent_stats()
        num_classes = dataset.meta["num_classes"]
        self.labels = torch.arange(16) % num_classes
        self.noise = torch.randn(16, *dataset.meta["latent_shape"], generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def save(self, model, step, run_dir):
        if self.tokenizer is None:
            return
        from sample import decode_to_uint8, sample_latents

        with autocast(self.device, self.bf16):
            z = sample_latents(model, self.labels.to(self.device), self.noise.to(self.device), steps=30,
                               cfg_scale=self.args.grid_cfg)
        images = decode_to_uint8(self.tokenizer, z.float(), self.stats)  # the decoder in float32, as sample.py
        path = os.path.join(run_dir, f"samples_{step:07d}.png")
        save_grid(images, path, nrow=8)
        self.log.info(f"EMA samples (30 steps, cfg {self.args.grid_cfg}) -> {path}")


def main(argv=None):
    args = parse_args(argv)
    env = setup_distributed(args.device)
    if args.extract:
        extract_latents(args, env)
    else:
        train(args, env)  # every DDP module lives and dies inside train()
    cleanup_distributed()


if __name__ == "__main__":
    main()
