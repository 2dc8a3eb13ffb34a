r"""Train the text-to-image model (t2i.TextToImageDiT) on image-caption data: the paper's LAION
experiment, with the aligned tokenizer (or a baseline such as the FLUX VAE, for the comparison) and
a frozen text encoder (text.py).

    torchrun --nproc_per_node=8 train_t2i.py --captions /data/laion/shards \
        --tokenizer runs/tokenizer_laion/stage2/tokenizer.pt --model T2I-2B/1 --run_dir runs/t2i

Images stream from a caption folder or WebDataset shards in aspect-ratio buckets (captions.py); each
step encodes them with the frozen tokenizer and the captions with the frozen text encoder, 10% of
the captions replaced by the empty caption (which guidance compares against), then one
flow-matching step (dit.flow_matching_loss), with the bookkeeping of the other trainers
(common.Run). Latents are normalised per channel with statistics of the first --stats_samples
images, kept in every checkpoint.

The 2B model with float32 AdamW state and an EMA needs about 45 GiB per GPU under DDP (the default)
before activations. `--fsdp` shards all of it over the ranks (common.parallelize; README: memory
table and the multi-node command), and `--micro_batch` accumulates gradients, so that the paper's
global batch fits any number of GPUs:

    torchrun --nproc_per_node=8 train_t2i.py --fsdp --micro_batch 16 ...   # then, to sample from:
    python train_t2i.py --export runs/t2i/ckpt   # runs/t2i/export.pt (also made at the end)
"""

import argparse
import os

import torch

import dit
from baselines import load_tokenizer
from captions import CaptionBatches, CaptionStream, buckets
from common import (EMA, HelpFormatter, Run, at_least, autocast, cleanup_distributed, due, export,
                    forward_flops, gradient_sync, in_range, micro_batches, parallelize,
                    same_on_every_rank, script_main, setup_distributed, use_bf16)
