"""Speed benchmarks of every part of the method on the device present: the training steps of the
tokenizer, the LightningDiT and the text-to-image model, sampling, and FID features next to
pytorch-fid's; images/s, peak memory, the first step's time (compiling included) and on CUDA the
model FLOPs utilisation (MFU): model FLOP/s over the GPU's dense bf16 peak.

    python bench.py                            # all parts; CUDA if present, else small CPU configs
    python bench.py --part dit --vs_official ~/LightningDiT  # ours and the official code, same step
    python bench.py --part dit --batch_size 64 128 256       # a batch-size sweep
    python bench.py --part dit --compile off --precision fp32 --no_fused --attention math  # plain
    python bench.py --part t2i --compile regional       # each block compiled: a faster first step
    python bench.py --part tokenizer --profile out/     # + torch.profiler tables and Chrome traces
    python bench.py --part dit --part t2i --max_batch --memory_gib 80   # largest batch in 80 GB

Timing: --warmup steps untimed, then the median of --repeats blocks of --iters steps, CUDA
synchronised around each. Model FLOPs: common.forward_flops; a training step is 3 forwards, sampling
(steps - 1) per image, two with CFG; the tokenizer's step is counted by torch's FlopCounterMode.
--vs_official PATH times a checkout of github.com/hustvl/LightningDiT (it needs timm and einops)
in the same process and protocol: its XL/1 as its config trains it, foreach AdamW and its
train.py's per-parameter EMA loop.
"""

import argparse
import contextlib
import gc
import json
import os
import resource
import statistics
import sys
import time
import types
from functools import partial

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import dit
import sample
import t2i
from common import (EMA, PEAK_BF16_FLOPS, DistEnv, HelpFormatter, autocast, cleanup_distributed,
                    forward_flops, unwrap, use_bf16, use_compile)
from data import to_model_range
from fsdp import parallelize
from tokenizer import (AlignedTokenizer, PatchGAN, build_lpips, hinge_d_loss, semantic_reference,
                       set_trainable, tokenizer_loss)

# Default sizes: the paper's on CUDA; small ones on CPU so everything finishes in about a minute.
CONFIGS = {
    "cuda": dict(dit="XL/1", dit_kw=dict(input_size=16, in_channels=32), latent=(32, 16, 16),
                 tok={}, image_size=256, t2i="T2I-2B/1", t2i_text=(128, 4096),
                 batch=dict(dit=128, tokenizer=32, sample=128, fid=250, t2i=32, t2i_e2e=32)),
    "cpu": dict(dit="B/1", dit_kw=dict(input_size=8, in_channels=32, hidden_size=128, depth=2,
                                       num_heads=4), latent=(32, 8, 8),
                tok=dict(encoder="tiny", decoder_ch=32, decoder_res_blocks=1), image_size=64,
                t2i="T2I-tiny/1", t2i_text=(16, 64),
                batch=dict(dit=8, tokenizer=2, sample=8, fid=4, t2i=4, t2i_e2e=4)),
}
# t2i_e2e's frozen text encoder, random weights: T5-XXL's encoder (4.8B parameters) on CUDA.
CONFIGS["cuda"]["t5"] = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
CONFIGS["cpu"]["t5"] = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)


def compiled(model, args, device, **compile_kwargs):
    """The model as --compile asks: whole (on; auto: on CUDA), eager (off), or regional: each
    block of its block lists compiled, embeddings, final layer and loss eager. The blocks of one
    class share one compiled graph (their weights are its inputs): the first step compiles one."""
    if args.compile != "regional":
        return torch.compile(model) if use_compile(args.compile, device) else model
    for blocks in model.children():
        if isinstance(blocks, nn.ModuleList):
            for block in blocks:
                block.compile(**compile_kwargs)
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_memory(device):
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def clock(fn, device, n=1):
    """Seconds per call of fn over n calls, CUDA synchronised around them."""
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - start) / n


def timed(step, device, args, profile=None, warmup=None, iters=None):
    """(median seconds per call of `step`, seconds of the first call or None). With --profile DIR:
    two more calls' operator table (by GPU time on CUDA) and Chrome trace to DIR/PROFILE.*."""
    warmup = args.warmup if warmup is None else warmup
    first = clock(step, device) if warmup else None
    for _ in range(warmup - 1):
        step()
    times = [clock(step, device, iters or args.iters) for _ in range(args.repeats)]
    if profile and args.profile:
        cuda, path = device.type == "cuda", os.path.join(args.profile, profile)
        kind = torch.profiler.ProfilerActivity
        with torch.profiler.profile(activities=[kind.CPU] + [kind.CUDA] * cuda) as prof:
            clock(step, device, 2)
        os.makedirs(args.profile, exist_ok=True)
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        with open(path + ".txt", "w") as f:
            f.write(f"2 steps; {sort}\n" + prof.key_averages().table(
                sort_by=sort, row_limit=80, max_name_column_width=120))
        prof.export_chrome_trace(path + ".json.gz")
        print(f"profile of 2 steps: {path}.txt, {path}.json.gz", flush=True)
    return statistics.median(times), first


