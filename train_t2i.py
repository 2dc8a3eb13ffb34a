r"""Train the text-to-image model (t2i.TextToImageDiT) on image-caption data, the paper's LAION
experiment: the aligned tokenizer (or a baseline such as the FLUX VAE) and a frozen text encoder.

    torchrun --nproc_per_node=8 train_t2i.py --captions /data/laion/shards \
        --tokenizer runs/tokenizer_laion/stage2/tokenizer.pt --model T2I-2B/1 --run_dir runs/t2i

Images stream in aspect-ratio buckets (captions.py), are encoded by the frozen tokenizer (latents
normalised per channel by statistics of the first --stats_samples images) and their captions by the
text encoder, 10% of them replaced by the empty caption (which guidance compares against).
The 2B model's training state takes ~45 GiB per GPU under DDP: `--fsdp` shards it (fsdp.py; README:
memory, several nodes), `--micro_batch` accumulates gradients, so any number of GPUs fits:

    torchrun --nproc_per_node=8 train_t2i.py --fsdp --micro_batch 16 ...   # then, to sample from:
    python train_t2i.py --export runs/t2i/ckpt   # runs/t2i/export.pt (also made at the end)
"""

import argparse
import os

import torch

import dit
from baselines import load_tokenizer
from captions import CaptionBatches, CaptionStream, buckets
from common import (EMA, HelpFormatter, Run, UserError, at_least, autocast, cleanup_distributed,
                    due, forward_flops, in_range, micro_batches, same_on_every_rank, script_main,
                    setup_distributed, use_bf16)
from data import save_grid, to_model_range
from fsdp import ShardedRun, export, gradient_sync, parallelize
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
    add("--export", nargs="?", const="", metavar="CKPT_DIR", help="only write the file to sample "
        "from, of an --fsdp checkpoint (default: <run_dir>/ckpt; or a kept ckpt_<step>)")
    add("--tokenizer", default="runs/tokenizer/stage2/tokenizer.pt", help="ours, or a baseline's "
        "(e.g. black-forest-labs/FLUX.1-dev)")
    add("--image_size", type=at_least(16), help="the square bucket's side (default: the "
        "tokenizer's)")
    add("--text_encoder", default=DEFAULT_TEXT_ENCODER, help="transformers hub name or folder")
    add("--max_length", type=at_least(1), default=128, help="text tokens per caption (cut)")
    add("--caption_dropout", type=in_range(0, 1), default=0.1, help="share of empty captions")
    add("--stats_samples", type=at_least(2), default=10_000, help="images for the latent mean/std")
    add("--model", default="T2I-2B/1", choices=sorted(T2I_models), help="patch 2 for an f8 VAE")
    add("--grad_checkpointing", action="store_true", help="recompute blocks in backward")
    add("--steps", type=at_least(1), default=100_000, help="the paper compares at 100K")
    add("--batch_size", type=at_least(1), default=256, help="global (split over the ranks)")
    add("--micro_batch", type=at_least(1), help="samples per forward on a rank (accumulation)")
    add("--lr", type=in_range(0, lo_open=True), default=1e-4, help="AdamW learning rate")
    add("--betas", type=in_range(0, 1, hi_open=True), nargs=2, default=(0.9, 0.95), help="AdamW")
    add("--weight_decay", type=in_range(0), default=0.0, help="AdamW weight decay")
    add("--grad_clip", type=in_range(0), default=1.0, help="max gradient norm (0: off)")
    add("--ema_decay", type=in_range(0, 1, hi_open=True), default=0.9999, help="of the weights")
    add("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto: CUDA if present")
    add("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="auto: bf16 on CUDA")
    add("--compile", default="auto", choices=("auto", "on", "off"), help="auto: on CUDA")
    add("--fsdp", nargs="?", const="shard", choices=("shard", "hybrid"), help="shard the training "
        "state over the ranks (hybrid: within a node, replicated across nodes); <run_dir>/ckpt/")
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
    """Per-channel `mean` and `std` (C,) of the latents, measured once at the start of a run (and
    the sample grids' `prompts`), kept in its checkpoints for sample_t2i.py."""

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        vars(self).update(state)


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
    """The frozen tokenizer and text encoder, the model (on the CPU, the same on every rank), its
    identity and the run's meta (with the aspect-ratio buckets, in whole patches)."""
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
    check_kind(args)
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
    with (ShardedRun if args.fsdp else Run)(
            env, args, args.run_dir, identity=identity, meta=meta,
            state={"model": model, "ema": ema, "opt": opt, "data": batches, "latent_stats": stats},
            skipped=lambda: batches.count_skipped(env),
            nan_advice="Resume with --resume and a lower --lr.",
            flops_per_image=3 * forward_flops(model, tokens, args.max_length)) as run:
        run.logger.info(f"{args.model}: {params / 1e6:.1f}M parameters, --fsdp {args.fsdp}; batch "
                        f"{args.batch_size} = {env.world_size} ranks x {accum} x {micro}; text "
                        f"encoder {args.text_encoder} ({text.dim}-d, {args.max_length} tokens); "
                        f"buckets {' '.join(f'{h}x{w}' for h, w in sizes)}")
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
    """EMA samples of fixed prompts and noise at the square bucket, 30 steps, drawn by every rank
    (a sharded forward is a collective), decoded and written by rank 0."""
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
    run.logger.info(f"EMA samples (30 steps, cfg {args.grid_cfg}) -> {path}")


def check_kind(args):
    """--resume continues a checkpoint of its own kind: ckpt.pt under DDP, ckpt/ under --fsdp."""
    other = os.path.join(args.run_dir, "ckpt.pt" if args.fsdp else "ckpt")
    if args.resume and os.path.exists(other):
        kind, fix = ("single-file (DDP)", "without") if args.fsdp else ("sharded (--fsdp)", "with")
        raise UserError(f"{other} is a {kind} checkpoint: resume {fix} --fsdp, or start another "
                        "--run_dir")


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
