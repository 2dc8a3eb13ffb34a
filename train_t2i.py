r"""Train the text-to-image model (t2i.TextToImageDiT) on image-caption data: the paper's LAION
experiment, with the aligned tokenizer (or a baseline such as the FLUX VAE, for the comparison) and
a frozen text encoder (text.py).

    torchrun --nproc_per_node=8 train_t2i.py --captions /data/laion/shards \
        --tokenizer runs/tokenizer_laion/stage2/tokenizer.pt --model T2I-2B/1 --run_dir runs/t2i

Images stream from a caption folder or WebDataset shards in aspect-ratio buckets (captions.py); each
step encodes them with the frozen tokenizer and the captions with the frozen text encoder, 10% of
the captions replaced by the empty caption (which guidance compares against), then one
flow-matching step (dit.flow_matching_loss), with the bookkeeping of the other trainers
(harness.Run). Latents are normalised per channel with statistics of the first --stats_samples
images, kept in every checkpoint.

The 2B model with float32 AdamW state and an EMA needs about 40 GB per GPU under DDP (the default)
before activations. `--fsdp` shards all of it over the ranks (common.parallelize; README: memory
table and the multi-node command), and `--micro_batch` accumulates gradients, so that the paper's
global batch fits any number of GPUs:

    torchrun --nproc_per_node=8 train_t2i.py --fsdp --micro_batch 16 ...   # then, to sample from:
    python train_t2i.py --export --run_dir runs/t2i   # runs/t2i/export.pt (also made at the end)
"""

import argparse
import os

import torch

import checkpoints
import dit
import flops
from captions import CaptionBatches, CaptionStream, buckets
from common import (EMA, HelpFormatter, add_optimisation_args, add_runtime_args,
                    at_least, autocast, cleanup_distributed, gradient_sync, in_range,
                    micro_batches, parallelize, same_on_every_rank, script_main,
                    seed_everything, setup_distributed, use_bf16)
from harness import Run
from data import save_grid, to_model_range
from sample import decode_to_uint8, sample_latents
from t2i import T2I_models, build_t2i
from text import DEFAULT_TEXT_ENCODER, TextEncoder
from baselines import load_tokenizer
from tokenizer import latent_fingerprint


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--captions", help="WebDataset .tar shards, or a folder of images with .txt "
                   "captions")
    p.add_argument("--run_dir", default="runs/t2i",
                   help="where ckpt.pt, log.jsonl and sample grids go")
    p.add_argument("--resume", action="store_true", help="continue from <run_dir>/ckpt.pt")
    p.add_argument("--export", action="store_true", help="only write <run_dir>/export.pt (for "
                   "sample.py) from the run's sharded --fsdp checkpoint, in one process")
    p.add_argument("--tokenizer", default="runs/tokenizer/stage2/tokenizer.pt",
                   help="our tokenizer.pt, or a diffusers AutoencoderKL (folder or hub name, e.g. "
                        "black-forest-labs/FLUX.1-dev) or a VA-VAE checkpoint")
    p.add_argument("--image_size", type=at_least(16),
                   help="the square bucket's side; the buckets have about its area (default: the "
                        "tokenizer's training size; 256 for a baseline)")
    p.add_argument("--text_encoder", default=DEFAULT_TEXT_ENCODER,
                   help="transformers hub name or local folder")
    p.add_argument("--max_length", type=at_least(1), default=128,
                   help="text tokens per caption (longer ones are cut)")
    p.add_argument("--caption_dropout", type=in_range(0, 1), default=0.1,
                   help="share of captions replaced by the empty one")
    p.add_argument("--stats_samples", type=at_least(2), default=10_000,
                   help="images for the latent mean/std")
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--model", default="T2I-2B/1", choices=sorted(T2I_models),
                   help="size/patch: patch 1 for our f16 latent, 2 for an f8 VAE's")
    g.add_argument("--grad_checkpointing", action="store_true",
                   help="recompute blocks in backward (less memory)")
    add_optimisation_args(p, steps=100_000,
                          steps_help="training steps (the paper compares at 100K)",
                          batch_size=256, lr=1e-4, betas=(0.9, 0.95), ema_decay=0.9999,
                          grad_clip=1.0, micro_batch=True)
    g = add_runtime_args(p, num_workers=4, log_every=100, ckpt_every=5000, grid_every=5000,
                         grids="sample grids")
    g.add_argument("--grid_cfg", type=at_least(0.0, float), default=4.0,
                   help="guidance scale of the sample grids")
    args = p.parse_args(argv)
    if not (args.captions or args.export):
        p.error("the following arguments are required: --captions")
    return args


