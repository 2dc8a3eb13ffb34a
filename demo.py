"""The whole method end to end on the built-in demo set, on a laptop CPU (the README says what it
shows), each step the real script, its output also in runs/demo.log; run again, it resumes.

    python demo.py         # about 10 minutes on 2 CPU cores; everything under runs/
    python demo.py --tiny  # the same, tiny and meaningless (about a minute; what the tests run)
    python demo.py --t2i   # the tokenizer, then a text-to-image model on the demo captions
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

from common import HelpFormatter, MissingWeightsError, atomic_write, pretrained_file, read_log
from data import DemoShapes
from inception import FID_WEIGHTS_URL
from tokenizer import VGG16_URL, dinov2_url

# Sizes and schedules: images, tokenizer steps per stage, DiT width/depth/steps, FID samples.
PRESETS = {"demo": dict(images=256, image_size=32, tok_steps=(1200, 600, 300), tok_batch=16,
                        dit_hidden=128, dit_depth=4, dit_steps=3000, dit_batch=64, samples=128,
                        sample_steps=250, t2i_steps=1500, t2i_batch=32),
           "tiny": dict(images=32, image_size=32, tok_steps=(4, 2, 2), tok_batch=4, dit_hidden=32,
                        dit_depth=1, dit_steps=20, dit_batch=8, samples=8, sample_steps=4,
                        t2i_steps=4, t2i_batch=8)}
# The text-to-image demo's prompts: combinations that may or may not be in the 256 training images.
PROMPTS = ["a red disc in the centre, light background", "a blue ring on the left, dark background",
           "a green square on the right, light background",
           "a yellow triangle in the centre, dark background"]


def run(log_path: str, cmd: str, *paths: str, result=None, run_dir=None):
    """Run `python CMD PATHS` (CMD split at spaces; --resume if run_dir has a checkpoint), output to
    the console and the log file, then a one-line result: `result()`, or run_dir's last losses."""
    resume = run_dir and os.path.exists(os.path.join(run_dir, "ckpt.pt"))
    argv = [sys.executable, *cmd.split(), *paths] + ["--resume"] * bool(resume)
    print(f"\n$ {shlex.join(argv)}", flush=True)
    start = time.time()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            log.write(chunk)
    if proc.wait():
        sys.exit(f"step failed (exit {proc.returncode}): see its output above, also in {log_path}")
    record = read_log(os.path.join(run_dir, "log.jsonl"))[-1] if run_dir else {}
    text = result() if result else ", ".join(f"{k} {record[k]:.4f}" for k in
                                             ("loss", "l1", "lpips", "sp", "mse") if k in record)
    print(f"==> done in {time.time() - start:.0f} s" + (text and f": {text}"), flush=True)