def report(name, device, batch, seconds, flops_per_image=None, **extra):
    """A row of results; `seconds` per step, or timed's (seconds, first step's seconds)."""
    seconds, first = seconds if isinstance(seconds, tuple) else (seconds, None)
    cuda = device.type == "cuda"
    gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
    # On the CPU the process's peak resident memory (KiB on Linux): it never drops.
    peak = (torch.cuda.max_memory_allocated(device) if cuda else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30
    row = {"part": name, "device": gpu, "batch": batch, "img_per_s": batch / seconds,
           "ms_per_step": 1000 * seconds, "peak_mem_gib": peak, "first_step_s": first, **extra}
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)
    if flops_per_image:
        row["gflops_per_image"] = flops_per_image / 1e9
    if flops_per_image and peak_flops:
        row["mfu"] = batch / seconds * flops_per_image / peak_flops
    print(f"{name:28s} {batch / seconds:10.1f} img/s  {1000 * seconds:9.1f} ms/step  "
          f"{'peak' if cuda else 'process peak RSS'} {peak:.2f} GiB"
          + (f"  MFU {row['mfu']:.1%}" if "mfu" in row else ""), flush=True)
    return row


# --------------------------------------------------------------------------------------------------
# Parts


def train_step_seconds(name, args, device, bf16, model, inputs, ema_update, clip=False,
                       fused=True):
    """timed() of one flow-matching training step of `model` (as compiled() or parallelize gave
    it) on inputs() = (x1, condition): loss, backward, (clipping,) AdamW, EMA update."""
    params = list(unwrap(model).parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0,
                            fused=fused and not args.no_fused)

    def step():
        with autocast(device, bf16):
            loss, _ = dit.flow_matching_loss(model, *inputs())
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(unwrap(model))

    return timed(step, device, args, name)


def bench_dit(args, cfg, device, bf16, B):
    """One LightningDiT training step: flow-matching loss, backward, AdamW, EMA update; with
    --vs_official, the official model's step next to it."""
    model = dit.build_dit(cfg["dit"], **cfg["dit_kw"], grad_checkpointing=args.grad_checkpointing)
    model.to(device)
    inputs = (torch.randn(B, *cfg["latent"], device=device),
              torch.randint(0, 1000, (B,), device=device))
    flops = 3 * forward_flops(model, model.num_patches)
    sizes = {k: getattr(model, k) for k in ("depth", "hidden_size", "num_heads", "patch_size")}
    seconds = train_step_seconds(f"dit_b{B}", args, device, bf16, compiled(model, args, device),
                                 lambda: inputs, EMA(model, 0.9999).update)
    ours = report(f"dit {cfg['dit']} train", device, B, seconds, flops)
    if not args.vs_official:
        return [ours]
    del model
    reset_memory(device)
    # The official model of the same sizes, as its XL config trains it. Its models/rmsnorm.py
    # imports fairscale (unused): empty modules stand in.
    for name in ("", ".nn", ".nn.model_parallel", ".nn.model_parallel.initialize",
                 ".nn.model_parallel.layers"):
        sys.modules.setdefault("fairscale" + name, types.ModuleType("fairscale" + name))
    layers = sys.modules["fairscale.nn.model_parallel.layers"]
    layers.ColumnParallelLinear = layers.ParallelEmbedding = layers.RowParallelLinear = None
    sys.path.insert(0, os.path.abspath(args.vs_official))
    try:
        from models.lightningdit import LightningDiT
    except ImportError as e:
        raise SystemExit(f"--vs_official: cannot import {args.vs_official}/models/lightningdit.py "
                         f"({e}); it needs a checkout of hustvl/LightningDiT, timm and einops")
    finally:
        sys.path.remove(os.path.abspath(args.vs_official))
    official = LightningDiT(input_size=cfg["latent"][1], in_channels=cfg["latent"][0],
                            use_swiglu=True, use_rope=True, use_rmsnorm=True, use_qknorm=False,
                            **sizes).to(device)
    ema = {n: p.detach().clone() for n, p in official.named_parameters()}

    def official_ema(model, decay=0.9999):  # its train.py's loop: per parameter, mul_ then add_
        for name, p in model.named_parameters():
            ema[name].mul_(decay).add_(p.data, alpha=1 - decay)

    seconds = train_step_seconds(f"official_b{B}", args, device, bf16, official, lambda: inputs,
                                 official_ema, fused=False)  # foreach AdamW, as its train.py
    theirs = report("official LightningDiT train", device, B, seconds, flops)
    ours["speedup_vs_official"] = ours["img_per_s"] / theirs["img_per_s"]
    print(f"ours / official: {ours['speedup_vs_official']:.2f}x images/s, "
          f"{ours['peak_mem_gib'] / theirs['peak_mem_gib']:.2f}x peak memory", flush=True)
    return [ours, theirs]