class LatentStats:
    """Per-channel mean and std (C,) of the latents, measured once at the start of a run (with the
    captions that the sample grids draw, so that they stay the same over resumes) and kept in its
    checkpoints, where sample.py finds them to undo the normalisation."""

    def __init__(self, mean=None, std=None, prompts=()):
        self.mean, self.std, self.prompts = mean, std, list(prompts)

    def state_dict(self):
        return {"mean": self.mean, "std": self.std, "prompts": self.prompts}

    def load_state_dict(self, state):
        self.mean, self.std, self.prompts = state["mean"], state["std"], state["prompts"]


@torch.no_grad()
def measure_latents(stats, args, env, tok, sizes, bf16):
    """Fill `stats` from the first --stats_samples images (each rank its share), with rank 0's first
    8 captions for the sample grids."""
    batch = min(16, args.batch_size // env.world_size)  # data that fills a training batch fills it
    stream = CaptionStream(args.captions, batch, sizes, env.rank, env.world_size, args.seed + 1)
    total, prompts = torch.zeros(3, tok.latent_shape[0], dtype=torch.float64, device=env.device), []
    for batch in stream:
        with autocast(env.device, bf16):
            z = tok.encode(to_model_range(batch["images"], env.device)).double()  # (B, C, h, w)
        total += torch.stack([z.sum((0, 2, 3)), z.pow(2).sum((0, 2, 3)),
                              torch.full_like(z[0, :, 0, 0], z[:, 0].numel())])
        prompts = (prompts + batch["captions"])[:8]
        if total[2, 0] >= args.stats_samples / env.world_size * z.shape[2] * z.shape[3]:
            break
    if env.distributed:
        torch.distributed.all_reduce(total)
    mean = total[0] / total[2]
    std = (total[1] / total[2] - mean ** 2).clamp_min(1e-12).sqrt()
    stats.mean, stats.std, stats.prompts = mean.float().cpu(), std.float().cpu(), prompts


def train(args, env):
    seed_everything(args.seed, env.rank)
    device, bf16 = env.device, use_bf16(args.precision, env.device)
    micro, accum = micro_batches(args, env)  # samples per forward, forwards per step
    tok = load_tokenizer(args.tokenizer, args.image_size)
    fingerprint = latent_fingerprint(tok)
    tok.to(device).eval().requires_grad_(False)
    text_dtype = torch.bfloat16 if bf16 else torch.float32
    text = TextEncoder(args.text_encoder, args.max_length, device, text_dtype)
    # Pixels per latent cell: 16 for ours, 8 for SD/FLUX.
    factor = tok.config["image_size"] // tok.latent_shape[1]
    kwargs = dict(in_channels=tok.latent_shape[0], text_dim=text.dim)
    with same_on_every_rank(args.seed):  # on the CPU
        model = build_t2i(args.model, grad_checkpointing=args.grad_checkpointing, **kwargs)
    patch_side = factor * model.patch_size  # in pixels
    sizes = buckets(args.image_size or tok.config["image_size"], patch_side)  # whole patches
    tokens = (sizes[len(sizes) // 2][0] // patch_side) ** 2  # of the square bucket
    flops_per_image = 3 * flops.t2i_forward_flops(model, tokens, args.max_length)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    ema = EMA(model, args.ema_decay)
    train_model = parallelize(model, ema, env, args)  # DDP, or FSDP: both sharded in place
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas),
                            weight_decay=args.weight_decay, fused=True)
    stream = CaptionStream(args.captions, micro, sizes, env.rank, env.world_size, args.seed,
                           args.num_workers)
    batches = CaptionBatches(stream, args.num_workers, pin_memory=device.type == "cuda",
                             seed=args.seed)
    stats = LatentStats()  # a resumed run's come from its checkpoint; a new run measures them below
    tokenizer = (os.path.abspath(args.tokenizer) if os.path.exists(args.tokenizer)
                 else args.tokenizer)
    with Run(env, args, args.run_dir,
             identity={"kind": "t2i", "model_name": args.model, "model_args": kwargs},
             state={"model": model, "ema": ema, "opt": opt, "data": batches, "latent_stats": stats},
             meta={"tokenizer": tokenizer, "tokenizer_config": tok.config,
                   "tokenizer_fingerprint": fingerprint, "latent_factor": factor,
                   "text_encoder": args.text_encoder, "max_length": args.max_length,
                   "buckets": sizes},
             batch_size=args.batch_size, skipped=lambda: batches.count_skipped(env),
             flops_per_image=flops_per_image, show=("loss", "img_per_s"),
             nan_advice="Resume with --resume and a lower --lr.") as run:
        run.info(f"{args.model}: {millions:.1f}M parameters"
                 + (f", sharded ({args.fsdp})" if args.fsdp else "")
                 + f"; batch {args.batch_size} = {env.world_size} ranks x {accum} x {micro}; "
                 f"text encoder {args.text_encoder} ({text.dim}-d, {args.max_length} tokens); "
                 "buckets " + " ".join(f"{h}x{w}" for h, w in sizes))
        start = run.resume() if args.resume else 0
        if not args.resume:  # after Run, which refuses to overwrite a run before this costs minutes
            measure_latents(stats, args, env, tok, sizes, bf16)
        mean, std = (s.to(device).view(1, -1, 1, 1) for s in (stats.mean, stats.std))
        data = iter(batches)
        for step in range(start, args.steps):
            losses = 0
            for i in range(accum):  # micro-batches (gradient_sync: when gradients are reduced)
                images, captions = next(data)  # one bucket: (B, 3, H, W) uint8 and B captions
                drop = (torch.rand(len(captions)) < args.caption_dropout).tolist()  # CPU: no sync
                with torch.no_grad(), autocast(device, bf16):
                    z = tok.encode(to_model_range(images, device))
                    cond = text(["" if d else c for c, d in zip(captions, drop)])  # (states, mask)
                x1 = (z.float() - mean) / std  # normalised (B, C, h, w)
                with gradient_sync(train_model, i == accum - 1):
                    with autocast(device, bf16):
                        loss, parts = dit.flow_matching_loss(train_model, x1, cond)
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
                run.log(done, lr=opt.param_groups[0]["lr"])
            if run.due(args.grid_every, done):  # every rank: a sharded forward is a collective
                save_prompt_grid(ema.model, tok, text, stats, sizes, factor, args, done, run, bf16)
            stop = run.stop_requested(done)
            if run.due(args.ckpt_every, done) or stop:
                run.save(done)
            if stop:
                break
    return run


@torch.no_grad()
def save_prompt_grid(model, tok, text, stats, sizes, factor, args, step, run, bf16):
    """EMA samples of fixed prompts and noise at the square bucket, 30 steps, decoded by the
    tokenizer: drawn by every rank (the sharded model's forward is a collective; under DDP the
    other ranks would wait for rank 0 anyway), written by rank 0."""
    device, prompts = next(model.parameters()).device, stats.prompts
    h, w = sizes[len(sizes) // 2]
    noise = torch.randn(len(prompts), tok.latent_shape[0], h // factor, w // factor,
                        generator=torch.Generator().manual_seed(0)).to(device)
    with autocast(device, bf16):
        z = sample_latents(model, text(prompts), noise, steps=30, cfg_scale=args.grid_cfg,
                           null=text([""] * len(prompts)))
    path = os.path.join(args.run_dir, f"samples_{step:07d}.png")
    if run.env.is_main:
        save_grid(decode_to_uint8(tok, z, stats.state_dict()), path, nrow=8)
    run.info(f"EMA samples of {len(prompts)} captions (30 steps, cfg {args.grid_cfg}) -> {path}")


def main(argv=None):
    args = parse_args(argv)
    if args.export:
        return checkpoints.export_run(args.run_dir)
    env = setup_distributed(args.device)
    result = train(args, env)  # every DDP module lives and dies inside
    cleanup_distributed()
    return result


if __name__ == "__main__":
    script_main(main)