from data import save_grid, to_model_range
from sample import decode_to_uint8, sample_latents
from t2i import T2I_models, build_t2i
from text import DEFAULT_TEXT_ENCODER, TextEncoder
from tokenizer import latent_fingerprint


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = p.add_argument
    add("--captions", help="WebDataset .tar shards, or a folder of images with .txt captions")
    add("--run_dir", default="runs/t2i", help="where ckpt.pt, log.jsonl and sample grids go")
    add("--resume", action="store_true", help="continue from <run_dir>/ckpt.pt")
    add("--export", nargs="?", const="", metavar="CKPT_DIR", help="only write the file "
        "sample_t2i.py loads from a sharded --fsdp checkpoint, in one process: <run_dir>/ckpt "
        "(default) -> export.pt, a kept ckpt_<step> -> export_<step>.pt")
    add("--tokenizer", default="runs/tokenizer/stage2/tokenizer.pt", help="our tokenizer.pt, or "
        "a diffusers AutoencoderKL (folder or hub name, e.g. black-forest-labs/FLUX.1-dev) or a "
        "VA-VAE checkpoint")
    add("--image_size", type=at_least(16), help="the square bucket's side; the buckets have about "
        "its area (default: the tokenizer's training size; 256 for a baseline)")
    add("--text_encoder", default=DEFAULT_TEXT_ENCODER, help="transformers hub name or folder")
    add("--max_length", type=at_least(1), default=128, help="text tokens per caption (cut)")
    add("--caption_dropout", type=in_range(0, 1), default=0.1,
        help="share of captions replaced by the empty one")
    add("--stats_samples", type=at_least(2), default=10_000, help="images for the latent mean/std")
    add("--model", default="T2I-2B/1", choices=sorted(T2I_models),
        help="size/patch: patch 1 for our f16 latent, 2 for an f8 VAE's")
    add("--grad_checkpointing", action="store_true", help="recompute blocks in backward")
    # optimisation
    add("--steps", type=at_least(1), default=100_000, help="the paper compares at 100K")
    add("--batch_size", type=at_least(1), default=256, help="global (split over the ranks)")
    add("--micro_batch", type=at_least(1), help="samples per forward on a rank; below its share "
        "of --batch_size: gradient accumulation (default: none)")
    add("--lr", type=in_range(0, lo_open=True), default=1e-4, help="AdamW learning rate")
    add("--betas", type=in_range(0, 1, hi_open=True), nargs=2, default=(0.9, 0.95),
        help="optimiser betas")
    add("--weight_decay", type=in_range(0), default=0.0, help="AdamW weight decay")
    add("--grad_clip", type=in_range(0), default=1.0, help="max gradient norm (0: off)")
    add("--ema_decay", type=in_range(0, 1, hi_open=True), default=0.9999,
        help="EMA of the weights (what is sampled and exported)")
    # runtime
    add("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto: CUDA if present")
    add("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="auto: bf16 on CUDA")
    add("--compile", default="auto", choices=("auto", "on", "off"), help="auto: on CUDA")
    add("--fsdp", nargs="?", const="shard", choices=("shard", "hybrid"), help="shard weights, "
        "gradients, AdamW state and EMA over the ranks (FSDP2) instead of a copy per GPU (DDP); "
        "hybrid: shard within a node, replicate across nodes. Checkpoints: <run_dir>/ckpt/")
    add("--num_workers", type=at_least(0), default=4, help="data loading processes per rank")
    add("--seed", type=at_least(0), default=0, help="seeds weights, noise and data order")
    add("--log_every", type=at_least(1), default=100, help="steps between log lines")
    add("--ckpt_every", type=at_least(1), default=5000, help="steps between checkpoints")
    add("--keep_every", type=at_least(0), default=0, help="also keep ckpt_<step> (0: never)")
    add("--grid_every", type=at_least(0), default=5000, help="steps between sample grids (0: off)")
    add("--grid_cfg", type=in_range(0), default=4.0, help="guidance scale of the sample grids")
    args = p.parse_args(argv)
    if not (args.captions or args.export is not None):
        p.error("the following arguments are required: --captions")
    return args


class LatentStats:
    """Per-channel mean and std (C,) of the latents, measured once at the start of a run (with the
    captions that the sample grids draw, so that they stay the same over resumes) and kept in its
    checkpoints, where sample_t2i.py finds them to undo the normalisation."""

    def __init__(self, mean=None, std=None, prompts=()):
        self.mean, self.std, self.prompts = mean, std, list(prompts)

    def state_dict(self):
        return {"mean": self.mean, "std": self.std, "prompts": self.prompts}

    def load_state_dict(self, state):
        self.mean, self.std, self.prompts = state["mean"], state["std"], state["prompts"]


@torch.no_grad()
def measure_latents(stats, args, env, tok, sizes, bf16):
    """Fill `stats` from the first --stats_samples images (each rank its share), with rank 0's first
    8 captions for the sample grids. The std is unbiased, as train_dit.py's."""
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
    s, s2, n = total  # sums of z and z^2, and the count, per channel
    std = ((s2 - s * s / n) / (n - 1)).clamp_min(1e-12).sqrt()
    stats.mean, stats.std, stats.prompts = (s / n).float().cpu(), std.float().cpu(), prompts


def build(args, env, bf16):
    """The frozen tokenizer and text encoder, the model (built on the CPU, the same on every rank)
    and its identity; the aspect-ratio buckets, in whole patches."""
    tok = load_tokenizer(args.tokenizer, args.image_size)
    fingerprint = latent_fingerprint(tok)
    tok.to(env.device).eval().requires_grad_(False)
    text = TextEncoder(args.text_encoder, args.max_length, env.device,
                       torch.bfloat16 if bf16 else torch.float32)
    factor = tok.config["image_size"] // tok.latent_shape[1]  # pixels per latent cell: 16 or 8
    kwargs = dict(in_channels=tok.latent_shape[0], text_dim=text.dim)
    with same_on_every_rank(args.seed):
        model = build_t2i(args.model, grad_checkpointing=args.grad_checkpointing, **kwargs)
    sizes = buckets(args.image_size or tok.config["image_size"], factor * model.patch_size)
    tokenizer = (os.path.abspath(args.tokenizer) if os.path.exists(args.tokenizer)
                 else args.tokenizer)
    meta = {"tokenizer": tokenizer, "tokenizer_config": tok.config, "latent_factor": factor,
            "tokenizer_fingerprint": fingerprint, "text_encoder": args.text_encoder,
            "max_length": args.max_length, "buckets": sizes}
    return tok, text, model, {"kind": "t2i", "model_name": args.model, "model_args": kwargs}, meta


def train(args, env):
    torch.manual_seed(args.seed + env.rank)  # each rank its own noise, timesteps and dropout
    device, bf16 = env.device, use_bf16(args.precision, env.device)
    micro, accum = micro_batches(args, env)  # samples per forward, forwards per step
    tok, text, model, identity, meta = build(args, env, bf16)
    sizes, params = meta["buckets"], sum(p.numel() for p in model.parameters())
    tokens = (sizes[len(sizes) // 2][0] // meta["latent_factor"] // model.patch_size) ** 2
    ema = EMA(model, args.ema_decay)
    train_model = parallelize(model, ema, env, args)  # DDP, or FSDP: both sharded in place
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas),
                            weight_decay=args.weight_decay, fused=True)
    stream = CaptionStream(args.captions, micro, sizes, env.rank, env.world_size, args.seed,
                           args.num_workers)
    batches = CaptionBatches(stream, args.num_workers, pin_memory=device.type == "cuda")
    stats = LatentStats()  # a resumed run's come from its checkpoint; a new run measures them
    with Run(env, args, args.run_dir, identity=identity, meta=meta,
             state={"model": model, "ema": ema, "opt": opt, "data": batches, "latent_stats": stats},
             batch_size=args.batch_size, skipped=lambda: batches.count_skipped(env),
             flops_per_image=3 * forward_flops(model, tokens, args.max_length),
             show=("loss", "img_per_s"),
             nan_advice="Resume with --resume and a lower --lr.") as run:
        run.logger.info(f"{args.model}: {params / 1e6:.1f}M parameters" + (
            f", sharded ({args.fsdp})" if args.fsdp else "") + f"; batch {args.batch_size} = "
            f"{env.world_size} ranks x {accum} x {micro}; text encoder {args.text_encoder} "
            f"({text.dim}-d, {args.max_length} tokens); buckets "
            + " ".join(f"{h}x{w}" for h, w in sizes))
        start = run.resume() if args.resume else 0
        if not args.resume:  # after Run, which refuses to overwrite a run before this costs minutes
            measure_latents(stats, args, env, tok, sizes, bf16)
        mean, std = (s.to(device).view(1, -1, 1, 1) for s in (stats.mean, stats.std))
        data = iter(batches)
        for step in range(start, args.steps):
            losses = 0
            for i in range(accum):  # micro-batches; the gradients are reduced on the last
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
            done = step + 1
            run.record(done, **dict(zip(("loss", "mse", "cos"), losses)))
            if due(args.log_every, done, args.steps):
                run.log(done, lr=opt.param_groups[0]["lr"])
            if due(args.grid_every, done, args.steps):  # every rank: FSDP's forward is collective
                save_prompt_grid(ema.model, tok, text, stats, meta, args, done, run, bf16)
            stop = run.stop_requested(done)
            if due(args.ckpt_every, done, args.steps) or stop:
                run.save(done)
            if stop:
                break
    return run


@torch.no_grad()
def save_prompt_grid(model, tok, text, stats, meta, args, step, run, bf16):
    """EMA samples of fixed prompts and noise at the square bucket, 30 steps, decoded by the
    tokenizer: drawn by every rank (a sharded forward is a collective), written by rank 0."""
    device, prompts, factor = next(model.parameters()).device, stats.prompts, meta["latent_factor"]
    h, w = meta["buckets"][len(meta["buckets"]) // 2]
    noise = torch.randn(len(prompts), tok.latent_shape[0], h // factor, w // factor,
                        generator=torch.Generator().manual_seed(0)).to(device)
    with autocast(device, bf16):
        z = sample_latents(model, text(prompts), noise, steps=30, cfg_scale=args.grid_cfg,
                           null=text([""] * len(prompts)))
    path = os.path.join(args.run_dir, f"samples_{step:07d}.png")
    if run.env.is_main:
        save_grid(decode_to_uint8(tok, z, stats.state_dict()), path, nrow=8)
    run.logger.info(f"EMA samples of {len(prompts)} captions (30 steps, cfg {args.grid_cfg}) -> "
                    f"{path}")


def main(argv=None):
    args = parse_args(argv)
    if args.export is not None:
        return export(args.export or os.path.join(args.run_dir, "ckpt"))
    env = setup_distributed(args.device)
    result = train(args, env)  # every DDP module lives and dies inside
    cleanup_distributed()
    return result


if __name__ == "__main__":
    script_main(main)
