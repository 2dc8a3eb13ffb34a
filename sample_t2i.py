"""Text-to-image sampling: a train_t2i.py model draws prompts at one of its buckets with sample.py's
machinery, guided against the empty caption; an .npz's arr_1 holds each sample's prompt line.

  python sample_t2i.py --ckpt runs/t2i/ckpt.pt --prompt "a red disc on the left" --size 224x288
  torchrun --nproc_per_node=8 sample_t2i.py --prompts coco.txt --npz --clip_model CLIP
  python sample_t2i.py --score samples.npz --prompts coco.txt --clip_model CLIP   # no sampling
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
    sample.add_args(p, "runs/t2i/ckpt.pt", labels=False)
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="the caption to draw (--num_samples times)")
    prompts.add_argument("--prompts", metavar="FILE", help="captions, one per line, cycled")
    p.add_argument("--size", help="HxW, one of the model's buckets (default: the square one)")
    p.add_argument("--text_encoder", help="a local copy of the checkpoint's text encoder")
    p.add_argument("--clip_model", help="CLIP score of the samples (openai/clip-vit-large-patch14)")
    p.add_argument("--score", metavar="NPZ", help="only the CLIP score of this .npz of samples")
    a = p.parse_args(argv)
    if (a.score or a.clip_model) and not (a.clip_model and a.prompts and (a.npz or a.score)):
        p.error("the CLIP score needs --clip_model, the --prompts FILE and --npz (or --score NPZ)")
    return a


def t2i_sampler(args, env) -> sample.Sampler:
    prompts = read_prompts(args.prompts) if args.prompts else [args.prompt]
    sample.output_defaults(args, args.prompts and prompts)  # each line once, or 16 (50K)
    model, tokenizer, meta = sample.load_models(args.ckpt, args.tokenizer, not args.raw_weights,
                                                kind="t2i", build=build_t2i)
    args.size = parse_size(args.size, meta["buckets"])
    text = TextEncoder(args.text_encoder or meta["text_encoder"], meta["max_length"], env.device,
                       torch.bfloat16 if use_bf16(args.precision, env.device) else torch.float32)
    if text.dim != (dim := meta["model_args"]["text_dim"]):  # now, not as a shape error later
        raise UserError(f"{text.name} gives {text.dim}-d states, but the model in {args.ckpt} was "
                        f"trained on {dim}-d ones: --text_encoder {meta['text_encoder']}")
    shape = (model.in_channels, *(s // meta["latent_factor"] for s in args.size))  # (C, h, w)
    return sample.Sampler(args, env, model, tokenizer, meta, shape,
                          lambda indices: torch.tensor(indices) % len(prompts),  # line i mod N
                          lambda lines: (text([prompts[i] for i in lines], warn=True),
                                         text([""] * len(lines))),  # and the empty caption's
                          prompts=prompts, size=list(args.size), text_encoder=text.name)


def main(argv=None):
    args = parse_args(argv)
    env = setup_distributed(args.device)
    path = result = args.score or sample.run(t2i_sampler(args, env), Logger(env).info)
    if args.clip_model and env.is_main:
        result = clip_score_npz(path, args.prompts, args.clip_model, env.device)
        save_json(result, os.path.join(os.path.dirname(os.path.abspath(path)), "clip_score.json"))
        print(f"CLIP score {result['clip_score']:.3f} ({args.clip_model}) of {path}")
    cleanup_distributed()
    return result


if __name__ == "__main__":
    script_main(main)