def bench_tokenizer(args, cfg, device, bf16, B):
    """train_tokenizer.py's step in each stage, with LPIPS and the GAN on (the costliest phase):
    tokenizer loss and update, EMA, discriminator update."""
    lpips = build_lpips(random_backbone=True).to(device)  # its weights do not change its speed
    rows = []
    for stage in (1, 2, 3):
        torch.manual_seed(0)
        model = AlignedTokenizer({**cfg["tok"], "image_size": cfg["image_size"]}).to(device)
        set_trainable(model, stage)
        ref = semantic_reference(model) if stage == 2 else None
        disc = PatchGAN().to(device)
        x = torch.rand(B, 3, cfg["image_size"], cfg["image_size"], device=device) * 2 - 1
        if args.channels_last:
            model.decoder.to(memory_format=torch.channels_last)
            disc.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        if args.compile == "regional" or use_compile(args.compile, device):  # networks = regions
            for net in (model.encoder, model.decoder, disc):
                net.compile()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-4, (0.5, 0.9),
                               fused=not args.no_fused)
        opt_d = torch.optim.Adam(disc.parameters(), 1e-4, (0.5, 0.9), fused=not args.no_fused)
        ema = EMA(model, 0.999)

        def step():
            with autocast(device, bf16):
                loss, x_hat, _ = tokenizer_loss(model, x, lpips, disc, ref)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(model)
            with autocast(device, bf16):
                d_loss = hinge_d_loss(disc(x), disc(x_hat.detach()))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()

        step()  # outside the counter: compilation and lazy initialisation
        with FlopCounterMode(display=False) as counter:
            step()
        reset_memory(device)
        seconds = timed(step, device, args, f"tokenizer_stage{stage}_b{B}")
        rows.append(report(f"tokenizer stage {stage} train", device, B, seconds,
                           counter.get_total_flops() / B))
    return rows


def bench_sampling(args, cfg, device, bf16, B):
    """Sampling with CFG (one batched forward over [x; x]) at 250 and 30 steps, plus decoding. The
    30-step run is timed whole; the 250-step figure uses the per-step time measured in it."""
    model = dit.build_dit(cfg["dit"], **cfg["dit_kw"]).to(device).eval()
    tok = AlignedTokenizer({**cfg["tok"], "image_size": 16 * cfg["latent"][1]}).to(device).eval()
    net = compiled(model, args, device)
    net = two_pass(net) if args.cfg_two_pass else net
    noise = torch.randn(B, *cfg["latent"], device=device)
    y = torch.randint(0, model.num_classes, (B,), device=device)
    null = torch.full_like(y, model.num_classes)
    stats = {"mean": torch.zeros(cfg["latent"][0]), "std": torch.ones(cfg["latent"][0])}

    def run(steps=30):
        with autocast(device, bf16):
            return sample.sample_latents(net, y, noise, steps=steps, cfg_scale=1.5, null=null)

    z = run()
    t30, _ = timed(run, device, args, f"sample30_b{B}", warmup=1, iters=1)
    t_decode, _ = timed(lambda: sample.decode_to_uint8(tok, z, stats), device, args, None, 1, 1)
    flops = 2 * forward_flops(model, model.num_patches)  # per step and image: both CFG rows
    rows = []
    for steps in (250, 30):
        seconds = t30 / 29 * (steps - 1) + t_decode
        rows.append(report(f"sample cfg {steps} steps", device, B, seconds, flops * (steps - 1),
                           hours_for_50k=50_000 / (B / seconds) / 3600))
    return rows


def two_pass(model):
    """CFG as two forwards, one per half of the batch [x; x] (what batching saves)."""
    return lambda x, t, y: torch.cat([model(*half) for half in zip(x.chunk(2), (t, t), y.chunk(2))])


