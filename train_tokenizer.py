"""Train the aligned tokenizer, one stage per run; tokenizer.py defines the stages and their loss.

    torchrun --nproc_per_node=8 train_tokenizer.py --stage 1 --data /imagenet/train  # then 2, 3
    python train_tokenizer.py --eval --data /imagenet/val --rfid  # PSNR, SSIM, LPIPS, rFID

Stage N starts from stage N-1's EMA weights, <run_dir>/stage{N-1}/tokenizer.pt.
"""

import argparse
import json
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

import fid
from baselines import load_tokenizer
from common import (EMA, HelpFormatter, Logger, Run, UserError, at_least, autocast,
                    check_writable, cleanup_distributed, due, in_range, micro_batches,
                    save_checkpoint, save_json, script_main, setup_distributed, use_bf16,
                    use_compile, wrap_ddp)
from data import (Batches, build_dataset, count_skipped, eval_loader, save_grid, to_model_range,
                  to_uint8)
from tokenizer import (TRAINABLE, AlignedTokenizer, PatchGAN, build_dinov2, build_lpips,
                       default_config, hinge_d_loss, semantic_reference, set_trainable,
                       tokenizer_loss)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add, mode = p.add_argument, p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--stage", type=int, choices=(1, 2, 3), help="which training stage to run")
    mode.add_argument("--eval", action="store_true", help="evaluate a tokenizer (PSNR, SSIM...)")
    add("--run_dir", default="runs/tokenizer", help="stage N writes <run_dir>/stage{N}/")
    add("--data", help="image folder (class subfolders or flat); default: built-in demo set")
    add("--demo_images", type=at_least(1), default=512, help="size of the built-in demo set")
    add("--init", help="stage 2/3: start from this tokenizer (<run_dir>/stage{N-1}/tokenizer.pt)")
    add("--resume", action="store_true", help="continue from <run_dir>/stage{N}/ckpt.pt")
    add("--encoder", help="dinov2_vit{s,b,l}14[_reg] or tiny (random) (default dinov2_vitl14)")
    add("--latent_channels", type=at_least(1), help="latent width (default 32)")
    add("--adapter_hidden", type=at_least(1), help="adapter hidden width (default: encoder's)")
    add("--image_size", type=at_least(16), help="training resolution, a multiple of 16 (256)")
    add("--decoder_ch", type=at_least(1), help="decoder base width (default 128)")
    add("--decoder_ch_mult", type=lambda s: tuple(map(at_least(1), s.split(","))),
        help="decoder width multipliers (default 1,1,2,2,4)")
    add("--decoder_res_blocks", type=at_least(1), help="per level, +1 in the decoder (default 2)")
    add("--encoder_ckpt", help="local DINOv2 .pth (default: torch.hub cache, else download)")
    add("--vgg_ckpt", help="local vgg16-397923af.pth for LPIPS (default: as above)")
    add("--random_encoder", action="store_true", help="random DINOv2 (demo and tests only)")
    add("--random_lpips", action="store_true", help="random LPIPS VGG (demo and tests only)")
    add("--steps", type=at_least(1), default=50_000, help="training steps of this stage")
    add("--batch_size", type=at_least(1), default=256, help="global (split over the ranks)")
    add("--lr", type=in_range(0, lo_open=True), default=1e-4, help="Adam's, constant (VA-VAE's)")
    add("--betas", type=in_range(0, 1, hi_open=True), nargs=2, default=(0.5, 0.9), help="Adam's")
    add("--ema_decay", type=in_range(0, 1, hi_open=True), default=0.999, help="of the exported EMA")
    add("--lpips_weight", type=in_range(0), default=1.0, help="weight of LPIPS next to L1 (0: off)")
    add("--disc_weight", type=in_range(0), default=0.5, help="scale of the adaptive GAN weight")
    add("--disc_start", type=at_least(0), help="the GAN's first step (default: 20%% of --steps)")
    add("--disc_ch", type=at_least(1), default=64, help="PatchGAN base width")
    add("--sp_weight", type=in_range(0), default=1.0, help="stage 2: weight of L_sp (3 for T2I)")
    add("--sp_loss", choices=("mse", "cosine"), default="mse", help="stage 2: form of L_sp")
    add("--grad_checkpointing", action="store_true", help="stage 2: less memory, ~30%% slower")
    add("--channels_last", action="store_true", help="channels-last layout for the conv nets")
    add("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto: CUDA if present")
    add("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="auto: bf16 on CUDA")
    add("--compile", default="auto", choices=("auto", "on", "off"), help="auto: on CUDA")
    add("--num_workers", type=at_least(0), default=8, help="data loading processes per rank")
    add("--seed", type=at_least(0), default=0, help="seeds weights, noise and data order")
    add("--log_every", type=at_least(1), default=50, help="steps between log lines")
    add("--ckpt_every", type=at_least(1), default=2000, help="steps between checkpoints")
    add("--keep_every", type=at_least(0), default=0, help="also keep ckpt_<step>.pt (0: never)")
    add("--grid_every", type=at_least(0), default=1000, help="steps between reconstruction grids")
    add("--tokenizer", help="--eval: ours (<run_dir>/stage3/tokenizer.pt), VA-VAE or diffusers VAE")
    add("--eval_images", type=at_least(1), help="evaluate on the first N images only")
    add("--eval_batch_size", type=at_least(1), default=32, help="images per forward per rank")
    add("--rfid", action="store_true", help="also rFID (needs the Inception weights)")
    add("--inception_ckpt", help="local pt_inception-2015-12-05-6726825d.pth for rFID")
    add("--random_inception", action="store_true", help="random Inception (tests only)")
    add("--json", help="write the metrics to this JSON file")
    return p.parse_args(argv)


def build_tokenizer(args, log):
    """(tokenizer, the file it starts from, random encoder?): new in stage 1, else stage N-1's."""
    arch = {k: getattr(args, k) for k in default_config()}  # the architecture flags
    if args.stage == 1:
        cfg = default_config(**arch)
        encoder = build_dinov2(cfg["encoder"], not args.random_encoder, args.encoder_ckpt)
        init, model, random_encoder = None, AlignedTokenizer(cfg, encoder), args.random_encoder
    else:
        prev = args.stage - 1
        init = os.path.abspath(args.init or os.path.join(args.run_dir, f"stage{prev}/tokenizer.pt"))
        if not os.path.isfile(init):
            raise UserError(f"{init} does not exist: run --stage {prev} first or pass --init")
        model = load_tokenizer(init)
        if model.stage != prev:
            raise UserError(f"stage {args.stage} starts from stage {prev}, but {init} comes from "
                            f"stage {model.stage}: pass --init with a stage-{prev} tokenizer.pt")
        clash = [f"--{k} {v} (checkpoint: {model.config[k]})" for k, v in arch.items()
                 if v is not None and default_config(**{k: v})[k] != model.config[k]]
        if clash:
            raise UserError(f"stage 1 fixed the architecture; {init} differs: {', '.join(clash)}")
        random_encoder = model.random_encoder or args.random_encoder
    if random_encoder:
        log(f"WARNING: the {model.config['encoder']} encoder {'grew from' if init else 'has'} "
            "RANDOM weights (--random_encoder): fine for a demo or a test, meaningless otherwise.")
    return model, init, random_encoder


def build_loss_nets(model, args, device):
    """The model on the device, and stage 2's reference, LPIPS, the PatchGAN, compiled in place."""
    ref = semantic_reference(model).to(device) if args.stage == 2 else None
    lpips = (build_lpips(args.vgg_ckpt, random_backbone=args.random_lpips).to(device)
             if args.lpips_weight else None)
    disc = PatchGAN(args.disc_ch).to(device)
    model.to(device).encoder.grad_checkpointing = args.grad_checkpointing
    if args.channels_last:
        model.decoder.to(memory_format=torch.channels_last)
        disc.to(memory_format=torch.channels_last)
    if use_compile(args.compile, device):
        for net in (model.encoder, model.decoder, disc, *([ref.encoder] if ref else [])):
            net.compile()
    return ref, lpips, disc


def train(args, env):
    torch.manual_seed(args.seed + env.rank)  # each rank its own noise
    device, bf16 = env.device, use_bf16(args.precision, env.device)
    per_rank, _ = micro_batches(args, env)  # the global batch split over the ranks
    disc_start = int(0.2 * args.steps) if args.disc_start is None else args.disc_start
    model, init, random_encoder = build_tokenizer(args, Logger(env).info)
    set_trainable(model.train(), args.stage)  # a loaded tokenizer comes in eval mode
    ref, lpips, disc = build_loss_nets(model, args, device)
    ema = EMA(model, args.ema_decay)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, args.lr, tuple(args.betas), fused=True)
    opt_d = torch.optim.Adam(disc.parameters(), args.lr, tuple(args.betas), fused=True)
    dataset = build_dataset(args.data, model.config["image_size"], hflip=True, seed=args.seed,
                            demo_images=args.demo_images)
    batches = Batches(dataset, per_rank, env, seed=args.seed, num_workers=args.num_workers)
    run_dir = os.path.join(args.run_dir, f"stage{args.stage}")
    grid_images = torch.stack([dataset[i * (len(dataset) - 1) // 7][0] for i in range(8)])
    ddp_model, ddp_disc = wrap_ddp(model, env), wrap_ddp(disc, env)
    weights = {k: getattr(args, k) for k in ("lpips_weight", "disc_weight", "sp_weight", "sp_loss")}
    identity = {"kind": "tokenizer", "stage": args.stage, "config": model.config}
    meta = {"init": init, "random_encoder": random_encoder}
    state = {"model": model, "ema": ema, "disc": disc, "opt": opt, "opt_d": opt_d, "data": batches}
    with Run(env, args, run_dir, identity=identity, state=state, meta=meta,
             skipped=lambda: count_skipped(dataset, env), show=("loss", "l1", "lpips", "sp"),
             nan_advice="Resume with --resume and a lower --lr, or --precision fp32.") as run:
        n_train, n_all = (sum(p.numel() for p in ps) for ps in (trainable, model.parameters()))
        run.logger.info(f"stage {args.stage} from {init or 'DINOv2'}: {n_train / 1e6:.1f}M of "
                        f"{n_all / 1e6:.1f}M parameters train ({', '.join(TRAINABLE[args.stage])})"
                        f"; latent {model.latent_shape}; GAN from step {disc_start}; "
                        f"{len(dataset)} images ({args.data or 'built-in demo set'})")
        data = iter(batches)
        for step in range(run.resume() if args.resume else 0, args.steps):
            x = to_model_range(next(data)[0], device)  # (B, 3, H, W) in [-1, 1]
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            gan_on = step >= disc_start
            with autocast(device, bf16):
                loss, x_hat, parts = tokenizer_loss(ddp_model, x, lpips, disc if gan_on else None,
                                                    ref, **weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(model)
            if gan_on:  # the discriminator learns to tell x from the (detached) reconstruction
                with autocast(device, bf16):
                    parts["d_loss"] = hinge_d_loss(ddp_disc(x), ddp_disc(x_hat.detach()))
                opt_d.zero_grad(set_to_none=True)
                parts["d_loss"].backward()
                opt_d.step()
            done = step + 1
            run.record(done, **parts)
            if due(args.log_every, done, args.steps):
                run.log(done, lr=opt.param_groups[0]["lr"])
            if env.is_main and due(args.grid_every, done, args.steps):  # top: input, bottom: EMA
                with torch.no_grad(), autocast(device, bf16):
                    recon = ema.model(to_model_range(grid_images, device))[0]
                path = os.path.join(run_dir, f"recon_{done:07d}.png")
                save_grid(torch.cat([grid_images, to_uint8(recon).cpu()]), path, nrow=8)
                run.logger.info(f"reconstructions (top: input, bottom: EMA tokenizer) -> {path}")
            stop = run.stop_requested(done)
            if due(args.ckpt_every, done, args.steps) or stop:
                run.save(done)
            if stop:
                break
    if env.is_main and not run.stopped:
        path = os.path.join(run_dir, "tokenizer.pt")
        save_checkpoint({**identity, **meta, "ema": ema.state_dict(), "args": vars(args)}, path)
        run.logger.info(f"exported the EMA tokenizer to {path}")
    return run


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """10 log10(255^2 / MSE) in dB of uint8 images (B, 3, H, W), per image (+inf if equal)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM (Wang et al. 2004) of uint8 images (B, 3, H, W), per image: 11x11 Gaussian window
    (sigma 1.5), c1 = (0.01 * 255)^2, c2 = (0.03 * 255)^2, mean over valid positions, channels."""
    a, b = a.double(), b.double()
    g = torch.exp(-(torch.arange(11, dtype=torch.float64, device=a.device) - 5) ** 2 / 4.5)
    window = (g[:, None] * g[None, :] / g.sum() ** 2).expand(a.shape[1], 1, 11, 11)

    def blur(x):  # local weighted means at the 'valid' positions: (B, C, H - 10, W - 10)
        return F.conv2d(x, window, groups=a.shape[1])

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
                / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
    return ssim_map.flatten(1).mean(1)


@torch.no_grad()
def evaluate(args, env):
    """PSNR, SSIM and LPIPS (and rFID with --rfid) of the reconstructions of an image set, measured
    on the 8-bit images, as reconstructions are saved and as everyone reports them."""
    path = args.tokenizer or os.path.join(args.run_dir, "stage3", "tokenizer.pt")
    if args.json and env.is_main:
        check_writable(args.json, "metrics file")
    model = load_tokenizer(path, args.image_size).to(env.device)
    dataset = build_dataset(args.data, model.config["image_size"], demo_images=args.demo_images)
    if args.eval_images:
        dataset = torch.utils.data.Subset(dataset, range(min(args.eval_images, len(dataset))))
    lpips = build_lpips(args.vgg_ckpt, random_backbone=args.random_lpips).to(env.device)
    inception = (fid.load_inception(args.inception_ckpt, args.random_inception, env.device)
                 if args.rfid else None)
    totals = torch.zeros(4, device=env.device, dtype=torch.float64)  # sums: psnr, ssim, lpips, n
    features = {"real": [], "recon": []}  # Inception pool features of this rank's images
    for images, _ in tqdm(eval_loader(dataset, args.eval_batch_size, env, args.num_workers),
                          disable=not env.is_main, desc="eval"):
        x = to_model_range(images, env.device)
        real = to_uint8(x)  # the same 8-bit images, on the device
        with autocast(env.device, use_bf16(args.precision, env.device)):
            recon = to_uint8(model(x)[0])
        lp = lpips(recon.float() / 127.5 - 1, x).double()
        totals += torch.stack([psnr(real, recon).sum(), ssim(real, recon).sum(), lp.sum(),
                               lp.new_tensor(len(x))])
        if inception is not None:
            for name, batch in (("real", real), ("recon", recon)):
                activations = fid.compute_activations(batch, inception, progress=False)[0]
                features[name].append(torch.from_numpy(activations))
    if env.distributed:
        torch.distributed.all_reduce(totals)
    sum_psnr, sum_ssim, sum_lpips, n = totals.tolist()
    encoder = model.config.get("encoder") or f"{model.config['kind']} {model.config['source']}"
    if model.random_encoder:
        encoder += " (grown from RANDOM weights)"
    metrics = {"tokenizer": path, "images": int(n), "psnr": sum_psnr / n, "ssim": sum_ssim / n,
               "lpips": sum_lpips / n, "lpips_backbone": "RANDOM" if args.random_lpips else "vgg16",
               "encoder": encoder, "skipped_files": count_skipped(dataset, env)}
    if inception is not None:  # rank order: each side's statistics do not depend on it
        recon, real = (fid.FIDStatistics.from_features(fid.gather_rows(
            torch.cat(features[k]), env).numpy()) for k in ("recon", "real"))
        metrics.update(rfid=recon.frechet_distance(real), inception_weights=inception.weights_name)
    Logger(env).info(json.dumps(metrics, indent=1))
    if args.json and env.is_main:
        save_json(metrics, args.json)
    return metrics


def main(argv=None):
    args = parse_args(argv)
    env = setup_distributed(args.device)
    result = evaluate(args, env) if args.eval else train(args, env)
    cleanup_distributed()
    return result


if __name__ == "__main__":
    script_main(main)
