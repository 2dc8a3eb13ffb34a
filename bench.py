"""Speed benchmarks of every part of the method on the device present: the training steps of the
tokenizer, of the LightningDiT and of the text-to-image model, sampling, and FID feature extraction
next to pytorch-fid's.

    python bench.py                            # all parts; CUDA if present, else small CPU configs
    python bench.py --part dit --vs_official ~/LightningDiT  # ours and the official code, same step
    python bench.py --part dit --batch_size 64 128 256       # a batch-size sweep
    python bench.py --part dit --compile off --precision fp32 --no_fused --attention math  # plain
    python bench.py --part t2i --compile regional       # each block compiled: a faster first step
    python bench.py --part tokenizer --profile out/     # + torch.profiler tables and Chrome traces
    python bench.py --part dit --part t2i --max_batch --memory_gib 80   # largest batch in 80 GB

For each part: images/s, peak memory, and on CUDA the model FLOPs utilisation (MFU) = achieved model
FLOP/s / the GPU's dense bf16 peak (flops.py). Timing: --warmup steps not timed, CUDA
synchronised before and after each timed repeat of --iters steps, the median of --repeats repeats.

FLOP counts: the LightningDiT's and the text-to-image model's as flops.py defines them (also for
t2i_e2e, train_t2i.py's whole step with the frozen tokenizer and text encoder); the tokenizer's by
torch.utils.flop_counter over one real training step (LPIPS, discriminator, adaptive-weight
gradients included); sampling: (steps - 1) DiT forwards per image, doubled with CFG.

Each fast path can be switched off to measure what it brings: --compile off (torch.compile, on by
default on CUDA as in the training scripts), --precision fp32 (bf16 autocast), --no_fused (fused
Adam/AdamW), --attention math (the SDPA flash/efficient kernels), --channels_last (tokenizer
conv nets), --no_tf32, --cfg_two_pass (CFG as two forwards instead of one batched forward),
--grad_checkpointing (DiT: less memory, more compute). Default batches fit an 80 GB GPU.
`--part t2i --fsdp` shards the text-to-image model as `train_t2i.py --fsdp` does, over one GPU.

Each row also gives the first step's time (compiling included, `first_step_s`). --profile DIR
writes, for each part after its timing, torch.profiler's operator table of two more steps (sorted
by GPU time on CUDA, CPU time on the CPU) and their Chrome trace (chrome://tracing, Perfetto).
--max_batch finds the largest batch that fits on the GPU (doubling from the default batch, then
bisecting; --memory_gib caps the GPU memory, e.g. 80 on a 141 GB H200).

--vs_official PATH times a checkout of hustvl/LightningDiT (github.com/hustvl/LightningDiT; it needs
timm and einops) in the same process and protocol: its XL/1 as its config trains it (SwiGLU, RoPE,
RMSNorm, its own @torch.compile pieces), the same flow-matching loss and batch, foreach AdamW and
its per-parameter EMA loop, as its train.py does; then the ratio of images/s and of peak memory.
"""

import argparse
import contextlib
import gc
import json
import os
import resource
import statistics
import time

import torch

import dit
import flops as model_flops
import t2i
from common import (EMA, DistEnv, add_fsdp_arg, at_least, autocast, cleanup_distributed,
                    parallelize, unwrap, use_bf16, use_compile)

# Default sizes: the paper's on CUDA; small ones on CPU so everything finishes in about a minute.
CONFIGS = {
    "cuda": dict(dit="XL/1", dit_kw={}, dit_batch=128, latent=(32, 16, 16),
                 tok={}, tok_batch=32, image_size=256, sample_batch=128, fid_batch=250,
                 t2i="T2I-2B/1", t2i_text=(128, 4096), t2i_batch=32),
    "cpu": dict(dit="B/1", dit_kw=dict(hidden_size=128, depth=2, num_heads=4, input_size=8),
                dit_batch=8, latent=(32, 8, 8),
                tok=dict(encoder="tiny", decoder_ch=32, decoder_res_blocks=1), tok_batch=2,
                image_size=64, sample_batch=8, fid_batch=4,
                t2i="T2I-tiny/1", t2i_text=(16, 64), t2i_batch=4),
}
# The frozen text encoder of t2i_e2e, random weights: T5-XXL's encoder (4.8B parameters) on CUDA.
T5_CONFIGS = {"cuda": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
              "cpu": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)}


