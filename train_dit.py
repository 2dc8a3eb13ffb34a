"""Train a LightningDiT on the aligned tokenizer's latents with flow matching (dit.py: model and
loss). Two steps, both under `torchrun` or plain `python`:

    # 1. encode the training set once (each image and its horizontal flip) with a trained tokenizer
    torchrun --nproc_per_node=8 train_dit.py --extract --data /imagenet/train --latents runs/latents
    # 2. train on those latents (XL/1, global batch 1024, AdamW 2e-4, EMA 0.9999, bf16)
    torchrun --nproc_per_node=8 train_dit.py --latents runs/latents --run_dir runs/dit --steps 80000

Pre-extracting costs one pass of the encoder instead of one per epoch, and the decoder can still be
refined afterwards (stage 3): the latent space no longer changes. Latents are normalised per channel
with the mean/std of ~10K of them (kept with the latents and in every checkpoint, for sampling).
"""

import argparse
import os

import numpy as np
import torch
from tqdm import tqdm

import dit
from baselines import load_tokenizer
from common import (EMA, HelpFormatter, Logger, Run, UserError, at_least, autocast,
                    cleanup_distributed, due, forward_flops, gradient_sync, in_range, load_json,
                    micro_batches, parallelize, same_on_every_rank, save_json, script_main,
                    setup_distributed, use_bf16)
from data import Batches, build_dataset, count_skipped, eval_loader, save_grid, to_model_range
from sample import decode_to_uint8, sample_latents
from tokenizer import latent_fingerprint


class LatentDataset(torch.utils.data.Dataset):
    """<folder>/latents.npy (2N, C, h, w) float16 (row 2i: image i, 2i+1 its flip), labels.npy
    (2N,) and meta.json (written last: a complete set), memory-mapped (ImageNet's take 42 GB)."""

    def __init__(self, folder: str):
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.isfile(meta_path):
            hint = (" (latents.npy is there: the extraction did not finish, run --extract again)"
                    if os.path.exists(os.path.join(folder, "latents.npy")) else "")
            raise UserError(f"no extracted latents in {folder!r}{hint}: run `train_dit.py "
                            "--extract --tokenizer ... --data ... --latents DIR` first")
        self.meta = load_json(meta_path, "latent metadata")
        if self.meta["num_latents"] == 0:
            raise UserError(f"{folder!r} holds no latents")
        self.folder = folder
        self._open()  # here too: a damaged file is a message, not a DataLoader worker's traceback
        latents, labels = self._latents, self._labels
        shape = (len(self), *self.meta["latent_shape"])
        if latents.dtype.kind != "f" or latents.shape != shape or labels.shape != shape[:1]:
            raise UserError(f"{folder!r} holds latents {latents.dtype} {latents.shape} and labels "
                            f"{labels.shape}, but its meta.json says float {shape}: run --extract "
                            "again")
        self._latents = self._labels = None  # opened in each worker: memory maps are not pickled

    def _open(self):
        try:
            self._latents = np.load(os.path.join(self.folder, "latents.npy"), mmap_mode="r")
            self._labels = np.load(os.path.join(self.folder, "labels.npy"), mmap_mode="r")
        except (OSError, ValueError) as e:  # missing, damaged, or Python objects (no memory map)
            why = "Python objects, not numbers" if "object" in str(e) else str(e).split(". ")[0]
            raise UserError(f"could not read the latents in {self.folder!r} ({why}): run --extract "
                            "again") from None

    def __len__(self):
        return self.meta["num_latents"]

    def __getitem__(self, i):
        if self._latents is None:  # np.memmap would be copied whole if it were pickled to workers
            self._open()
        return torch.from_numpy(np.array(self._latents[i])), int(self._labels[i])


