"""Train a LightningDiT on the aligned tokenizer's latents with flow matching
(dit.py: model and loss).

Two steps, both under `torchrun` or plain `python`:

    # 1. encode the training set once (each image and its horizontal flip) with a trained tokenizer
    torchrun --nproc_per_node=8 train_dit.py --extract --data /imagenet/train --latents runs/latents
    # 2. train on those latents (XL/1, global batch 1024, AdamW 2e-4, EMA 0.9999, bf16)
    torchrun --nproc_per_node=8 train_dit.py --latents runs/latents --run_dir runs/dit --steps 80000

Pre-extracting makes the diffusion training independent of the tokenizer: one pass of the encoder
instead of one per epoch, and the tokenizer's decoder can still be refined afterwards (stage 3),
because the latent space no longer changes. Latents are normalised per channel with the mean/std of
~10K of them (stored with the latents and in every checkpoint, so sampling can undo it).

`--fsdp` shards the model, gradients, AdamW state and EMA over the ranks (as train_t2i.py does;
XL/1 fits a GPU with DDP, the default); `--export` then writes the single file sample.py loads.
"""

import argparse
import os

import numpy as np
import torch
from tqdm import tqdm

import checkpoints
import dit
import flops
from common import (EMA, HelpFormatter, Logger, UserError, add_optimisation_args,
                    add_runtime_args, at_least, autocast, cleanup_distributed, gradient_sync,
                    load_json, micro_batches, parallelize, same_on_every_rank, save_json,
                    script_main, seed_everything, setup_distributed, use_bf16)
from harness import Run
from data import Batches, build_dataset, count_skipped, eval_loader, save_grid, to_model_range
from sample import decode_to_uint8, sample_latents
from baselines import load_tokenizer
from tokenizer import latent_fingerprint

# --------------------------------------------------------------------------------------------------
# Latents on disk: <folder>/latents.npy (2N, C, h, w) float16, labels.npy (2N,), meta.json.
# Row 2i is image i, row 2i+1 its horizontal flip. meta.json, written last, marks a complete set.


class LatentDataset(torch.utils.data.Dataset):
    """Pre-extracted latents, memory-mapped (ImageNet's 2.5M latents take 42 GB as float16)."""

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
        self._latents = self._labels = None  # opened lazily, once per DataLoader worker
        self._open()  # and once here: a damaged file is a message, not a worker's traceback
        latents, labels = self._latents, self._labels
        shape = (len(self), *self.meta["latent_shape"])
        if latents.dtype.kind != "f" or latents.shape != shape or labels.shape != shape[:1]:
            raise UserError(f"{folder!r} holds latents {latents.dtype} {latents.shape} and labels "
                            f"{labels.shape}, but its meta.json says float {shape}: run --extract "
                            "again")
        self._latents = self._labels = None  # a memory map is not pickled to workers

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

    def latent_stats(self) -> dict:
        return {k: torch.tensor(self.meta[k], dtype=torch.float32) for k in ("mean", "std")}


@torch.no_grad()
def extract_latents(args, env):
    """Encode every training image and its mirror image; then per-channel statistics."""
    log = Logger(env)
    tok = load_tokenizer(args.tokenizer, args.image_size)
    fingerprint = latent_fingerprint(tok)
    tok.to(env.device)
    if tok.random_encoder:
        log.info(f"WARNING: {args.tokenizer} grew from a RANDOM encoder (demo/tests only)")
    bf16 = use_bf16(args.precision, env.device)
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
    latents = np.load(paths["latents"], mmap_mode="r+")
    labels = np.load(paths["labels"], mmap_mode="r+")
    # This rank: images rank::world.
    loader = eval_loader(dataset, args.batch_size, env, args.num_workers)
    mine = np.arange(env.rank, n, env.world_size)
    done = 0
    for images, y in tqdm(loader, desc="extract", disable=not env.is_main):
        x = to_model_range(images, env.device)
        with autocast(env.device, bf16):
            # One pass over images and mirrors: (2B, C, h, w).
            z = tok.encode(torch.cat([x, x.flip(-1)]))
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
        # Per-channel mean/std of a fixed random ~10K latents (enough for two moments).
        all_latents = np.load(paths["latents"], mmap_mode="r")
        pick = np.sort(np.random.default_rng(0).permutation(2 * n)[: args.stats_samples])
        sample = torch.from_numpy(all_latents[pick].astype(np.float64))  # (K, C, h, w)
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