def timed(step, device, warmup: int, iters: int, repeats: int, profile: str | None = None):
    """Median seconds per call of `step` over `repeats` timed blocks of `iters` calls after
    `warmup`, and the seconds of the first call (None without warm-up); then, if `profile` (a path
    without extension) is given, profile_steps."""
    first = None
    for i in range(warmup):
        start = time.perf_counter()
        step()
        if i == 0:
            synchronize(device)
            first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            step()
        synchronize(device)
        times.append((time.perf_counter() - start) / iters)
    if profile:
        profile_steps(step, device, profile)
    return statistics.median(times), first


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def profile_steps(step, device, prefix: str, steps: int = 2):
    """torch.profiler over `steps` calls of `step`: the operator table (summed over them), sorted by
    GPU time on CUDA, CPU time on the CPU, to PREFIX.txt; the Chrome trace to PREFIX.json.gz."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    with open(prefix + ".txt", "w") as f:
        f.write(f"{steps} steps; {sort}\n")
        f.write(prof.key_averages().table(sort_by=sort, row_limit=80, max_name_column_width=120))
    prof.export_chrome_trace(prefix + ".json.gz")
    print(f"profile of {steps} steps: {prefix}.txt, {prefix}.json.gz", flush=True)


def profile_path(args, name: str, batch: int) -> str | None:
    """Where --profile puts a part's files (None without --profile)."""
    if args.profile:
        return os.path.join(args.profile, f"{name.replace('/', '-').replace(' ', '_')}_b{batch}")


def compiled(model, args, device):
    """The model as --compile asks: whole (on; auto: on CUDA), by blocks (regional), or eager."""
    if args.compile == "regional":
        return dit.compile_blocks(model)
    return torch.compile(model) if use_compile(args.compile, device) else model


def peak_memory_gib(device) -> float:
    """Peak GPU memory allocated by torch, or on the CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def attention_backend(name: str):
    """`math` forces PyTorch's reference attention (materialises the N x N scores)."""
    if name == "sdpa":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.MATH)


def report(name, args, device, batch, seconds, flops_per_image=None, **extra):
    """A row of results; `seconds` per step, or (seconds, first step's seconds) from timed."""
    seconds, first = seconds if isinstance(seconds, tuple) else (seconds, None)
    img_s = batch / seconds
    row = {"part": name,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "batch": batch, "img_per_s": img_s, "ms_per_step": 1000 * seconds,
           "peak_mem_gib": peak_memory_gib(device), "first_step_s": first, **extra}
    mfu = model_flops.mfu(img_s, flops_per_image, device) if flops_per_image else None
    if mfu:
        row["mfu"] = mfu
    mfu = f"  MFU {mfu:.1%}" if mfu else ""
    memory = "peak" if device.type == "cuda" else "process peak RSS"  # on the CPU it never drops
    print(f"{name:28s} {img_s:10.1f} img/s  {row['ms_per_step']:9.1f} ms/step  "
          f"{memory} {row['peak_mem_gib']:.2f} GiB{mfu}", flush=True)
    return row


# --------------------------------------------------------------------------------------------------
# Parts


def bench_dit(args, cfg, device, bf16, B):
    """One LightningDiT training step: flow-matching loss, backward, AdamW, EMA update; with
    --vs_official, the official model's step next to it."""
    model = dit.build_dit(cfg["dit"], in_channels=cfg["latent"][0],
                          grad_checkpointing=args.grad_checkpointing,
                          **{"input_size": cfg["latent"][1], **cfg["dit_kw"]}).to(device)
    flops = model_flops.training_flops_per_image(model)
    ema = EMA(model, 0.9999)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0,
                            fused=not args.no_fused)
    train_model = compiled(model, args, device)
    seconds = dit_step_seconds(train_model, ema.update, opt, args, cfg, device, bf16, B, "dit")
    rows = [report(f"dit {cfg['dit']} train", args, device, B, seconds, flops,
                   gflops_per_image=flops / 1e9)]
    if args.vs_official:
        del model, ema, opt, train_model
        official = official_lightningdit(args.vs_official, cfg).to(device)
        ema_params = {n: p.detach().clone() for n, p in official.named_parameters()}

        def official_ema(model, decay=0.9999):  # its train.py's loop: per parameter, mul_ then add_
            for name, p in model.named_parameters():
                ema_params[name].mul_(decay).add_(p.data, alpha=1 - decay)

        opt = torch.optim.AdamW(official.parameters(), lr=2e-4, betas=(0.9, 0.95),
                                weight_decay=0)  # foreach
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        rows.append(report("official LightningDiT train", args, device, B,
                           dit_step_seconds(official, official_ema, opt, args, cfg, device, bf16, B,
                                            "official"), flops))
        ours, theirs = rows
        print(f"ours / official: {ours['img_per_s'] / theirs['img_per_s']:.2f}x images/s, "
              f"{ours['peak_mem_gib'] / theirs['peak_mem_gib']:.2f}x peak memory", flush=True)
        ours["speedup_vs_official"] = ours["img_per_s"] / theirs["img_per_s"]
    return rows