def bench_fid(args, cfg, device, bf16, B):
    """Inception features (always float32) of 256 px images: ours and pytorch-fid's, same weights,
    same images, alternating, best of --repeats passes each."""
    from unittest import mock

    import pytorch_fid.inception

    import fid

    ours = fid.load_inception(random_weights=True, device=device, preprocess="pytorch-fid")
    with mock.patch.object(pytorch_fid.inception, "load_state_dict_from_url",
                           lambda *_, **__: ours.state_dict()):  # our weights, not a download
        theirs = pytorch_fid.inception.InceptionV3([3]).to(device).eval()  # [3]: 2048-d pool
    images = torch.rand(B * args.iters, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    batches = images.to(device).split(B)
    # ours takes 0..255 (ADM's input), pytorch-fid 0..1: the same images, the same preprocessing
    extract = {"ours": lambda b: ours(b * 255)[0], "pytorch_fid": lambda b: theirs(b)[0].flatten(1)}
    seconds = {name: [] for name in extract}
    with torch.inference_mode(), fid.exact_float32(device):
        feats = {k: torch.cat([f(b) for b in batches]) for k, f in extract.items()}  # + warm-up
        for i in range(args.repeats):  # alternating: a drifting load hits both
            for name in list(extract) if i % 2 else list(extract)[::-1]:
                seconds[name].append(clock(lambda: [extract[name](b) for b in batches], device))
    ours_s, theirs_s = (min(seconds[k]) / len(batches) for k in extract)
    return [report("fid features", device, B, ours_s, pytorch_fid_img_per_s=B / theirs_s,
                   ratio_vs_pytorch_fid=theirs_s / ours_s,
                   max_feature_diff=(feats["ours"] - feats["pytorch_fid"]).abs().max().item())]


def bench_t2i(args, cfg, device, bf16, B, e2e=False):
    """One train_t2i.py step of the text-to-image model (2B on CUDA) on the square bucket: loss,
    backward, gradient clipping, AdamW, EMA, on random latents and text states. With `e2e`
    (t2i_e2e) the frozen tokenizer and text encoder (T5-XXL's on CUDA, random weights: no
    download) compute them in the step from uint8 images and token ids; then also the two alone,
    their share of the step. MFU counts the trained model's FLOPs."""
    (L, text_dim), (C, H, W) = cfg["t2i_text"], cfg["latent"]
    model = t2i.build_t2i(cfg["t2i"], in_channels=C, text_dim=text_dim,
                          grad_checkpointing=args.grad_checkpointing)
    flops = 3 * forward_flops(model, H * W // model.patch_size ** 2, L)
    ema = EMA(model, 0.9999)
    if args.fsdp:  # as train_t2i.py --fsdp: sharded (over one GPU here), each block compiled
        train_model = parallelize(model, ema, DistEnv(0, 0, 1, device), args)
    else:
        train_model = compiled(model.to(device), args, device)
        ema.model.to(device)
    mask = torch.arange(L, device=device).expand(B, L) < L // 2  # half of the tokens: padding
    if e2e:  # from uint8 images and token ids, by the frozen tokenizer and a random T5 encoder
        import transformers

        t5 = transformers.T5Config(**cfg["t5"], feed_forward_proj="gated-gelu", vocab_size=32128)
        with torch.device(device):
            text_encoder = transformers.T5EncoderModel(t5).to(torch.bfloat16 if bf16 else
                                                              torch.float32)
        tok = AlignedTokenizer({**cfg["tok"], "image_size": 16 * H}).to(device)
        for net in (text_encoder, tok):
            net.eval().requires_grad_(False)
        images = torch.randint(0, 256, (B, 3, 16 * H, 16 * W), dtype=torch.uint8, device=device)
        ids = torch.randint(0, t5.vocab_size, (B, L), device=device)

        @torch.no_grad()
        def encode():  # -> (latents, (text states, mask)); no latent statistics (mean 0, std 1)
            with autocast(device, bf16):
                z = tok.encode(to_model_range(images, device))
                states = text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            return z.float(), (states, mask)
    else:  # random latents and text states (precomputed, as the LightningDiT's latents)
        inputs = torch.randn(B, C, H, W, device=device), (
            torch.randn(B, L, text_dim, device=device), mask)
        encode = lambda: inputs  # noqa: E731
    seconds = train_step_seconds(f"{'t2i_e2e' if e2e else 't2i'}_b{B}", args, device, bf16,
                                 train_model, encode, ema.update, clip=True)
    extra = {"params": sum(p.numel() for p in model.parameters())}
    if e2e:
        encoders = timed(encode, device, args)[0]  # after the step: warm
        extra = dict(encoders_ms=1000 * encoders, encoders_share=encoders / seconds[0])
        print(f"frozen tokenizer + text encoder: {1000 * encoders:.1f} ms, "
              f"{extra['encoders_share']:.0%} of the step", flush=True)
    name = f"t2i {cfg['t2i']} " + ("train_t2i step" if e2e else "train")
    return [report(name, device, B, seconds, flops, **extra)]


def largest_batch(fits, start: int) -> int:
    """The largest batch b with fits(b) (assumed monotone), doubling from `start`, then bisecting to
    1/16 of it; 0 if not even 1 fits."""
    lo, hi = 0, start
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def run_part(part, args, cfg, device, bf16, batch):
    """PARTS[part]'s rows at `batch`, or None if they do not fit in GPU memory."""
    try:
        return PARTS[part](args, cfg, device, bf16, batch)
    except torch.OutOfMemoryError:
        print(f"{part}: batch {batch} does not fit in memory", flush=True)
    finally:
        reset_memory(device)


PARTS = {"dit": bench_dit, "tokenizer": bench_tokenizer, "sample": bench_sampling, "fid": bench_fid,
         "t2i": bench_t2i, "t2i_e2e": partial(bench_t2i, e2e=True)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--part", choices=sorted(PARTS), action="append",
                   help="what to measure (repeatable; default all)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--batch_size", type=int, nargs="+", help="batch(es) to measure "
                   "(several: a sweep; default: each part's own, fitting an 80 GB GPU)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 on CUDA")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off", "regional"),
                   help="torch.compile the whole model (on; auto: on CUDA), each of its blocks "
                   "(regional: a faster first step; the tokenizer: its networks), or nothing")
    p.add_argument("--fsdp", action="store_const", const="shard",
                   help="the text-to-image model sharded as by train_t2i.py --fsdp, over one GPU")
    p.add_argument("--vs_official", metavar="PATH",
                   help="a checkout of hustvl/LightningDiT to time next to ours")
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "math"),
                   help="math: PyTorch's reference attention (materialises the N x N scores)")
    for flag, help in (("--no_fused", "for-each Adam/AdamW, not fused"), ("--no_tf32", None),
                       ("--channels_last", "the tokenizer's conv nets"), ("--grad_checkpointing",
                       None), ("--cfg_two_pass", "CFG as two forwards, not one"),
                       ("--max_batch", "find the largest batch that fits (CUDA only)")):
        p.add_argument(flag, action="store_true", help=help)
    p.add_argument("--memory_gib", type=float, help="cap the GPU memory (e.g. 80 on an H200)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--iters", type=int, default=5, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (their median)")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--profile", metavar="DIR",
                   help="also profile two steps of each part: operator tables, Chrome traces")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    cfg, bf16 = CONFIGS[device.type], use_bf16(args.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not args.no_tf32
        torch.backends.cudnn.benchmark = True
        if args.memory_gib:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * 2 ** 30 / total),
                                                       device)
    elif args.max_batch:
        print("--max_batch needs CUDA (where memory runs out): skipped", flush=True)
        return []
    switches = {k: v for k, v in vars(args).items() if k not in ("part", "json")}
    print(f"device {device}, {'bf16' if bf16 else 'fp32'}; switches {switches}")
    probe = argparse.Namespace(**{**vars(args), "warmup": 1, "iters": 1, "repeats": 1,
                                  "profile": None})  # --max_batch: does a step (and one more) fit?
    rows = []
    with sdpa_kernel(SDPBackend.MATH) if args.attention == "math" else contextlib.nullcontext():
        for part in args.part or PARTS:
            if args.max_batch:
                batch = largest_batch(lambda b: run_part(part, probe, cfg, device, bf16, b)
                                      is not None, cfg["batch"][part])
                print(f"{part}: largest batch that fits: {batch}", flush=True)
                rows.append({"part": part, "max_batch": batch, "memory_gib": args.memory_gib,
                             "device": torch.cuda.get_device_name(device)})
            for batch in [] if args.max_batch else args.batch_size or [cfg["batch"][part]]:
                rows += (run_part(part, args, cfg, device, bf16, batch)  # a sweep goes on
                         or [{"part": part, "batch": batch, "out_of_memory": True}])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"switches": switches, "rows": rows}, f, indent=1)
    cleanup_distributed()  # --fsdp's process group of one
    return rows


if __name__ == "__main__":
    main()
