"""Train the aligned tokenizer in three stages (paper section "Three-stage alignment"; SPEC section 1).

    torchrun --nproc_per_node=8 train_tokenizer.py --stage 1 --data /imagenet/train
    torchrun --nproc_per_node=8 train_tokenizer.py --stage 2 --data /imagenet/train
    torchrun --nproc_per_node=8 train_tokenizer.py --stage 3 --data /imagenet/train
    python train_tokenizer.py --eval --tokenizer runs/tokenizer/stage3/tokenizer.pt --data /imagenet/val

Stage 1, latent alignment: DINOv2 frozen; the adapter and decoder learn to reconstruct from its
    features. The adapter squeezes 1024-d semantic tokens into a 32-d latent.
Stage 2, perceptual alignment: everything trains, so the encoder can also capture low-level detail;
    a semantic-preservation loss keeps the latent close to that of the frozen stage-1 model.
Stage 3, decoder refinement: encoder and adapter frozen (the latent space is final), the decoder
    alone improves reconstruction. This can run after the diffusion model has been trained.

Every stage uses the same reconstruction loss: L1 + LPIPS + adaptive-weight hinge GAN (the
discriminator starts after the first 20% of the stage). Stage N starts from the EMA weights that
stage N-1 exported to <run_dir>/stage{N-1}/tokenizer.pt and exports its own to stage{N}/tokenizer.pt.
"""

import argparse
import copy
import json
import os
import time

import torch
from tqdm import tqdm

from common import (EMA, Logger, NonFiniteGuard, StopSignal, autocast, cleanup_distributed, fmt_metrics,
                    load_checkpoint, load_training_state, save_checkpoint, seed_everything, setup_distributed,
                    training_state, unwrap, use_bf16, wrap_ddp)
from data import Batches, build_dataset, count_skipped, eval_loader, save_grid, to_model_range, to_uint8
from tokenizer import (AlignedTokenizer, adaptive_gan_weight, build_dinov2, build_lpips, default_config,
                       hinge_d_loss, load_tokenizer, PatchGAN, semantic_preservation_loss)

# Which parts learn in each stage; the rest is frozen.
TRAINABLE = {1: ("adapter", "decoder"), 2: ("encoder", "adapter", "decoder"), 3: ("decoder",)}
ARCH_FLAGS = ("encoder", "latent_channels", "adapter_hidden", "image_size", "decoder_ch", "decoder_ch_mult",
              "decoder_res_blocks")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, choices=(1, 2, 3), help="which training stage to run")
    p.add_argument("--eval", action="store_true", help="evaluate a tokenizer (PSNR, SSIM, LPIPS, rFID) instead")
    p.add_argument("--run_dir", default="runs/tokenizer", help="stage N writes <run_dir>/stage{N}/")
    p.add_argument("--data", default=None, help="image folder (class subfolders or flat); default: built-in demo set")
    p.add_argument("--init", default=None,
                   help="stage 2/3: tokenizer to start from (default <run_dir>/stage{N-1}/tokenizer.pt)")
    p.add_argument("--resume", action="store_true", help="continue this stage from <run_dir>/stage{N}/ckpt.pt")
    g = p.add_argument_group("architecture (stage 1 only; later stages inherit it)")
    g.add_argument("--encoder", default=None, help="dinov2_vit{s,b,l}14[_reg] or tiny (default dinov2_vitl14)")
    g.add_argument("--latent_channels", type=int, default=None, help="latent width (default 32; the paper also tries 64)")
    g.add_argument("--adapter_hidden", type=int, default=None, help="adapter MLP hidden width (default: encoder width)")
    g.add_argument("--image_size", type=int, default=None, help="training resolution (default 256)")
    g.add_argument("--decoder_ch", type=int, default=None, help="decoder base width (default 128)")
    g.add_argument("--decoder_ch_mult", type=lambda s: tuple(int(c) for c in s.split(",")), default=None,
                   help="decoder width multipliers (default 1,1,2,2,4)")
    g.add_argument("--decoder_res_blocks", type=int, default=None, help="default 2")
    g = p.add_argument_group("pretrained weights")
    g.add_argument("--encoder_ckpt", default=None, help="local DINOv2 .pth (default: torch.hub cache / download)")
    g.add_argument("--vgg_ckpt", default=None, help="local vgg16-397923af.pth for LPIPS (default: hub cache / download)")
    g.add_argument("--random_encoder", action="store_true", help="random DINOv2 weights (demo and tests only)")
    g.add_argument("--random_lpips", action="store_true", help="random LPIPS VGG backbone (demo and tests only)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=50_000, help="training steps of this stage")
    g.add_argument("--batch_size", type=int, default=256, help="global batch size (split over ranks)")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--betas", type=float, nargs=2, default=(0.5, 0.9))
    g.add_argument("--ema_decay", type=float, default=0.999)
    g.add_argument("--lpips_weight", type=float, default=1.0)
    g.add_argument("--disc_weight", type=float, default=0.5, help="scale of the adaptive GAN weight")
    g.add_argument("--disc_start", type=int, default=None, help="step the GAN starts at (default: 20%% of --steps)")
    g.add_argument("--disc_ch", type=int, default=64, help="PatchGAN base width")
    g.add_argument("--sp_weight", type=float, default=1.0, help="stage 2 semantic-preservation weight (3 for T2I data)")
    g.add_argument("--sp_loss", choices=("mse", "cosine"), default="mse")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    g.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="auto: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the encoder, decoder and discriminator")
    g.add_argument("--channels_last", action="store_true", help="channels-last memory format for the conv nets")
    g.add_argument("--grad_checkpointing", action="store_true",
                   help="recompute the encoder's blocks in backward (stage 2: less memory, ~30%% more compute)")
    g.add_argument("--num_workers", type=int, default=8)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--demo_images", type=int, default=512, help="size of the built-in demo set")
    g = p.add_argument_group("logging")
    g.add_argument("--log_every", type=int, default=50)
    g.add_argument("--grid_every", type=int, default=1000, help="reconstruction grid PNG interval")
    g.add_argument("--ckpt_every", type=int, default=2000)
    g = p.add_argument_group("evaluation (--eval)")
    g.add_argument("--tokenizer", default=None, help="tokenizer to evaluate (default <run_dir>/stage3/tokenizer.pt)")
    g.add_argument("--eval_images", type=int, default=None, help="evaluate on the first N images only")
    g.add_argument("--eval_batch_size", type=int, default=32)
    g.add_argument("--rfid", action="store_true", help="also compute rFID (needs the Inception weights)")
    g.add_argument("--inception_ckpt", default=None, help="local pt_inception-2015-12-05-6726825d.pth for rFID")
    g.add_argument("--random_inception", action="store_true", help="random Inception for rFID (tests only)")
    g.add_argument("--json", default=None, help="write the metrics to this JSON file")
    args = p.parse_args(argv)
    if args.stage is None and not args.eval:
        p.error("give --stage 1, 2 or 3 (or --eval)")
    return args