def dit_step_seconds(model, ema_update, opt, args, cfg, device, bf16, B, name):
    x1 = torch.randn(B, *cfg["latent"], device=device)
    y = torch.randint(0, 1000, (B,), device=device)

    def step():
        with autocast(device, bf16), attention_backend(args.attention):
            loss, _ = dit.flow_matching_loss(model, x1, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(unwrap(model))

    return timed(step, device, args.warmup, args.iters, args.repeats, profile_path(args, name, B))


def official_lightningdit(path: str, cfg: dict):
    """The official LightningDiT of the same size from a checkout at `path`, as its released XL
    config trains it. Its models/rmsnorm.py imports fairscale (unused): empty modules stand in."""
    import sys
    import types

    for name in ("fairscale", "fairscale.nn", "fairscale.nn.model_parallel",
                 "fairscale.nn.model_parallel.initialize", "fairscale.nn.model_parallel.layers"):
        sys.modules.setdefault(name, types.ModuleType(name))
    for name in ("ColumnParallelLinear", "ParallelEmbedding", "RowParallelLinear"):
        setattr(sys.modules["fairscale.nn.model_parallel.layers"], name, None)
    sys.path.insert(0, os.path.abspath(path))
    try:
        from models.lightningdit import LightningDiT_models
    except ImportError as e:
        raise SystemExit(f"--vs_official {path}: cannot import its models/lightningdit.py ({e}); "
                         "it needs a checkout of github.com/hustvl/LightningDiT and the timm and "
                         "einops packages")
    finally:
        sys.path.remove(os.path.abspath(path))
    size_kw = {k: v for k, v in cfg["dit_kw"].items() if k != "input_size"}
    kw = dict(input_size=cfg["latent"][1], in_channels=cfg["latent"][0], use_swiglu=True,
              use_rope=True, use_rmsnorm=True, use_qknorm=False, **size_kw)
    name = f"LightningDiT-{cfg['dit']}"
    if "hidden_size" in kw:  # the small CPU configuration: the class itself, not a named size
        return sys.modules["models.lightningdit"].LightningDiT(patch_size=int(cfg["dit"][-1]), **kw)
    return LightningDiT_models[name](**kw)


def bench_tokenizer(args, cfg, device, bf16, B):
    """One tokenizer training step per stage, with LPIPS and the GAN on (the costliest phase)."""
    from tokenizer import build_lpips

    lpips = build_lpips(random_backbone=True).to(device)  # the weights do not change its speed
    return [bench_tokenizer_stage(stage, lpips, args, cfg, device, bf16, B) for stage in (1, 2, 3)]


def bench_tokenizer_stage(stage, lpips, args, cfg, device, bf16, B):
    """The step of train_tokenizer.py: tokenizer loss and update, EMA, discriminator update."""
    from torch.utils.flop_counter import FlopCounterMode

    from tokenizer import (AlignedTokenizer, PatchGAN, hinge_d_loss, semantic_reference,
                           set_trainable, tokenizer_loss)

    torch.manual_seed(0)
    model = AlignedTokenizer({**cfg["tok"], "image_size": cfg["image_size"]}).to(device)
    set_trainable(model, stage)
    ref = semantic_reference(model) if stage == 2 else None
    disc = PatchGAN().to(device)
    if args.channels_last:
        model.decoder.to(memory_format=torch.channels_last)
        disc.to(memory_format=torch.channels_last)
    if args.compile == "regional" or use_compile(args.compile, device):  # networks = regions
        for net in (model.encoder, model.decoder, disc):
            net.compile()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, 1e-4, (0.5, 0.9), fused=not args.no_fused)
    opt_d = torch.optim.Adam(disc.parameters(), 1e-4, (0.5, 0.9), fused=not args.no_fused)
    ema = EMA(model, 0.999)
    x = torch.rand(B, 3, cfg["image_size"], cfg["image_size"], device=device) * 2 - 1
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with autocast(device, bf16), attention_backend(args.attention):
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
    flops = counter.get_total_flops() / B
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, device, args.warmup, args.iters, args.repeats,
                    profile_path(args, f"tokenizer stage{stage}", B))
    return report(f"tokenizer stage {stage} train", args, device, B, seconds, flops,
                  gflops_per_image=flops / 1e9)