# --------------------------------------------------------------------------------------------------
# Training


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--latents", default="runs/latents", help="folder of extracted latents")
    p.add_argument("--run_dir", default="runs/dit",
                   help="where ckpt.pt, log.jsonl and sample grids go")
    p.add_argument("--resume", action="store_true", help="continue from <run_dir>/ckpt.pt")
    p.add_argument("--export", action="store_true", help="only write <run_dir>/export.pt (for "
                   "sample.py) from the run's sharded --fsdp checkpoint, in one process")
    g = p.add_argument_group("latent extraction (--extract)")
    g.add_argument("--extract", action="store_true",
                   help="encode --data with --tokenizer into --latents, then stop")
    g.add_argument("--tokenizer", default="runs/tokenizer/stage2/tokenizer.pt",
                   help="tokenizer to encode with: our tokenizer.pt, a diffusers AutoencoderKL "
                        "(folder or hub name) or a VA-VAE checkpoint")
    g.add_argument("--image_size", type=at_least(8),
                   help="image size for a baseline tokenizer (default 256; ours: its own)")
    g.add_argument("--data",
                   help="image folder with class subfolders (default: the built-in demo set)")
    g.add_argument("--demo_images", type=at_least(1), default=512,
                   help="size of the built-in demo set")
    g.add_argument("--stats_samples", type=at_least(2), default=10_000,
                   help="latents used for the mean/std")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="XL/1", choices=sorted(dit.DiT_models), help="size/patch")
    g.add_argument("--qknorm", action="store_true",
                   help="QK-norm (long runs: avoids NaN loss spikes)")
    g.add_argument("--hidden_size", type=at_least(4),
                   help="override the named size's width (small demos)")
    g.add_argument("--depth", type=at_least(1), help="override the named size's depth")
    g.add_argument("--num_heads", type=at_least(1), help="override the named size's head count")
    g.add_argument("--grad_checkpointing", action="store_true",
                   help="recompute blocks in backward (less memory)")
    add_optimisation_args(p, steps=80_000, steps_help="80K steps at batch 1024 = 64 ImageNet "
                          "epochs", batch_size=1024, lr=2e-4, betas=(0.9, 0.95), ema_decay=0.9999,
                          grad_clip=0.0, micro_batch=True)
    g = add_runtime_args(p, num_workers=4, log_every=100, ckpt_every=5000, grid_every=5000,
                         grids="sample grids")
    g.add_argument("--grid_cfg", type=at_least(0.0, float), default=1.0,
                   help="CFG scale of the sample grids")
    return p.parse_args(argv)


def model_args(args, dataset: LatentDataset) -> dict:
    """build_dit(args.model, **model_args): the latent shape and class count
    come from the latents."""
    channels, size, _ = dataset.meta["latent_shape"]
    kw = dict(input_size=size, in_channels=channels, num_classes=dataset.meta["num_classes"],
              use_qknorm=args.qknorm)
    overrides = ("hidden_size", "depth", "num_heads")
    kw.update({k: getattr(args, k) for k in overrides if getattr(args, k) is not None})
    return kw