# ----------------------------------------------------------------------------------------------------
# Building the models of a stage


def build_tokenizer(args, log):
    """Stage 1: a new tokenizer around (pretrained) DINOv2. Stage 2/3: the previous stage's export.
    Returns (tokenizer, path it was initialised from or None)."""
    arch = {k: getattr(args, k) for k in ARCH_FLAGS}
    if args.stage == 1:
        cfg = default_config(**arch)
        encoder = build_dinov2(cfg["encoder"], pretrained=not args.random_encoder, ckpt=args.encoder_ckpt)
        if args.random_encoder:
            log.info(f"WARNING: --random_encoder: {cfg['encoder']} has RANDOM weights, not DINOv2's. "
                     "Fine for a demo or a test, meaningless for real results.")
        return AlignedTokenizer(cfg, encoder), None
    init = args.init or os.path.join(args.run_dir, f"stage{args.stage - 1}", "tokenizer.pt")
    if not os.path.isfile(init):
        raise FileNotFoundError(f"stage {args.stage} starts from the stage-{args.stage - 1} tokenizer, but {init} "
                                f"does not exist: run --stage {args.stage - 1} first (same --run_dir) or pass --init PATH")
    model = load_tokenizer(init)
    if model.stage != args.stage - 1:
        raise ValueError(f"stage {args.stage} starts from the stage-{args.stage - 1} tokenizer, but {init} comes from "
                         f"stage {model.stage}: pass --init with a stage-{args.stage - 1} tokenizer.pt (or its ckpt.pt)")
    if model.random_encoder:  # inherited: this stage's log, checkpoints and export record it too
        args.random_encoder = True
        log.info(f"WARNING: {init} grew from a RANDOM encoder (--random_encoder in stage 1): "
                 "fine for a demo or a test, meaningless for real results.")
    given = {k: v for k, v in arch.items() if v is not None}
    clash = {k: (v, model.config[k]) for k, v in given.items() if default_config(**{k: v})[k] != model.config[k]}
    if clash:
        raise ValueError(f"the architecture is fixed in stage 1, but these flags differ from {init}: "
                         + ", ".join(f"--{k} {a} (checkpoint: {b})" for k, (a, b) in clash.items()))
    log.info(f"stage {args.stage}: starting from {init}")
    return model, init