def bench_sampling(args, cfg, device, bf16, B):
    """Sampling with CFG (one batched forward over [x; x]) at 250 and 30 steps, plus decoding. The
    30-step run is timed whole; the 250-step figure uses the per-step time measured in it."""
    import sample
    from tokenizer import AlignedTokenizer

    model = dit.build_dit(cfg["dit"], in_channels=cfg["latent"][0],
                          **{"input_size": cfg["latent"][1], **cfg["dit_kw"]}).to(device).eval()
    tok = AlignedTokenizer({**cfg["tok"], "image_size": 16 * cfg["latent"][1]}).to(device).eval()
    net = compiled(model, args, device)
    if args.cfg_two_pass:  # CFG as two separate forwards of B rows (what batching saves)
        net = TwoPass(net)
    noise = torch.randn(B, *cfg["latent"], device=device)
    y = torch.randint(0, model.num_classes, (B,), device=device)
    stats = {"mean": torch.zeros(cfg["latent"][0]), "std": torch.ones(cfg["latent"][0])}

    def run(steps):
        with autocast(device, bf16), attention_backend(args.attention):
            z = sample.sample_latents(net, y, noise, steps=steps, cfg_scale=1.5)
        return z

    def decode():
        sample.decode_to_uint8(tok, z, stats)

    z = run(30)
    t30, _ = timed(lambda: run(30), device, 1, 1, args.repeats, profile_path(args, "sample30", B))
    t_decode, _ = timed(decode, device, 1, 1, args.repeats)
    per_step = t30 / 29
    flops = 2 * model_flops.forward_flops_per_image(model)  # per step and image: both CFG rows
    rows = []
    for steps in (250, 30):
        seconds = per_step * (steps - 1) + t_decode
        rows.append(report(f"sample cfg {steps} steps", args, device, B, seconds,
                           flops * (steps - 1), hours_for_50k=50_000 / (B / seconds) / 3600))
    return rows