def pretrained(tiny: bool) -> list[bool]:
    """Is each pretrained file in the torch.hub cache, or can it be downloaded? Not for --tiny."""
    found = []
    for use, url, what, stand_in in [
            ("encoder", dinov2_url("dinov2_vits14"), "DINOv2 ViT-S/14", "a small RANDOM ViT"),
            ("LPIPS", VGG16_URL, "VGG16", "off (a random VGG16 measures nothing)"),
            ("FID", FID_WEIGHTS_URL, "Inception", "a RANDOM Inception (a meaningless FID)")]:
        try:
            found.append(not tiny and bool(pretrained_file(url, None, what, "")))
        except MissingWeightsError:
            found.append(False)
        print(f"{use}:", f"{what} (pretrained)" if found[-1] else stand_in)
    return found


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default="runs", help="output folder (sample.py looks in runs/)")
    p.add_argument("--tiny", action="store_true", help="tiny, fast and meaningless (for tests)")
    p.add_argument("--t2i", action="store_true", help="a text-to-image model after the tokenizer")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg, out = PRESETS["tiny" if args.tiny else "demo"], args.out
    log, t_start = os.path.join(out, "demo.log"), time.time()
    common = f"--device {args.device} --num_workers 0"  # few small images: no worker processes
    real_encoder, real_vgg, real_inception = pretrained(args.tiny)
    data = os.path.join(out, "demo_data")  # written once (making out/), a subfolder per class
    if not os.path.isdir(data):
        DemoShapes(cfg["images"], cfg["image_size"], num_classes=4).save(data)
    print(f"data: {cfg['images']} images of 4 classes, {cfg['image_size']} px, in {data}")

    # 1. The tokenizer, three stages (each from the previous stage's export), then its metrics.
    tok_dir = os.path.join(out, "tokenizer")
    encoder = "--encoder dinov2_vits14" if real_encoder else "--encoder tiny --random_encoder"
    lpips = "" if real_vgg else "--lpips_weight 0"  # a random VGG measures nothing
    for stage, steps in zip((1, 2, 3), cfg["tok_steps"]):
        run(log, f"train_tokenizer.py --stage {stage} --steps {steps} --batch_size "
            f"{cfg['tok_batch']} --lr 2e-3 --betas 0.9 0.99 --ema_decay 0.99 --log_every 50 "
            f"--grid_every {steps} --image_size {cfg['image_size']} --decoder_ch 32 "
            f"--decoder_res_blocks 1 --disc_ch 32 {encoder} {lpips} {common}", "--data", data,
            "--run_dir", tok_dir, run_dir=os.path.join(tok_dir, f"stage{stage}"))
    recon_json = os.path.join(tok_dir, "eval.json")
    run(log, f"train_tokenizer.py --eval --eval_images 64 {'' if real_vgg else '--random_lpips'} "
        f"{common}", "--tokenizer", os.path.join(tok_dir, "stage3", "tokenizer.pt"), "--data", data,
        "--json", recon_json, result=lambda: "PSNR {psnr:.2f} dB, SSIM {ssim:.3f}, LPIPS "
        "{lpips:.3f} ({lpips_backbone} backbone)".format(**json.load(open(recon_json))))
    stage2 = os.path.join(tok_dir, "stage2", "tokenizer.pt")  # its latents; stage 3 keeps them
    if args.t2i:  # 2'. a tiny text-to-image model on them, samples of PROMPTS
        from text import save_random_text_encoder

        t5, run_dir = os.path.join(out, "text_encoder"), os.path.join(out, "t2i")
        if not os.path.isdir(t5):
            save_random_text_encoder(t5)
        print(f"text encoder: a small RANDOM byte-level T5 in {t5}")
        run(log, f"train_t2i.py --max_length 64 --model T2I-tiny/1 --steps {cfg['t2i_steps']} "
            f"--batch_size {cfg['t2i_batch']} --lr 1e-3 --ema_decay 0.995 --stats_samples "
            f"{cfg['images']} --log_every 100 --grid_every {cfg['t2i_steps']} {common}",
            "--captions", data, "--text_encoder", t5, "--tokenizer", stage2, "--run_dir",
            run_dir, run_dir=run_dir)
        prompts = os.path.join(out, "demo_prompts.txt")
        atomic_write(prompts, lambda f: f.write("\n".join(PROMPTS).encode() + b"\n"))
        run(log, f"sample_t2i.py --num_samples 16 --cfg 4 --steps 50 --device {args.device}",
            "--ckpt", os.path.join(run_dir, "ckpt.pt"), "--prompts", prompts)  # guided against ""
        print(f"\nDone in {(time.time() - t_start) / 60:.1f} min. Look at:\n  samples of the "
              f"prompts in {prompts}, in turn: {run_dir}/samples/grid_cfg4_steps50.png\n"
              f"  loss curves: {run_dir}/curves.png; every step's output: {log}")
        return

    # 2. The stage-2 tokenizer's latents, then the LightningDiT.
    latents, dit_dir = os.path.join(out, "latents"), os.path.join(out, "dit")
    run(log, f"train_dit.py --extract --batch_size 64 {common}", "--tokenizer", stage2, "--data",
        data, "--latents", latents)
    run(log, f"train_dit.py --model B/1 --hidden_size {cfg['dit_hidden']} "
        f"--depth {cfg['dit_depth']} --num_heads 4 --steps {cfg['dit_steps']} --ema_decay 0.995 "
        f"--batch_size {cfg['dit_batch']} --lr 1e-3 --grid_every {cfg['dit_steps']} --grid_cfg 1.5 "
        f"--log_every 100 {common}", "--latents", latents, "--run_dir", dit_dir, run_dir=dit_dir)

    # 3. Samples with guidance (decoded by the stage-3 tokenizer, beside the checkpoint), then FID.
    ckpt, samples = os.path.join(dit_dir, "ckpt.pt"), os.path.join(dit_dir, "samples")
    sampling = f"sample.py --cfg 1.5 --steps {cfg['sample_steps']} --device {args.device}"
    run(log, f"{sampling} --classes 0,1,2,3 --num_samples 16", "--ckpt", ckpt)
    fid_dir, fid_json = os.path.join(samples, "fid"), os.path.join(out, "fid.json")
    run(log, f"{sampling} --npz --num_samples {cfg['samples']}", "--ckpt", ckpt, "--out", fid_dir)
    run(log, f"fid.py {'' if real_inception else '--random_inception'} {common}",
        os.path.join(fid_dir, "samples.npz"), data, "--json", fid_json, result=lambda:
        "FID {fid:.2f} ({inception_weights} Inception)".format(**json.load(open(fid_json))))
    print(f"\nDone in {(time.time() - t_start) / 60:.1f} min. Look at:\n"
          f"  reconstructions (top: input, bottom: tokenizer): {tok_dir}/stage3/recon_*.png\n"
          f"  samples, 4 per class: {samples}/grid_cfg1.5_steps{cfg['sample_steps']}.png\n"
          f"  loss curves: {tok_dir}/stage*/curves.png, {dit_dir}/curves.png\n"
          f"  metrics: {recon_json}, {fid_json}; every step's output: {log}\n"
          f"Then, for more samples: python sample.py --cfg 1.5 --ckpt {ckpt}")


if __name__ == "__main__":
    main()