def set_trainable(model: AlignedTokenizer, stage: int):
    """Freeze everything, then unfreeze this stage's parts. Frozen parts build no autograd graph,
    so stage 1 and 3 pay no backward cost (and no activation memory) for the frozen encoder."""
    model.requires_grad_(False)
    for name in TRAINABLE[stage]:
        getattr(model, name).requires_grad_(True)
    # DINOv2's mask token only exists for its masked pre-training: it never receives a gradient here,
    # and DDP fails on a trainable parameter that gets none.
    model.encoder.mask_token.requires_grad_(False)


def stage_dir(args):
    return os.path.join(args.run_dir, f"stage{args.stage}")


def tokenizer_loss(model, x, args, lpips, disc=None, ref=None):
    """The tokenizer's loss on a batch x in [-1, 1]: L1 + LPIPS (+ w_sp * L_sp in stage 2, given the
    frozen stage-1 reference `ref`) (+ w_g * L_GAN once the discriminator `disc` is on).
    Returns (loss, reconstructions, {name: value} of every part, as device tensors)."""
    x_hat, z = model(x)
    x_hat = x_hat.float()
    l1 = (x_hat - x).abs().mean()
    perceptual = lpips(x_hat, x).mean()
    nll = l1 + args.lpips_weight * perceptual
    loss = nll
    parts = {"l1": l1, "lpips": perceptual}
    if ref is not None:
        with torch.no_grad():
            z_ref = ref.encode(x)
        parts["sp"] = semantic_preservation_loss(z, z_ref, args.sp_loss)
        loss = loss + args.sp_weight * parts["sp"]
    if disc is not None:
        # The discriminator judges here but does not learn: its weights get no gradient from this loss.
        disc.requires_grad_(False)
        parts["g_loss"] = -disc(x_hat).mean()
        disc.requires_grad_(True)
        parts["w_g"] = adaptive_gan_weight(nll, parts["g_loss"], unwrap(model).decoder.last_layer, args.disc_weight)
        loss = loss + parts["w_g"] * parts["g_loss"]
    parts["loss"] = loss
    return loss, x_hat, parts


# ----------------------------------------------------------------------------------------------------
# Training