class TwoPass(torch.nn.Module):
    """Calls the model on each half of the batch separately (CFG without batching)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.num_classes = model, model.num_classes

    def forward(self, x, t, y):
        h = x.shape[0] // 2
        return torch.cat([self.model(x[:h], t, y[:h]), self.model(x[h:], t, y[h:])])


def bench_fid(args, cfg, device, bf16, B):
    """Inception features (always float32) of 256 px images: ours and pytorch-fid's, same weights,
    same images, alternating, best of --repeats passes each."""
    import tempfile

    import fid
    import pytorch_fid.inception

    ours = fid.load_inception(random_weights=True, device=device)
    with tempfile.TemporaryDirectory() as home:
        os.makedirs(os.path.join(home, "hub", "checkpoints"))  # pytorch-fid reads its weights here
        torch.save(ours.state_dict(),
                   os.path.join(home, "hub", "checkpoints", os.path.basename(fid.FID_WEIGHTS_URL)))
        old_home, os.environ["TORCH_HOME"] = os.environ.get("TORCH_HOME"), home
        try:
            theirs = pytorch_fid.inception.InceptionV3([3]).to(device).eval()  # [3]: 2048-d pool
        finally:
            if old_home is None:
                del os.environ["TORCH_HOME"]
            else:
                os.environ["TORCH_HOME"] = old_home
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(B * args.iters, 3, 256, 256, generator=generator).to(device)
    batches = images.split(B)
    extract = {"ours": lambda b: ours(b)[0], "pytorch_fid": lambda b: theirs(b)[0].flatten(1)}
    seconds, feats = {name: [] for name in extract}, {}
    with torch.inference_mode(), fid.exact_float32(device):
        for i in range(args.repeats + 1):  # round 0: warm-up; alternating: drifting load hits both
            for name in list(extract) if i % 2 else list(extract)[::-1]:
                synchronize(device)
                start = time.perf_counter()
                feats[name] = torch.cat([extract[name](b) for b in batches])
                synchronize(device)
                seconds[name].append(time.perf_counter() - start)
    ours_s, theirs_s = (min(seconds[k][1:]) / len(batches) for k in ("ours", "pytorch_fid"))
    return [report("fid features", args, device, B, ours_s, pytorch_fid_img_per_s=B / theirs_s,
                   ratio_vs_pytorch_fid=theirs_s / ours_s,
                   max_feature_diff=(feats["ours"] - feats["pytorch_fid"]).abs().max().item())]


def bench_t2i(args, cfg, device, bf16, B):
    """One training step of the text-to-image model (2B on CUDA) on the square bucket: flow-matching
    loss, backward, gradient clipping, AdamW, EMA. The frozen tokenizer and text encoder are untimed
    (like the LightningDiT's precomputed latents): random tensors of the right shape stand in."""
    (L, text_dim), (C, H, W) = cfg["t2i_text"], cfg["latent"]
    model, flops, train = t2i_training_step(args, cfg, device, bf16)
    x1 = torch.randn(B, C, H, W, device=device)
    mask = torch.arange(L, device=device).expand(B, L) < L // 2
    text = (torch.randn(B, L, text_dim, device=device), mask)
    seconds = timed(lambda: train(x1, text), device, args.warmup, args.iters, args.repeats,
                    profile_path(args, "t2i", B))
    params = sum(p.numel() for p in model.parameters())
    return [report(f"t2i {cfg['t2i']} train", args, device, B, seconds, flops,
                   gflops_per_image=flops / 1e9, params=params)]


def t2i_training_step(args, cfg, device, bf16):
    """The text-to-image model, its training FLOPs per image and train(x1, text): one step of
    train_t2i.py on latents x1 and text = (states, mask)."""
    (L, text_dim), (C, H, W) = cfg["t2i_text"], cfg["latent"]
    model = t2i.build_t2i(cfg["t2i"], in_channels=C, text_dim=text_dim,
                          grad_checkpointing=args.grad_checkpointing)
    flops = 3 * model_flops.t2i_forward_flops(model, H * W // model.patch_size ** 2, L)
    ema = EMA(model, 0.9999)
    if args.fsdp:  # as train_t2i.py --fsdp: sharded (over one GPU here), each block compiled
        train_model = parallelize(model, ema, DistEnv(0, 0, 1, device), args)
    else:
        train_model = compiled(model.to(device), args, device)
        ema.model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0,
                            fused=not args.no_fused)

    def train(x1, text):
        with autocast(device, bf16), attention_backend(args.attention):
            loss, _ = dit.flow_matching_loss(train_model, x1, text)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)

    return model, flops, train


def bench_t2i_e2e(args, cfg, device, bf16, B):
    """train_t2i.py's step end to end: the frozen tokenizer encodes uint8 images, the frozen text
    encoder (T5-XXL's encoder on CUDA, random weights built from its config: no download) encodes
    token ids (the tokenising of captions, on the CPU, is left out), then the step of bench_t2i.
    Also the two encoders alone: their share of the step. MFU counts the trained model's FLOPs."""
    import transformers

    from data import to_model_range
    from tokenizer import AlignedTokenizer

    L, (_, H, W) = cfg["t2i_text"][0], cfg["latent"]
    t5 = transformers.T5Config(**T5_CONFIGS[device.type], feed_forward_proj="gated-gelu",
                               vocab_size=32128)
    with torch.device(device):
        text_encoder = transformers.T5EncoderModel(t5).to(torch.bfloat16 if bf16 else torch.float32)
    text_encoder.eval().requires_grad_(False)
    tok = AlignedTokenizer({**cfg["tok"], "image_size": 16 * H}).to(device)
    tok.eval().requires_grad_(False)
    images = torch.randint(0, 256, (B, 3, 16 * H, 16 * W), dtype=torch.uint8, device=device)
    ids = torch.randint(0, t5.vocab_size, (B, L), device=device)
    mask = torch.arange(L, device=device).expand(B, L) < L // 2

    @torch.no_grad()
    def encode():
        with autocast(device, bf16):
            z = tok.encode(to_model_range(images, device))
            states = text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return z.float(), (states, mask)  # latent statistics (mean 0, std 1 here) left out

    model, flops, train = t2i_training_step(args, cfg, device, bf16)
    seconds = timed(lambda: train(*encode()), device, args.warmup, args.iters, args.repeats,
                    profile_path(args, "t2i_e2e", B))
    encoders, _ = timed(encode, device, args.warmup, args.iters, args.repeats)  # after: warm
    print(f"frozen tokenizer + text encoder: {1000 * encoders:.1f} ms, {encoders / seconds[0]:.0%} "
          "of the step", flush=True)
    return [report(f"t2i {cfg['t2i']} train_t2i step", args, device, B, seconds, flops,
                   encoders_ms=1000 * encoders, encoders_share=encoders / seconds[0])]


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