def train(args, env):
    # First: a missing latent folder fails before anything is written.
    dataset = LatentDataset(args.latents)
    seed_everything(args.seed, env.rank)
    device, bf16 = env.device, use_bf16(args.precision, env.device)
    micro, accum = micro_batches(args, env)  # samples per forward, forwards per optimiser step
    stats = dataset.latent_stats()
    mean, std = (stats[k].to(device).view(1, -1, 1, 1) for k in ("mean", "std"))
    kwargs = model_args(args, dataset)
    with same_on_every_rank(args.seed):  # on the CPU
        model = dit.build_dit(args.model, grad_checkpointing=args.grad_checkpointing, **kwargs)
    flops_per_image = flops.training_flops_per_image(model)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    ema = EMA(model, args.ema_decay)
    train_model = parallelize(model, ema, env, args)  # DDP, or FSDP: both sharded in place
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas),
                            weight_decay=args.weight_decay, fused=True)
    batches = Batches(dataset, micro, env, seed=args.seed, num_workers=args.num_workers)
    # Built before a resume restores the RNG: building the tokenizer draws random initial weights.
    grid = SampleGrid(dataset, env, bf16, args.grid_cfg) if args.grid_every else None
    meta_keys = ("tokenizer", "tokenizer_config", "tokenizer_fingerprint", "classes")
    meta = {k: dataset.meta.get(k) for k in meta_keys}
    epoch = len(dataset) / 2  # samples per epoch: each image has two latents (and its flip)
    nan_advice = ("Resume with --resume and a lower --lr or --grad_clip 1.0; long runs should "
                  "use --qknorm (LightningDiT without QK-norm is known to spike to NaN).")
    with Run(env, args, args.run_dir, meta={"latent_stats": stats, **meta},
             identity={"kind": "dit", "model_name": args.model, "model_args": kwargs},
             state={"model": model, "ema": ema, "opt": opt, "data": batches},
             batch_size=args.batch_size, show=("loss", "img_per_s"),
             flops_per_image=flops_per_image, nan_advice=nan_advice) as run:
        run.info(f"LightningDiT-{args.model} {kwargs}: {millions:.1f}M parameters"
                 + (f", sharded ({args.fsdp})" if args.fsdp else "") + f"; {len(dataset)} "
                 f"latents; batch {args.batch_size} = {env.world_size} ranks x {accum} x {micro}")
        start = run.resume() if args.resume else 0
        data = iter(batches)
        for step in range(start, args.steps):
            losses = 0
            for i in range(accum):  # micro-batches (gradient_sync: when gradients are reduced)
                z, y = (t.to(device, non_blocking=True) for t in next(data))
                x1 = (z.float() - mean) / std  # normalised (B, C, h, w)
                with gradient_sync(train_model, i == accum - 1):
                    with autocast(device, bf16):
                        loss, parts = dit.flow_matching_loss(train_model, x1, y)
                    (loss / accum).backward()  # outside autocast, as PyTorch recommends
                losses = losses + torch.stack([loss.detach(), parts["mse"], parts["cos"]]) / accum
            if args.grad_clip > 0:  # the norm of all gradients, also when FSDP shards them
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(model)
            run.record(**dict(zip(("loss", "mse", "cos"), losses)))
            done = step + 1
            if run.due(args.log_every, done):
                run.log(done, lr=opt.param_groups[0]["lr"], epoch=done * args.batch_size / epoch)
            if grid and run.due(args.grid_every, done):
                grid.save(ema.model, done, args.run_dir, run)
            stop = run.stop_requested(done)
            if run.due(args.ckpt_every, done) or stop:
                run.save(done)
            if stop:
                break
    return run


class SampleGrid:
    """16 EMA samples (fixed noise and classes) decoded by the tokenizer, to watch training.
    Skipped, with a message, if the tokenizer named in the latents cannot be loaded. Drawn by every
    rank (the sharded model's forward is a collective; under DDP the others would wait for rank 0
    anyway), written by rank 0."""

    def __init__(self, dataset, env, bf16, cfg_scale):
        self.device, self.bf16, self.cfg_scale = env.device, bf16, cfg_scale
        self.stats = dataset.latent_stats()
        try:
            image_size = dataset.meta["tokenizer_config"]["image_size"]
            self.tokenizer = load_tokenizer(dataset.meta["tokenizer"], image_size)
            for module in self.tokenizer.decoding_modules():
                module.to(env.device)
        except UserError as e:
            Logger(env).info(f"no sample grids: {e}")
            self.tokenizer = None
        self.labels = torch.arange(16) % dataset.meta["num_classes"]
        generator = torch.Generator().manual_seed(0)
        self.noise = torch.randn(16, *dataset.meta["latent_shape"], generator=generator)

    @torch.no_grad()
    def save(self, model, step, run_dir, run):
        if self.tokenizer is None:
            return
        with autocast(self.device, self.bf16):
            z = sample_latents(model, self.labels.to(self.device), self.noise.to(self.device),
                               steps=30, cfg_scale=self.cfg_scale)
        path = os.path.join(run_dir, f"samples_{step:07d}.png")
        if run.env.is_main:  # decoded in float32
            save_grid(decode_to_uint8(self.tokenizer, z, self.stats), path, nrow=8)
        run.info(f"EMA samples (30 steps, cfg {self.cfg_scale}) -> {path}")


def main(argv=None):
    args = parse_args(argv)
    if args.export:
        return checkpoints.export_run(args.run_dir)
    env = setup_distributed(args.device)
    # DDP lives and dies inside either.
    result = extract_latents(args, env) if args.extract else train(args, env)
    cleanup_distributed()
    return result


if __name__ == "__main__":
    script_main(main)