def train(args, env):
    run_dir = stage_dir(args)
    ckpt_path = os.path.join(run_dir, "ckpt.pt")
    if not args.resume and os.path.exists(ckpt_path):
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or use another --run_dir "
                              "(we do not overwrite training progress)")
    if env.is_main:
        os.makedirs(run_dir, exist_ok=True)
    log = Logger(env, run_dir)
    seed_everything(args.seed, env.rank)
    device = env.device
    bf16 = use_bf16(args.precision, device)
    if args.batch_size % env.world_size:
        raise ValueError(f"--batch_size {args.batch_size} is not divisible by the {env.world_size} ranks")
    local_batch = args.batch_size // env.world_size
    disc_start = args.disc_start if args.disc_start is not None else int(0.2 * args.steps)

    # Models: tokenizer (with the stage's trainable parts), frozen stage-1 reference, discriminator, LPIPS.
    model, init_path = build_tokenizer(args, log)
    cfg = model.config
    set_trainable(model, args.stage)
    ref = None
    if args.stage == 2:  # z_ref = encoder + adapter exactly as stage 1 left them, frozen
        ref = copy.deepcopy(model).requires_grad_(False).eval()
        ref.decoder = None
        ref.to(device)
    lpips = build_lpips(args.vgg_ckpt, random_backbone=args.random_lpips).to(device)
    if args.random_lpips:
        log.info("WARNING: --random_lpips: the LPIPS VGG backbone has RANDOM weights (demo/tests only).")
    disc = PatchGAN(args.disc_ch).to(device)
    model.to(device)
    model.encoder.grad_checkpointing = args.grad_checkpointing
    if args.channels_last:
        model.decoder.to(memory_format=torch.channels_last)
        disc.to(memory_format=torch.channels_last)
    ema = EMA(model, args.ema_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr, betas=tuple(args.betas), fused=True)
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=tuple(args.betas), fused=True)
    log.log({"event": "start", "stage": args.stage, "args": vars(args)})  # the run's flags, random weights included
    n_train = sum(p.numel() for p in params)
    log.info(f"tokenizer {cfg['encoder']} -> {cfg['latent_channels']}x{model.latent_size}x{model.latent_size}: "
             f"{n_train / 1e6:.1f}M of {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters train "
             f"in stage {args.stage} ({', '.join(TRAINABLE[args.stage])}); GAN from step {disc_start}")

    dataset = build_dataset(args.data, cfg["image_size"], hflip=True, seed=args.seed,
                            demo_images=args.demo_images)
    if args.data is None:
        log.info(f"no --data given: using the built-in demo set ({len(dataset)} images)")
    batches = Batches(dataset, local_batch, env, seed=args.seed, num_workers=args.num_workers)
    grid_images = torch.stack([dataset[i][0] for i in range(min(8, len(dataset)))])  # the same 8 images all stage
    stateful = {"model": model, "ema": ema, "disc": disc, "opt": opt, "opt_d": opt_d, "data": batches}
    start_step = 0
    if args.resume:
        ckpt = load_checkpoint(ckpt_path, "training checkpoint to resume")
        if ckpt.get("kind") != "tokenizer" or ckpt.get("stage") != args.stage:
            raise ValueError(f"{ckpt_path} is not a stage-{args.stage} tokenizer checkpoint")
        if ckpt["config"] != cfg:
            raise ValueError(f"{ckpt_path} was trained with a different architecture: {ckpt['config']} vs {cfg}")
        start_step = load_training_state(ckpt, stateful, env)
        log.info(f"resumed stage {args.stage} at step {start_step} from {ckpt_path}")

    if args.compile:  # the conv/attention-heavy parts, in place (state-dict names unchanged)
        model.encoder.compile()
        model.decoder.compile()
        disc.compile()
        if ref is not None:
            ref.encoder.compile()
    ddp_model, ddp_disc = wrap_ddp(model, env), wrap_ddp(disc, env)

    def save(step):
        """Everything needed to continue exactly: weights, EMA, optimisers, data position, RNG."""
        state = training_state(stateful, env)  # a collective: every rank takes part
        if env.is_main:
            save_checkpoint({"kind": "tokenizer", "stage": args.stage, "step": step, "config": cfg, **state,
                             "init": init_path, "args": vars(args)}, ckpt_path)

    def export():
        """The stage's result: EMA weights + config, what the next stage and train_dit.py read."""
        if env.is_main:
            path = os.path.join(run_dir, "tokenizer.pt")
            save_checkpoint({"kind": "tokenizer", "stage": args.stage, "config": cfg, "model": ema.state_dict(),
                             "init": init_path, "args": vars(args)}, path)  # args: incl. --random_encoder
            log.info(f"exported the EMA tokenizer to {path}")

    def save_recon_grid(step):
        if not env.is_main:
            return
        with torch.no_grad(), autocast(device, bf16):
            x = to_model_range(grid_images, device)
            x_hat, _ = ema.model(x)
        path = os.path.join(run_dir, f"recon_{step:07d}.png")
        save_grid(torch.cat([grid_images, to_uint8(x_hat).cpu()]), path, nrow=len(grid_images))
        log.info(f"reconstructions (top: input, bottom: EMA tokenizer) -> {path}")

    stop = StopSignal()
    stopped = False
    nan_guard = NonFiniteGuard(device)
    sums, counts, n_steps = {}, {}, 0
    t0 = time.time()
    data_iter = iter(batches)
    pbar = tqdm(total=args.steps, initial=start_step, desc=f"stage {args.stage}", disable=not env.is_main,
                dynamic_ncols=True)
    # Train mode throughout: frozen parts have nothing that behaves differently (no dropout or
    # BatchNorm in DINOv2, the adapter or the decoder); only the discriminator has BatchNorm.
    model.train()
    for step in range(start_step, args.steps):
        images, _ = next(data_iter)
        x = to_model_range(images, device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        gan_on = step >= disc_start

        # ---- tokenizer update
        with autocast(device, bf16):
            loss, x_hat, parts = tokenizer_loss(ddp_model, x, args, lpips, disc if gan_on else None, ref)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)

        # ---- discriminator update (hinge loss on real vs detached reconstructions)
        if gan_on:
            with autocast(device, bf16):
                d_loss = hinge_d_loss(ddp_disc(x), ddp_disc(x_hat.detach()))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            parts["d_loss"] = d_loss

        # Sum the losses on the device; they reach the host only at log steps (no per-step sync).
        nan_guard.update(loss, step + 1)
        if gan_on:  # a NaN discriminator poisons the next steps and must not be saved either
            nan_guard.update(d_loss, step + 1)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
            counts[k] = counts.get(k, 0) + 1  # the GAN terms exist only once the discriminator is on
        n_steps += 1
        done = step + 1
        pbar.update(1)

        is_log = done % args.log_every == 0 or done == args.steps
        is_ckpt = done % args.ckpt_every == 0 or done == args.steps
        stopped = stop.should_stop(env, done)
        if is_log or is_ckpt or stopped:  # never log or save past a non-finite loss
            nan_guard.check(env, ckpt_path, "Resume with --resume and a lower --lr, or --precision fp32.")
        if is_log:
            keys = sorted(sums)
            means = torch.stack([sums[k] / counts[k] for k in keys])
            record = {"step": done, **dict(zip(keys, env.all_reduce_mean(means).tolist())),
                      "img_per_s": n_steps * args.batch_size / (time.time() - t0),
                      "skipped_files": count_skipped(dataset, env)}
            log.log(record)
            pbar.set_postfix_str(fmt_metrics({k: record[k] for k in keys if k in ("loss", "l1", "lpips", "sp")}))
            sums, counts, n_steps, t0 = {}, {}, 0, time.time()
        if env.is_main and (done % args.grid_every == 0 or done == args.steps):
            save_recon_grid(done)
        if is_ckpt or stopped:
            save(done)
        if stopped:
            log.info(f"stopped at step {done}; continue with --resume")
            break
    pbar.close()
    stop.restore()
    if not stopped:
        export()
    skipped = count_skipped(dataset, env)
    if skipped:
        log.info(f"{skipped} unreadable image files were skipped (see the warnings above)")
    env.barrier()


