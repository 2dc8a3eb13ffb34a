"""Speed benchmarks on the device present: the training steps of the tokenizer, the LightningDiT and
the text-to-image model, and sampling. Each row: images/s, peak memory, the first step's time
(compiling included), on CUDA the MFU (FLOPs from common.forward_flops; the tokenizer's by torch).

    python bench.py --part dit --vs_official ~/LightningDiT  # ours and the official code, same step
"""

import argparse
import contextlib
import gc
import os
import resource
import statistics
import sys
import time
from unittest import mock

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import dit
import sample
import t2i
from common import (EMA, PEAK_BF16_FLOPS, DistEnv, HelpFormatter, autocast, cleanup_distributed,
                    forward_flops, save_json, setup_distributed, unwrap, use_bf16, use_compile)
from data import to_model_range
from fsdp import parallelize
from tokenizer import (AlignedTokenizer, PatchGAN, build_lpips, hinge_d_loss, semantic_reference,
                       set_trainable, tokenizer_loss)

# The paper's sizes on CUDA, small ones on the CPU; t5: the t2i part's random T5 (T5-XXL's on CUDA).
CONFIGS = {
    "cuda": dict(dit="XL/1", dit_kw={}, latent=(32, 16, 16), tok={}, t2i="T2I-2B/1",
                 t2i_text=(128, 4096), batch=dict(dit=128, tokenizer=32, sample=128, t2i=32),
                 t5=dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)),
    "cpu": dict(dit="B/1", dit_kw=dict(hidden_size=128, depth=2, num_heads=4), latent=(32, 4, 4),
                tok=dict(encoder="tiny", decoder_ch=32, decoder_res_blocks=1), t2i="T2I-tiny/1",
                t2i_text=(16, 64), batch=dict(dit=8, tokenizer=2, sample=8, t2i=4),
                t5=dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)),
}


def compiled(model, args, **compile_kwargs):
    """The model as --compile asks: whole (on; auto: on CUDA), eager (off), or regional: each block
    of its block lists compiled, one graph shared by the blocks of a class (a faster first step)."""
    if args.compile != "regional":
        return torch.compile(model) if use_compile(args.compile, args.device) else model
    for blocks in model.children():
        for block in blocks if isinstance(blocks, torch.nn.ModuleList) else ():
            block.compile(**compile_kwargs)
    return model


def timed(step, args, profile=None, warmup=None, iters=None):
    """(median seconds per call of `step`, the first call's or None); --profile: 2 more profiled."""
    sync = torch.cuda.synchronize if args.device.type == "cuda" else lambda: None

    def clock(n=1):  # seconds per call over n calls
        sync()
        start = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        return (time.perf_counter() - start) / n

    warm = [clock() for _ in range(args.warmup if warmup is None else warmup)]  # 1st: compiling
    times = [clock(iters or args.iters) for _ in range(args.repeats)]
    if profile and args.profile:
        with torch.profiler.profile() as prof:  # the CPU's activities and CUDA's where present
            clock(2)
        sort = "self_device_time_total" if args.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=80, max_name_column_width=120)
        os.makedirs(args.profile, exist_ok=True)
        with open(os.path.join(args.profile, profile + ".txt"), "w") as f:
            f.write(f"2 steps; {sort}\n{table}")
        prof.export_chrome_trace(os.path.join(args.profile, profile + ".json.gz"))
    return statistics.median(times), warm[0] if warm else None


