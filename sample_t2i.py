"""Text-to-image sampling: a model of train_t2i.py draws images of prompts at one of its buckets,
with sample.py's solvers, per-sample seeds and resumable --npz shards. Guidance compares each
prompt with the empty caption (training's caption dropout). --clip_model: the CLIP score.

  python sample_t2i.py --ckpt runs/t2i/ckpt.pt --prompt "a red disc on the left" --size 224x288
  torchrun --nproc_per_node=8 sample_t2i.py --prompts coco.txt --npz --clip_model CLIP
  python sample_t2i.py --score samples.npz --prompts coco.txt --clip_model CLIP   # no sampling

`--prompts FILE` cycles the file's lines over the samples; the .npz's arr_1 holds each sample's
line number, which the CLIP score reads back.
"""

import argparse
import os

import torch

import sample
from captions import parse_size
from common import (HelpFormatter, Logger, UserError, cleanup_distributed, save_json, script_main,
                    setup_distributed, use_bf16)
from t2i import build_t2i
from text import TextEncoder, clip_score_npz, read_prompts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sample.add_model_args(p, "runs/t2i/ckpt.pt")
    sample.add_output_args(p)
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", help="the caption to draw (--num_samples times)")
    prompts.add_argument("--prompts", metavar="FILE", help="captions, one per line, cycled")
    p.add_argument("--size", help="HxW, one of the model's buckets, e.g. 224x288 (default: the "
                   "square one)")
    p.add_argument("--text_encoder", help="a local copy of the checkpoint's text encoder "
                   "(default: the name it gives)")
    p.add_argument("--clip_model", help="CLIP score of the --npz samples with their --prompts "
                   "(e.g. openai/clip-vit-large-patch14)")
    p.add_argument("--score", metavar="NPZ", help="only the CLIP score of this .npz of samples")
    args = p.parse_args(argv)
    if args.score and not (args.clip_model and args.prompts):
        p.error("--score needs --clip_model and the --prompts FILE it was sampled from")
    if args.clip_model and not (args.prompts and (args.npz or args.score)):
        p.error("--clip_model scores an .npz of --prompts FILE: add --npz (or --score NPZ)")
    if not (args.prompt or args.prompts):
        p.error("give --prompt TEXT or --prompts FILE")
    return args


def t2i_sampler(args, env) -> sample.Sampler:
    """The model at the --size bucket, its text encoder, and sample i's prompt: line i mod N."""
    model, tokenizer, meta = sample.load_models(args.ckpt, args.tokenizer, not args.raw_weights,
                                                kind="t2i", build=build_t2i)
    sizes = [tuple(s) for s in meta["buckets"]]
    args.size = parse_size(args.size, sizes) if args.size else sizes[len(sizes) // 2]
    dtype = torch.bfloat16 if use_bf16(args.precision, env.device) else torch.float32
    text = TextEncoder(args.text_encoder or meta["text_encoder"], meta["max_length"], env.device,
                       dtype)
    if text.dim != meta["model_args"]["text_dim"]:  # now, not as a shape error in the first batch
        raise UserError(f"the text encoder {text.name} gives {text.dim}-d states, but the model in "
                        f"{args.ckpt} was trained on {meta['model_args']['text_dim']}-d ones (from "
                        f"{meta['text_encoder']}): pass that encoder (--text_encoder)")
    shape = (model.in_channels, *(s // meta["latent_factor"] for s in args.size))  # (C, h, w)

    def labels(indices):  # each sample's prompt line
        return torch.tensor([i % len(args.prompts) for i in indices], dtype=torch.long)

    def conditions(lines):  # the prompts' (states, mask), and the empty caption's
        return text([args.prompts[i] for i in lines], warn=True), text([""] * len(lines))

    return sample.Sampler(args, env, model, tokenizer, meta, shape, labels, conditions,
                          prompts=args.prompts, size=list(args.size), text_encoder=text.name)


def main(argv=None):
    args = parse_args(argv)
    args.prompt_file, args.prompts = args.prompts, (read_prompts(args.prompts) if args.prompts
                                                    else [args.prompt])
    if args.num_samples is None:  # a prompt file's lines once each, or 16 (50K) of one prompt
        args.num_samples = len(args.prompts) if args.prompt_file else (50_000 if args.npz else 16)
    args.out = args.out or sample.default_out(args)
    env = setup_distributed(args.device)
    log = Logger(env).info
    path = args.score or sample.run(t2i_sampler(args, env), log)
    result = None
    if args.clip_model and env.is_main:
        result = clip_score_npz(path, args.prompt_file, args.clip_model, env.device)
        save_json(result, os.path.join(os.path.dirname(os.path.abspath(path)), "clip_score.json"))
        log(f"CLIP score {result['clip_score']:.3f} ({args.clip_model}) of {path}")
    cleanup_distributed()
    return result if args.clip_model else path


if __name__ == "__main__":
    script_main(main)