def max_batch(part, args, cfg, device, bf16):
    """--max_batch: the largest batch of `part` whose two steps (warm-up, timed) fit on the GPU."""
    if device.type != "cuda":
        print(f"{part}: --max_batch needs CUDA (where memory runs out); skipped", flush=True)
        return []
    probe = argparse.Namespace(**{**vars(args), "warmup": 1, "iters": 1, "repeats": 1,
                                  "profile": None})

    def fits(batch):
        try:
            PARTS[part](probe, cfg, device, bf16, batch)
            return True
        except torch.OutOfMemoryError:
            print(f"{part}: batch {batch} does not fit in memory", flush=True)
            return False
        finally:
            gc.collect()
            torch.cuda.empty_cache()

    batch = largest_batch(fits, cfg[BATCH[part]])
    print(f"{part}: largest batch that fits: {batch}", flush=True)
    return [{"part": part, "max_batch": batch, "memory_gib": args.memory_gib,
             "device": torch.cuda.get_device_name(device)}]


PARTS = {"dit": bench_dit, "tokenizer": bench_tokenizer, "sample": bench_sampling, "fid": bench_fid,
         "t2i": bench_t2i, "t2i_e2e": bench_t2i_e2e}
BATCH = {"dit": "dit_batch", "tokenizer": "tok_batch", "sample": "sample_batch", "fid": "fid_batch",
         "t2i": "t2i_batch", "t2i_e2e": "t2i_batch"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=sorted(PARTS), action="append",
                   help="what to measure (repeatable; default all)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--batch_size", type=at_least(1), nargs="+", help="batch(es) to measure "
                   "(several: a sweep; default: each part's own, fitting an 80 GB GPU)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 on CUDA")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off", "regional"),
                   help="torch.compile the whole model (on; auto: on CUDA), each of its blocks "
                   "(regional: compiles one block, a faster first step; the tokenizer: its "
                   "networks), or nothing")
    add_fsdp_arg(p)  # the text-to-image step only
    p.add_argument("--vs_official", metavar="PATH",
                   help="a checkout of hustvl/LightningDiT to time next to ours")
    p.add_argument("--no_fused", action="store_true",
                   help="plain (for-each) Adam/AdamW instead of fused")
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "math"))
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--no_tf32", action="store_true")
    p.add_argument("--cfg_two_pass", action="store_true")
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--warmup", type=at_least(0), default=3)
    p.add_argument("--iters", type=at_least(1), default=5, help="steps per timed repeat")
    p.add_argument("--repeats", type=at_least(1), default=3)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--profile", metavar="DIR",
                   help="also profile two steps of each part: operator tables, Chrome traces")
    p.add_argument("--max_batch", action="store_true",
                   help="find the largest batch that fits (CUDA only)")
    p.add_argument("--memory_gib", type=float, help="cap the GPU memory (e.g. 80 on an H200)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    cfg = CONFIGS[device.type]
    bf16 = use_bf16(args.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not args.no_tf32
        torch.backends.cudnn.benchmark = True
        if args.memory_gib:
            total = torch.cuda.get_device_properties(device).total_memory
            fraction = min(1.0, args.memory_gib * 2 ** 30 / total)
            torch.cuda.set_per_process_memory_fraction(fraction, device)
    switches = {k: v for k, v in vars(args).items() if k not in ("part", "json")}
    print(f"device {device}, {'bf16' if bf16 else 'fp32'}; switches {switches}")
    rows = []
    for part in args.part or PARTS:
        if args.max_batch:
            rows += max_batch(part, args, cfg, device, bf16)
            continue
        for batch in args.batch_size or [cfg[BATCH[part]]]:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                rows += PARTS[part](args, cfg, device, bf16, batch)
            except torch.OutOfMemoryError:  # a sweep goes on past a batch that does not fit
                print(f"{part}: batch {batch} does not fit in memory", flush=True)
                rows.append({"part": part, "batch": batch, "out_of_memory": True})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"switches": switches, "rows": rows}, f, indent=1)
    cleanup_distributed()  # --fsdp's process group of one
    return rows


if __name__ == "__main__":
    main()