@torch.no_grad()
def extract_latents(args, env):
    """Encode every training image and its mirror image; then per-channel statistics."""
    log = Logger(env)
    tok = load_tokenizer(args.tokenizer, args.image_size)
    fingerprint = latent_fingerprint(tok)
    tok.to(env.device)
    if tok.random_encoder:
        log.info(f"WARNING: {args.tokenizer} grew from a RANDOM encoder (demo/tests only)")
    dataset = build_dataset(args.data, tok.config["image_size"], demo_images=args.demo_images)
    if not dataset.num_classes:
        raise UserError(f"{args.data!r} has no class subfolders: the class-conditional DiT needs "
                        "labels (one subfolder per class, as in ImageNet's train/)")
    n, shape = len(dataset), tok.latent_shape
    os.makedirs(args.latents, exist_ok=True)
    paths = {k: os.path.join(args.latents, f"{k}.npy") for k in ("latents", "labels")}
    meta_path = os.path.join(args.latents, "meta.json")
    if env.is_main:
        if os.path.exists(meta_path):
            os.remove(meta_path)  # the set is incomplete until we write it again
        np.lib.format.open_memmap(paths["latents"], mode="w+", dtype=np.float16,
                                  shape=(2 * n, *shape))
        np.lib.format.open_memmap(paths["labels"], mode="w+", dtype=np.int64, shape=(2 * n,))
    env.barrier()
    latents, labels = (np.load(paths[k], mmap_mode="r+") for k in ("latents", "labels"))
    loader = eval_loader(dataset, args.batch_size, env, args.num_workers)
    mine, done = np.arange(env.rank, n, env.world_size), 0  # this rank: images rank::world
    for images, y in tqdm(loader, desc="extract", disable=not env.is_main):
        x = to_model_range(images, env.device)
        with autocast(env.device, use_bf16(args.precision, env.device)):
            z = tok.encode(torch.cat([x, x.flip(-1)]))  # images and mirrors: (2B, C, h, w)
        z = torch.stack(z.chunk(2), dim=1)  # (B, 2, C, h, w): image i, then its mirror
        rows = (2 * mine[done: done + len(images)])[:, None] + np.arange(2)  # (B, 2): 2i, 2i + 1
        latents[rows.ravel()] = z.float().flatten(0, 1).cpu().numpy().astype(np.float16)
        labels[rows.ravel()] = np.repeat(y.numpy(), 2)
        done += len(images)
    latents.flush()
    labels.flush()
    env.barrier()
    skipped = count_skipped(dataset, env)
    if env.is_main:
        # Per-channel mean/std of a fixed random ~10K latents (enough for two moments).
        pick = np.sort(np.random.default_rng(0).permutation(2 * n)[: args.stats_samples])
        sample = torch.from_numpy(latents[pick].astype(np.float64))  # (K, C, h, w)
        tokenizer = (os.path.abspath(args.tokenizer) if os.path.exists(args.tokenizer)
                     else args.tokenizer)
        meta = {"num_latents": 2 * n, "latent_shape": list(shape),
                "num_classes": dataset.num_classes, "classes": dataset.classes,
                "tokenizer_config": tok.config, "tokenizer_fingerprint": fingerprint,
                "tokenizer": tokenizer, "data": args.data or "demo",
                "mean": sample.mean(dim=(0, 2, 3)).tolist(),
                "std": sample.std(dim=(0, 2, 3)).tolist()}
        save_json(meta, meta_path)
        log.info(f"{2 * n} latents of shape {tuple(shape)} ({n} images and their flips) -> "
                 f"{args.latents}")
        if skipped:
            log.info(f"{skipped} unreadable image files were skipped (see the warnings above)")
    env.barrier()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = p.add_argument
    add("--latents", default="runs/latents", help="folder of extracted latents")
    add("--run_dir", default="runs/dit", help="where ckpt.pt, log.jsonl and sample grids go")
    add("--resume", action="store_true", help="continue from <run_dir>/ckpt.pt")
    add("--extract", action="store_true", help="encode --data with --tokenizer into --latents")
    add("--tokenizer", default="runs/tokenizer/stage2/tokenizer.pt", help="ours, or a baseline's")
    add("--image_size", type=at_least(8), help="a baseline tokenizer's (default 256)")
    add("--data", help="image folder with class subfolders (default: the built-in demo set)")
    add("--demo_images", type=at_least(1), default=512, help="size of the built-in demo set")
    add("--stats_samples", type=at_least(2), default=10_000, help="latents for the mean/std")
    add("--model", default="XL/1", choices=sorted(dit.DiT_models), help="size/patch")
    add("--qknorm", action="store_true", help="QK-norm (long runs: avoids NaN loss spikes)")
    for flag in ("--hidden_size", "--depth", "--num_heads"):
        add(flag, type=at_least(1), help="override the named size's (small demos)")
    add("--grad_checkpointing", action="store_true", help="recompute blocks in backward")
    # LightningDiT's recipe (constant lr, no weight decay)
    add("--steps", type=at_least(1), default=80_000, help="80K at batch 1024 = 64 epochs")
    add("--batch_size", type=at_least(1), default=1024, help="global (split over the ranks)")
    add("--micro_batch", type=at_least(1), help="samples per forward on a rank (accumulation)")
    add("--lr", type=in_range(0, lo_open=True), default=2e-4, help="AdamW learning rate")
    add("--betas", type=in_range(0, 1, hi_open=True), nargs=2, default=(0.9, 0.95), help="AdamW")
    add("--weight_decay", type=in_range(0), default=0.0, help="AdamW weight decay")
    add("--grad_clip", type=in_range(0), default=0.0, help="max gradient norm (0: off)")
    add("--ema_decay", type=in_range(0, 1, hi_open=True), default=0.9999, help="of the weights")
    add("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto: CUDA if present")
    add("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="auto: bf16 on CUDA")
    add("--compile", default="auto", choices=("auto", "on", "off"), help="auto: on CUDA")
    add("--num_workers", type=at_least(0), default=4, help="data loading processes per rank")
    add("--seed", type=at_least(0), default=0, help="seeds weights, noise and data order")
    add("--log_every", type=at_least(1), default=100, help="steps between log lines")
    add("--ckpt_every", type=at_least(1), default=5000, help="steps between checkpoints")
    add("--keep_every", type=at_least(0), default=0, help="also keep ckpt_<step> (0: never)")
    add("--grid_every", type=at_least(0), default=5000, help="steps between sample grids (0: off)")
    add("--grid_cfg", type=in_range(0), default=1.0, help="CFG scale of the sample grids")
    return p.parse_args(argv)


def train(args, env):
    dataset = LatentDataset(args.latents)  # first: a missing latent folder fails before any write
    torch.manual_seed(args.seed + env.rank)  # each rank its own noise and timesteps
    device, bf16 = env.device, use_bf16(args.precision, env.device)
    micro, accum = micro_batches(args, env)  # samples per forward, forwards per step
    stats = {k: torch.tensor(dataset.meta[k], dtype=torch.float32) for k in ("mean", "std")}
    mean, std = (stats[k].to(device).view(1, -1, 1, 1) for k in ("mean", "std"))
    channels, size, _ = dataset.meta["latent_shape"]  # the latents give the model's shape
    kwargs = dict(input_size=size, in_channels=channels, num_classes=dataset.meta["num_classes"],
                  use_qknorm=args.qknorm)
    kwargs.update({k: getattr(args, k) for k in ("hidden_size", "depth", "num_heads")
                   if getattr(args, k) is not None})
    with same_on_every_rank(args.seed):  # on the CPU
        model = dit.build_dit(args.model, grad_checkpointing=args.grad_checkpointing, **kwargs)
    ema = EMA(model, args.ema_decay)
    train_model = parallelize(model, ema, env, args)  # DDP
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas),
                            weight_decay=args.weight_decay, fused=True)
    batches = Batches(dataset, micro, env, seed=args.seed, num_workers=args.num_workers)
    meta = {k: dataset.meta.get(k) for k in ("tokenizer", "tokenizer_config",
                                             "tokenizer_fingerprint", "classes")}
    grid_tok = None  # the sample grids' decoder, built before a resume restores the RNG
    if args.grid_every:
        try:
            grid_tok = load_tokenizer(meta["tokenizer"], meta["tokenizer_config"]["image_size"])
        except UserError as e:  # the training goes on without grids
            Logger(env).info(f"no sample grids: {e}")
        for module in grid_tok.decoding_modules() if grid_tok else ():
            module.to(env.device)
    with Run(env, args, args.run_dir, meta={"latent_stats": stats, **meta},
             identity={"kind": "dit", "model_name": args.model, "model_args": kwargs},
             state={"model": model, "ema": ema, "opt": opt, "data": batches},
             flops_per_image=3 * forward_flops(model, model.num_patches),  # forward + backward
             nan_advice="Resume with --resume and a lower --lr or --grad_clip 1.0; long runs "
                        "should use --qknorm (LightningDiT without it is known to spike).") as run:
        params = sum(p.numel() for p in model.parameters())
        run.logger.info(f"LightningDiT-{args.model} {kwargs}: {params / 1e6:.1f}M parameters; "
                        f"{len(dataset)} latents; batch {args.batch_size} = {env.world_size} ranks "
                        f"x {accum} x {micro}")
        data = iter(batches)
        for step in range(run.resume() if args.resume else 0, args.steps):
            losses = 0
            for i in range(accum):  # micro-batches; the gradients are reduced on the last
                z, y = (t.to(device, non_blocking=True) for t in next(data))
                x1 = (z.float() - mean) / std  # normalised latents (B, C, h, w)
                with gradient_sync(train_model, i == accum - 1):
                    with autocast(device, bf16):
                        loss, parts = dit.flow_matching_loss(train_model, x1, y)
                    (loss / accum).backward()  # outside autocast, as PyTorch recommends
                losses = losses + torch.stack([loss.detach(), parts["mse"], parts["cos"]]) / accum
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(model)
            done = step + 1
            run.record(done, **dict(zip(("loss", "mse", "cos"), losses)))
            if due(args.log_every, done, args.steps):
                epoch = done * args.batch_size / (len(dataset) / 2)  # 2 latents per image
                run.log(done, lr=opt.param_groups[0]["lr"], epoch=epoch)
            if env.is_main and grid_tok and due(args.grid_every, done, args.steps):
                save_sample_grid(ema.model, grid_tok, dataset.meta, stats, args, done, run.logger,
                                 bf16)
            stop = run.stop_requested(done)
            if due(args.ckpt_every, done, args.steps) or stop:
                run.save(done)
            if stop:
                break
    return run


@torch.no_grad()
def save_sample_grid(model, tokenizer, meta, stats, args, step, logger, bf16):
    """16 EMA samples of fixed noise and classes, 30 steps, decoded by the tokenizer."""
    device = next(model.parameters()).device
    labels = (torch.arange(16) % meta["num_classes"]).to(device)
    noise = torch.randn(16, *meta["latent_shape"], generator=torch.Generator().manual_seed(0))
    with autocast(device, bf16):
        z = sample_latents(model, labels, noise.to(device), steps=30, cfg_scale=args.grid_cfg)
    path = os.path.join(args.run_dir, f"samples_{step:07d}.png")
    save_grid(decode_to_uint8(tokenizer, z, stats), path, nrow=8)  # decoded in float32
    logger.info(f"EMA samples (30 steps, cfg {args.grid_cfg}) -> {path}")


def main(argv=None):
    args = parse_args(argv)
    env = setup_distributed(args.device)
    result = extract_latents(args, env) if args.extract else train(args, env)
    cleanup_distributed()
    return result


if __name__ == "__main__":
    script_main(main)
