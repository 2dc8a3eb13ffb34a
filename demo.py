"""The whole method end to end on the built-in demo set, small enough for a laptop CPU:

    tokenizer stage 1 -> stage 2 -> stage 3 -> reconstruction metrics
    -> latent extraction -> LightningDiT training -> sampling with CFG -> FID against the data

    python demo.py           # about 10 minutes on 2 CPU cores; everything under runs/
    python demo.py --tiny    # the same pipeline, smaller (about 2 minutes; what the tests run)

Each step is the real command-line script, run in a subprocess and printed first, so any step can be
re-run by hand or scaled up to ImageNet (README, "Reproducing the ImageNet 256 results"). Running the
demo again continues where it stopped: finished training stages are resumed (and only re-exported),
the quick steps (evaluation, latent extraction, grid, FID) run again.

Pretrained weights are used when they are in the torch.hub cache ($TORCH_HOME/hub/checkpoints):
DINOv2 ViT-S/14 as the encoder, VGG16 for LPIPS, the FID Inception. Without them (no internet), the
demo says so and uses random stand-ins: a small random encoder, a random LPIPS backbone and a random
Inception. The pipeline then runs exactly the same code, but its numbers mean nothing about the method.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import torch

# Sizes: (images, image size, tokenizer steps per stage, DiT width/depth/steps, samples for FID)
PRESETS = {
    "demo": dict(images=256, image_size=48, tok_steps=(100, 60, 40), tok_batch=8, dit_hidden=128, dit_depth=4,
                 dit_steps=600, dit_batch=64, samples=128, sample_steps=30),
    "tiny": dict(images=32, image_size=32, tok_steps=(4, 2, 2), tok_batch=4, dit_hidden=32, dit_depth=1,
                 dit_steps=20, dit_batch=8, samples=8, sample_steps=4),
}


def cached(url: str) -> bool:
    """Is this pretrained file in the torch.hub cache (where the scripts look first)?"""
    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url)))


def run(cmd: list[str], log_path: str):
    """Run one pipeline step, echoing the command; its output goes to the console and a log file."""
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    start = time.time()
    with open(log_path, "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"step failed (exit {proc.returncode}); its output is in {log_path}")
    print(f"  done in {time.time() - start:.0f} s (output: {log_path})", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs", help="output folder (default runs/, where sample.py looks)")
    p.add_argument("--tiny", action="store_true", help="a smaller, faster pipeline (for tests)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from data import DemoShapes
    from inception import FID_WEIGHTS_URL
    from tokenizer import VGG16_URL, dinov2_url

    cfg = PRESETS["tiny" if args.tiny else "demo"]
    out = args.out
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "demo.log")
    py = sys.executable
    # Few, small images: loading them in the main process is faster than feeding worker processes.
    common = ["--device", args.device, "--num_workers", "0"]
    t_start = time.time()

    # Which pretrained weights are available offline; random stand-ins (loudly) otherwise.
    real_encoder = not args.tiny and cached(dinov2_url("dinov2_vits14"))
    weights = (["--encoder", "dinov2_vits14"] if real_encoder else ["--encoder", "tiny", "--random_encoder"])
    weights += [] if cached(VGG16_URL) and not args.tiny else ["--random_lpips"]
    fid_weights = [] if cached(FID_WEIGHTS_URL) and not args.tiny else ["--random_inception"]
    print("encoder:", "DINOv2 ViT-S/14 (pretrained, from the torch.hub cache)" if real_encoder else
          "a small RANDOM ViT (no dinov2_vits14_pretrain.pth in the torch.hub cache)")
    print("LPIPS:", "pretrained VGG16" if "--random_lpips" not in weights else "RANDOM VGG16 backbone")
    print("FID Inception:", "pretrained" if not fid_weights else "RANDOM (the FID below is meaningless)")

    # The data: the procedurally drawn demo set, written once as an ImageFolder (one folder per class).
    data = os.path.join(out, "demo_data")
    if not os.path.isdir(data):
        DemoShapes(cfg["images"], cfg["image_size"], num_classes=4).save(data)
    print(f"data: {cfg['images']} images of 4 classes, {cfg['image_size']} px, in {data}")

    # 1. The tokenizer, three stages (each starts from the previous stage's export).
    tok_dir = os.path.join(out, "tokenizer")
    arch = ["--image_size", str(cfg["image_size"]), "--decoder_ch", "32", "--decoder_res_blocks", "1",
            "--disc_ch", "32"]
    for stage, steps in zip((1, 2, 3), cfg["tok_steps"]):
        resume = ["--resume"] if os.path.exists(os.path.join(tok_dir, f"stage{stage}", "ckpt.pt")) else []
        run([py, "train_tokenizer.py", "--stage", str(stage), "--data", data, "--run_dir", tok_dir,
             "--steps", str(steps), "--batch_size", str(cfg["tok_batch"]), "--lr", "2e-4", "--ema_decay", "0.9",
             "--log_every", "10", "--grid_every", str(steps), *arch, *weights, *common, *resume], log_path)
    tokenizer = os.path.join(tok_dir, "stage3", "tokenizer.pt")
    recon_json = os.path.join(tok_dir, "eval.json")
    run([py, "train_tokenizer.py", "--eval", "--tokenizer", tokenizer, "--data", data, "--eval_images", "64",
         "--json", recon_json, *[w for w in weights if w == "--random_lpips"], *common], log_path)

    # 2. Latents of the stage-2 tokenizer (stage 3 does not change them), then the LightningDiT.
    latents, dit_dir = os.path.join(out, "latents"), os.path.join(out, "dit")
    run([py, "train_dit.py", "--extract", "--tokenizer", os.path.join(tok_dir, "stage2", "tokenizer.pt"),
         "--data", data, "--latents", latents, "--batch_size", "64", *common], log_path)
    resume = ["--resume"] if os.path.exists(os.path.join(dit_dir, "ckpt.pt")) else []
    steps = cfg["dit_steps"]
    run([py, "train_dit.py", "--latents", latents, "--run_dir", dit_dir, "--model", "B/1",
         "--hidden_size", str(cfg["dit_hidden"]), "--depth", str(cfg["dit_depth"]), "--num_heads", "4",
         "--steps", str(steps), "--batch_size", str(cfg["dit_batch"]), "--lr", "5e-4", "--ema_decay", "0.99",
         "--log_every", "50", "--grid_every", str(steps), "--grid_cfg", "1.5", *common, *resume], log_path)

    # 3. Samples with classifier-free guidance, decoded by the stage-3 tokenizer; then FID.
    ckpt, samples = os.path.join(dit_dir, "ckpt.pt"), os.path.join(out, "samples")
    sample_args = ["--ckpt", ckpt, "--tokenizer", tokenizer, "--cfg", "1.5", "--steps", str(cfg["sample_steps"]),
                   "--device", args.device]
    run([py, "sample.py", *sample_args, "--classes", "0,1,2,3,0,1,2,3", "--out", samples], log_path)
    run([py, "sample.py", *sample_args, "--npz", "--num_samples", str(cfg["samples"]), "--out", samples],
        log_path)
    fid_json = os.path.join(out, "fid.json")
    run([py, "fid.py", os.path.join(samples, "samples.npz"), data, "--json", fid_json, *fid_weights,
         "--device", args.device, "--num_workers", "0"], log_path)

    recon, fid = json.load(open(recon_json)), json.load(open(fid_json))
    print(f"\nDone in {(time.time() - t_start) / 60:.1f} min. Outputs:")
    print(f"  reconstructions (top: input, bottom: tokenizer): {os.path.join(tok_dir, 'stage3')}/recon_*.png")
    print(f"  reconstruction metrics: {recon_json}  (PSNR {recon['psnr']:.2f} dB, SSIM {recon['ssim']:.3f}, "
          f"LPIPS {recon['lpips']:.3f})")
    print(f"  LightningDiT samples during training: {dit_dir}/samples_*.png")
    print(f"  sample grid (cfg 1.5): {samples}/grid_cfg1.5_steps{cfg['sample_steps']}.png")
    print(f"  {cfg['samples']} samples for FID: {samples}/samples.npz")
    print(f"  FID against the demo data: {fid_json}  (FID {fid['fid']:.2f}, {fid['inception_weights']} Inception)")
    print(f"  every step's output: {log_path}")
    return {"recon": recon, "fid": fid}


if __name__ == "__main__":
    main()