def report(name, args, batch, seconds, flops_per_image=None, **extra):
    """A row of results, printed; `seconds`: timed()'s (seconds per step, first step's seconds)."""
    peak = (torch.cuda.max_memory_allocated() if args.device.type == "cuda" else  # else the
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30  # process's
    row = {"part": name, "batch": batch, "img_per_s": batch / seconds[0],
           "ms_per_step": 1000 * seconds[0], "peak_mem_gib": peak, "first_step_s": seconds[1],
           "gflops_per_image": (flops_per_image or 0) / 1e9, **extra}
    if flops_per_image and args.peak_flops:
        row["mfu"] = row["img_per_s"] * flops_per_image / args.peak_flops
    print(f"{name:28s} {row['img_per_s']:10.1f} img/s  {row['ms_per_step']:9.1f} ms/step  "
          f"peak {peak:.2f} GiB" + (f"  MFU {row['mfu']:.1%}" if "mfu" in row else ""), flush=True)
    return row


def train_row(name, args, B, model, inputs, ema_update, flops, clip=False, fused=True):
    """report() of a flow-matching training step of `model` on inputs() = (x1, condition)."""
    params = list(unwrap(model).parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0,
                            fused=fused and not args.no_fused)

    def step():
        with autocast(args.device, args.bf16):
            loss, _ = dit.flow_matching_loss(model, *inputs())
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(unwrap(model))

    return report(name, args, B, timed(step, args, f"{name.split()[0]}_b{B}"), flops)


def bench_dit(args, B):
    """The LightningDiT's training step; with --vs_official, the official model's next to it: its
    XL config's flags, foreach AdamW and its train.py's per-parameter EMA loop."""
    if args.vs_official:  # its models/rmsnorm.py imports fairscale (unused): mocks stand in
        for name in ("", ".nn", ".nn.model_parallel", ".nn.model_parallel.initialize",
                     ".nn.model_parallel.layers"):
            sys.modules.setdefault("fairscale" + name, mock.MagicMock())
        with mock.patch.object(sys, "path", [os.path.abspath(args.vs_official), *sys.path]):
            from models.lightningdit import LightningDiT  # needs timm and einops
    cfg, device, (C, H, W) = args.cfg, args.device, args.cfg["latent"]
    size = dit.DiT_models[cfg["dit"]].keywords  # depth, width, heads, patch
    kwargs = {**size, "in_channels": C, "input_size": H, **cfg["dit_kw"]}  # the official's too
    model = dit.LightningDiT(**kwargs, grad_checkpointing=args.grad_checkpointing).to(device)
    x1, y = torch.randn(B, C, H, W, device=device), torch.randint(0, 1000, (B,), device=device)
    flops = 3 * forward_flops(model, model.num_patches)
    ours = train_row(f"dit {cfg['dit']} train", args, B, compiled(model, args),
                     lambda: (x1, y), EMA(model, 0.9999).update, flops)
    if not args.vs_official:
        return [ours]
    del model
    reset_memory(device)
    official = LightningDiT(**kwargs, use_swiglu=True, use_rope=True, use_rmsnorm=True,
                            use_qknorm=False).to(device)
    ema = {n: p.detach().clone() for n, p in official.named_parameters()}

    def official_ema(model, decay=0.9999):
        for name, p in model.named_parameters():
            ema[name].mul_(decay).add_(p.data, alpha=1 - decay)

    theirs = train_row("official LightningDiT train", args, B, official, lambda: (x1, y),
                       official_ema, flops, fused=False)
    ours["speedup_vs_official"] = ours["img_per_s"] / theirs["img_per_s"]
    print(f"ours / official: {ours['speedup_vs_official']:.2f}x images/s, "
          f"{ours['peak_mem_gib'] / theirs['peak_mem_gib']:.2f}x peak memory", flush=True)
    return [ours, theirs]


def bench_tokenizer(args, B):
    """train_tokenizer.py's step in each stage, LPIPS and the GAN on (the costliest phase)."""
    device, bf16, size = args.device, args.bf16, 16 * args.cfg["latent"][1]
    lpips = build_lpips(random_backbone=True).to(device)  # its weights do not change its speed
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format  # the conv nets'
    x = (torch.rand(B, 3, size, size, device=device) * 2 - 1).contiguous(memory_format=fmt)
    rows = []
    for stage in (1, 2, 3):
        model = AlignedTokenizer({**args.cfg["tok"], "image_size": size}).to(device)
        model.decoder.to(memory_format=fmt)
        set_trainable(model, stage)
        ref = semantic_reference(model) if stage == 2 else None
        disc = PatchGAN().to(device, memory_format=fmt)
        if args.compile == "regional" or use_compile(args.compile, device):  # networks = regions
            for net in (model.encoder, model.decoder, disc):
                net.compile()
        opt = torch.optim.Adam(model.parameters(), 1e-4, (0.5, 0.9), fused=not args.no_fused)
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
        seconds = timed(step, args, f"tokenizer_stage{stage}_b{B}")
        rows.append(report(f"tokenizer stage {stage} train", args, B, seconds,
                           counter.get_total_flops() / B))
    return rows


def bench_sampling(args, B):
    """Sampling with CFG and decoding: 30 steps timed, 250 from the time per step."""
    (C, H, W), device = args.cfg["latent"], args.device
    model = dit.build_dit(args.cfg["dit"], in_channels=C, input_size=H, **args.cfg["dit_kw"])
    model.to(device).eval()
    tok = AlignedTokenizer({**args.cfg["tok"], "image_size": 16 * H}).to(device).eval()
    net = two_pass(compiled(model, args)) if args.cfg_two_pass else compiled(model, args)
    noise, y = torch.randn(B, C, H, W, device=device), torch.randint(0, 1000, (B,), device=device)
    stats = {"mean": torch.zeros(C), "std": torch.ones(C)}

    def run():
        with autocast(device, args.bf16):
            return sample.sample_latents(net, y, noise, steps=30, cfg_scale=1.5,
                                         null=torch.full_like(y, model.num_classes))

    t30, _ = timed(run, args, f"sample30_b{B}", warmup=1, iters=1)
    t_decode, _ = timed(lambda: sample.decode_to_uint8(tok, noise, stats), args, None, 1, 1)
    flops = 2 * forward_flops(model, model.num_patches)  # per step and image: both CFG rows
    rows = []
    for steps in (250, 30):
        seconds = t30 / 29 * (steps - 1) + t_decode
        rows.append(report(f"sample cfg {steps} steps", args, B, (seconds, None),
                           flops * (steps - 1), hours_for_50k=50_000 / (B / seconds) / 3600))
    return rows


def two_pass(model):
    """CFG as two forwards, one per half of the batch [x; x] (what batching saves)."""
    return lambda x, t, y: torch.cat([model(*half) for half in zip(x.chunk(2), (t, t), y.chunk(2))])


def bench_t2i(args, B):
    """train_t2i.py's step (2B on CUDA) on the square bucket from random latents and text states;
    then its frozen tokenizer and (random) T5 alone, built after it: not in its peak memory."""
    cfg, device, bf16 = args.cfg, args.device, args.bf16
    (L, text_dim), (C, H, W) = cfg["t2i_text"], cfg["latent"]
    model = t2i.build_t2i(cfg["t2i"], in_channels=C, text_dim=text_dim,
                          grad_checkpointing=args.grad_checkpointing)
    flops = 3 * forward_flops(model, H * W // model.patch_size ** 2, L)
    ema = EMA(model, 0.9999)
    # as train_t2i.py: on the device, compiled; --fsdp: sharded (over one GPU), each block compiled
    train_model = parallelize(model, ema, DistEnv(0, 0, 1, device), args)
    if args.compile == "regional" and not args.fsdp:
        compiled(model, args)
    mask = torch.arange(L, device=device).expand(B, L) < L // 2  # half of the tokens: padding
    z, text = torch.randn(B, C, H, W, device=device), torch.randn(B, L, text_dim, device=device)
    row = train_row(f"t2i {cfg['t2i']} train", args, B, train_model, lambda: (z, (text, mask)),
                    ema.update, flops, clip=True)
    import transformers
    config = transformers.T5Config(**cfg["t5"], feed_forward_proj="gated-gelu", vocab_size=32128)
    with torch.device(device):  # built there: T5-XXL has 4.7B parameters
        t5 = transformers.T5EncoderModel(config).eval().to(torch.bfloat16 if bf16 else torch.float)
    tok = AlignedTokenizer({**cfg["tok"], "image_size": 16 * H}).to(device).eval()
    images = torch.randint(0, 256, (B, 3, 16 * H, 16 * W), dtype=torch.uint8, device=device)
    ids = torch.randint(0, config.vocab_size, (B, L), device=device)

    def encode():  # (B, 3, 16H, 16W) uint8 -> (B, C, H, W) latents; (B, L) ids -> text states
        with torch.no_grad(), autocast(device, bf16):
            tok.encode(to_model_range(images, device))
            t5(input_ids=ids, attention_mask=mask)

    encoders = 1000 * timed(encode, args, f"t2i_encoders_b{B}")[0]
    row.update(encoders_ms=encoders, encoders_share=encoders / (encoders + row["ms_per_step"]))
    print(f"frozen tokenizer + text encoder: {row['encoders_share']:.0%} of train_t2i.py's step")
    return [row]


PARTS = {"dit": bench_dit, "tokenizer": bench_tokenizer, "sample": bench_sampling, "t2i": bench_t2i}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--part", choices=sorted(PARTS), action="append", help="repeatable; default all")
    p.add_argument("--batch_size", type=int, nargs="+", help="default: each part's own (for 80 GB)")
    for flag, choices, help in (
            ("--device", ("auto", "cuda", "cpu"), None),
            ("--precision", ("auto", "bf16", "fp32"), "auto: bf16 on CUDA"),
            ("--compile", ("auto", "on", "off", "regional"), "whole (auto: on CUDA) or blockwise"),
            ("--attention", ("sdpa", "math"), "math: PyTorch's reference attention")):
        p.add_argument(flag, default=choices[0], choices=choices, help=help)
    p.add_argument("--fsdp", action="store_const", const="shard", help="t2i as train_t2i.py --fsdp")
    p.add_argument("--vs_official", metavar="PATH", help="a hustvl/LightningDiT checkout to time")
    for flag, help in (("--no_fused", "for-each Adam/AdamW"), ("--grad_checkpointing", None),
                       ("--channels_last", "the tokenizer's conv nets"),
                       ("--cfg_two_pass", "CFG as two forwards")):
        p.add_argument(flag, action="store_true", help=help)
    p.add_argument("--memory_gib", type=float, help="cap the GPU memory (e.g. 80 on an H200)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--iters", type=int, default=5, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (their median)")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--profile", metavar="DIR", help="two steps' operator tables, Chrome traces")
    return p.parse_args(argv)


def reset_memory(device):
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def main(argv=None):
    args = parse_args(argv)
    switches = {k: v for k, v in vars(args).items() if k not in ("part", "json")}
    device = args.device = setup_distributed(args.device).device  # TF32 and cuDNN tuning on CUDA
    args.cfg, args.bf16 = CONFIGS[device.type], use_bf16(args.precision, device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    args.peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)
    if device.type == "cuda" and args.memory_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * 2 ** 30 / total))
    print(f"device {gpu}, {'bf16' if args.bf16 else 'fp32'}; switches {switches}")
    rows = []
    with sdpa_kernel(SDPBackend.MATH) if args.attention == "math" else contextlib.nullcontext():
        for part in args.part or PARTS:
            for batch in args.batch_size or [args.cfg["batch"][part]]:
                try:  # a batch that does not fit gets a row that says so; a sweep goes on
                    rows += PARTS[part](args, batch)
                except torch.OutOfMemoryError:
                    print(f"{part}: batch {batch} does not fit in memory", flush=True)
                    rows.append({"part": part, "batch": batch, "out_of_memory": True})
                reset_memory(device)
    if args.json:
        save_json({"device": gpu, "switches": switches, "rows": rows}, args.json)
    cleanup_distributed()  # --fsdp's process group of one
    return rows


if __name__ == "__main__":
    main()