# ----------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(args, env):
    """PSNR, SSIM and LPIPS (and rFID with --rfid) of the reconstructions of a held-out image set,
    all measured on the 8-bit images, as reconstructions are saved and as everyone reports them."""
    import fid

    path = args.tokenizer or os.path.join(args.run_dir, "stage3", "tokenizer.pt")
    model = load_tokenizer(path).to(env.device)
    log = Logger(env)
    bf16 = use_bf16(args.precision, env.device)
    dataset = build_dataset(args.data, model.config["image_size"], demo_images=args.demo_images)
    if args.eval_images:
        dataset = torch.utils.data.Subset(dataset, range(min(args.eval_images, len(dataset))))
    lpips = build_lpips(args.vgg_ckpt, random_backbone=args.random_lpips).to(env.device)
    inception = (fid.load_inception(args.inception_ckpt, args.random_inception, env.device) if args.rfid else None)
    totals = torch.zeros(4, device=env.device, dtype=torch.float64)  # sums of psnr, ssim, lpips; count
    features = {"real": [], "recon": []}  # Inception pool features of this rank's images
    for images, _ in tqdm(eval_loader(dataset, args.eval_batch_size, env, args.num_workers),
                          disable=not env.is_main, desc="eval"):
        x = to_model_range(images, env.device)
        real = to_uint8(x)  # the same 8-bit image, now on the device
        with autocast(env.device, bf16):
            x_hat, _ = model(x)
        recon = to_uint8(x_hat)
        totals[0] += fid.psnr(real, recon).sum()
        totals[1] += fid.ssim(real, recon).sum()
        totals[2] += lpips(recon.float() / 127.5 - 1, x).sum()
        totals[3] += len(images)
        if inception is not None:
            for name, batch in (("real", real), ("recon", recon)):
                features[name].append(torch.from_numpy(fid.compute_activations([batch], inception, progress=False)[0]))
    if env.distributed:
        torch.distributed.all_reduce(totals)
    n = totals[3].item()
    metrics = {"tokenizer": path, "images": int(n), "psnr": totals[0].item() / n, "ssim": totals[1].item() / n,
               "lpips": totals[2].item() / n, "lpips_backbone": "RANDOM" if args.random_lpips else "vgg16",
               "encoder": model.config["encoder"] + (" (grown from RANDOM weights)" if model.random_encoder else ""),
               "skipped_files": count_skipped(dataset, env)}
    if inception is not None:
        # eval_loader gave rank r the images r, r + W, ...: gather_rows restores the dataset order.
        real, recon = (fid.gather_rows(torch.cat(features[k]), env, interleaved=True).numpy() for k in ("real", "recon"))
        metrics["rfid"] = fid.FIDStatistics.from_features(recon).frechet_distance(fid.FIDStatistics.from_features(real))
        metrics["inception_weights"] = inception.weights_name
    log.info(json.dumps(metrics, indent=1))
    if args.json and env.is_main:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=1)
    return metrics


def main(argv=None):
    args = parse_args(argv)
    env = setup_distributed(args.device)
    result = evaluate(args, env) if args.eval else train(args, env)  # DDP modules live and die inside
    cleanup_distributed()
    return result


if __name__ == "__main__":
    main()
