"""The GPU fast paths give the results of the plain float32 path (within bf16 tolerance where bf16
is involved), checked on the CPU: bf16 autocast, SDPA vs reference attention, fused optimisers,
torch.compile (also of FSDP-sharded blocks), channels-last, batched CFG; and the benchmark command
runs."""

import argparse
import copy
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import bench
import dit
import sample
from common import EMA, DistEnv, autocast, cleanup_distributed
from conftest import randomize_
from fsdp import parallelize
from tokenizer import AlignedTokenizer, PatchGAN, build_lpips, tokenizer_loss

CPU = torch.device("cpu")
TINY_DIT = dict(input_size=4, patch_size=1, in_channels=8, hidden_size=64, depth=2, num_heads=4,
                num_classes=5)


def tiny_dit(seed=0):
    """Non-zero weights everywhere: the zero init would make every path trivially equal."""
    return randomize_(dit.LightningDiT(**TINY_DIT), scale=0.05, seed=seed)


def dit_loss_and_grads(model, bf16=False):
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(6, 8, 4, 4, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    model.zero_grad()
    with autocast(CPU, bf16):
        loss, _ = dit.flow_matching_loss(model, x1, y, generator=torch.Generator().manual_seed(2))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def test_dit_bf16_autocast_matches_fp32():
    model = tiny_dit().train()
    model.y_embedder.dropout_prob = 0.0  # no random label dropout: both passes see the same labels
    loss32, grads32 = dit_loss_and_grads(model)
    loss16, grads16 = dit_loss_and_grads(model, bf16=True)
    assert loss16.dtype == torch.float32 and abs(loss16 - loss32) / loss32 < 2e-2
    assert rel_err(torch.cat([g.flatten() for g in grads16]),
                   torch.cat([g.flatten() for g in grads32])) < 5e-2


def plain_attention(qk, v, cos, sin):
    """RoPE and attention the plain way: heads first (copies), q and k rotated one at a time."""
    def rope(x):  # (B, heads, N, head_dim)
        a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
        return x * cos + torch.stack((-b, a), dim=-1).flatten(-2) * sin
    q, k, v = (t.permute(0, 2, 1, 3).contiguous() for t in (*qk.unbind(2), v))
    out = torch.softmax(rope(q) @ rope(k).transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
    return out.transpose(1, 2).flatten(2)


def plain_swiglu(m, x):
    a, b = m.w12(x).chunk(2, dim=-1)  # one matmul, then chunk (the reference's code)
    return m.w3(torch.nn.functional.silu(a) * b)


def plain_rmsnorm(m, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.eps) * m.weight


def layouts():
    """(name, the model's module, its plain computation, an input) for each layout of dit.py."""
    g = torch.Generator().manual_seed(0)
    swiglu, norm = dit.SwiGLU(32, 48), dit.RMSNorm(32)
    for m in (swiglu, norm):
        randomize_(m, scale=0.3, seed=1)
    cos, sin = dit.rope_tables(8, 4, 4)
    qkv = torch.randn(2, 16, 3, 4, 8, generator=g)  # (B, N, 3, heads, head_dim)

    def fast_attention(qkv):
        return dit.attention(qkv[:, :, :2], qkv[:, :, 2], *(t.to(qkv.dtype) for t in (cos, sin)))

    x = torch.randn(2, 16, 32, generator=g)
    return [("swiglu", swiglu, lambda x: plain_swiglu(swiglu, x), x),
            ("rmsnorm", norm, lambda x: plain_rmsnorm(norm, x), 3 * x),
            ("attention", fast_attention,
             lambda qkv: plain_attention(qkv[:, :, :2], qkv[:, :, 2], cos, sin), qkv)]


@pytest.mark.parametrize("i", range(3), ids=["swiglu", "rmsnorm", "attention"])
def test_layouts_compute_the_plain_computation(i):
    """Each layout of dit.py (SwiGLU, fused rms_norm, tokens-first
    attention with RoPE over q and k stacked) in float32 = its plain computation (the reference
    code's; to float32 round-off), and under bf16 autocast close to it (outputs, input grads)."""
    name, fast, plain, x = layouts()[i]
    x32 = x.clone().requires_grad_()
    ref = plain(x32)
    ref.pow(2).sum().backward()
    x16 = x.clone().requires_grad_()
    with autocast(CPU, True):
        out16 = fast(x16)
    out16.float().pow(2).sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref, rtol=1e-6, atol=1e-6)
    assert out16.dtype == torch.bfloat16 and rel_err(out16, ref) < 1e-2, name
    assert rel_err(x16.grad, x32.grad) < 2e-2, name


def test_sdpa_equals_reference_attention():
    model = tiny_dit().eval()
    x, t, y = torch.randn(3, 8, 4, 4), torch.rand(3), torch.tensor([0, 1, 2])
    fast = model(x, t, y)
    with sdpa_kernel(SDPBackend.MATH):
        ref = model(x, t, y)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_fused_adamw_equals_foreach():
    runs = []
    for fused in (True, False):
        model = tiny_dit().train()
        model.y_embedder.dropout_prob = 0.0
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), fused=fused,
                                foreach=not fused)
        for _ in range(3):
            dit_loss_and_grads(model)
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):  # updates are ~1e-3: equal to float precision
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_torch_compile_matches_eager():
    model = tiny_dit().eval()
    x, t, y = torch.randn(3, 8, 4, 4), torch.rand(3), torch.tensor([0, 1, 2])
    eager = model(x, t, y)
    compiled = torch.compile(model)(x, t, y)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_regional_compilation_compiles_one_block_for_all():
    """bench.compiled(--compile regional): each block compiled, one graph shared by the blocks, the
    eager results. (aot_eager: Dynamo and AOTAutograd as on the GPU, without Inductor's slow C++
    build here.)"""
    import torch._dynamo.utils

    model = tiny_dit().train()
    model.y_embedder.dropout_prob = 0.0
    loss, grads = dit_loss_and_grads(model)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    flags = bench.parse_args(["--compile", "regional"])
    assert bench.compiled(model, flags, backend="aot_eager") is model
    assert list(model.state_dict()) == list(tiny_dit().state_dict())  # no _orig_mod prefixes
    loss_c, grads_c = dit_loss_and_grads(model)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # two blocks, one graph
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fsdp_compiled_blocks_with_checkpointing_match_eager():
    """fsdp.parallelize with --fsdp (a process group of one) and --compile on: each block's
    forward compiled inside FSDP's hooks, recomputed in backward (gradient checkpointing); three
    AdamW steps give the eager unsharded model's losses and EMA, also when the EMA model draws (a
    sample grid's forward) between updates. Compiling takes ~30 s on 2 cores with a cold cache."""
    env, losses, emas = DistEnv(0, 0, 1, CPU), [], []
    for fsdp, compile in ((None, "off"), ("shard", "on")):
        model = randomize_(dit.LightningDiT(**TINY_DIT, grad_checkpointing=True), scale=0.05)
        ema = EMA(model, 0.5)
        flags = argparse.Namespace(fsdp=fsdp, compile=compile, precision="fp32")
        train_model = parallelize(model, ema, env, flags)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        torch.manual_seed(0)  # the class dropout's
        for _ in range(3):
            x1, y = torch.randn(6, 8, 4, 4, generator=g), torch.randint(0, 5, (6,), generator=g)
            loss, _ = dit.flow_matching_loss(train_model, x1, y, generator=g)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)  # a DTensor norm under FSDP
            opt.step()
            opt.zero_grad()
            ema.update(model)
            with torch.no_grad():  # as a sample grid does; then the next update must still work
                ema.model(x1, torch.full((6,), 0.5), y)
            losses.append(loss.item())
        state = ema.state_dict()  # DTensors under FSDP, but for the buffers (RoPE tables)
        emas.append({k: v.full_tensor() if hasattr(v, "full_tensor") else v
                     for k, v in state.items()})
    cleanup_distributed()
    torch.testing.assert_close(losses[:3], losses[3:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emas[0], emas[1], rtol=1e-4, atol=1e-5)  # Adam amplifies rounding


def test_batched_cfg_equals_two_forwards():
    model = tiny_dit().eval()
    y, noise = torch.tensor([0, 3]), torch.randn(2, 8, 4, 4)
    batched = sample.sample_latents(model, y, noise, steps=5, cfg_scale=2.0)
    two_pass = sample.sample_latents(bench.two_pass(model), y, noise, steps=5, cfg_scale=2.0,
                                     null=torch.full_like(y, model.num_classes))
    torch.testing.assert_close(batched, two_pass, rtol=1e-5, atol=1e-5)


def tokenizer_parts(model, disc, lpips, x, bf16=False):
    with autocast(CPU, bf16):
        loss, _, parts = tokenizer_loss(model, x, lpips, disc, None)
    return {k: v.detach().float() for k, v in parts.items()}


def test_tokenizer_channels_last_and_bf16_match_fp32():
    torch.manual_seed(0)
    model = AlignedTokenizer(dict(encoder="tiny", image_size=32, decoder_ch=32,
                                  decoder_res_blocks=1))
    disc = PatchGAN(8).eval()  # eval: BatchNorm's fixed statistics make repeated calls comparable
    lpips = build_lpips(random_backbone=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ref = tokenizer_parts(model, disc, lpips, x)
    cl_model, cl_disc = copy.deepcopy(model), copy.deepcopy(disc)
    cl_model.decoder.to(memory_format=torch.channels_last)
    cl_disc.to(memory_format=torch.channels_last)
    cl = tokenizer_parts(cl_model, cl_disc, lpips, x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)
    bf16 = tokenizer_parts(model, disc, lpips, x, bf16=True)
    for k in ("l1", "lpips", "g_loss"):
        assert abs(bf16[k] - ref[k]) / ref[k].abs() < 2e-2, k
    # The adaptive GAN weight is a ratio of two gradient norms taken in bf16, so it moves by a few
    # per cent; at this random init w_g * g_loss dominates the total loss, so the parts are
    # compared, not the total.
    assert abs(bf16["w_g"] - ref["w_g"]) / ref["w_g"] < 0.1


@pytest.mark.parametrize("part", ["dit", "sample", "tokenizer", "t2i", "t2i --fsdp",
                                  "sample --attention math --cfg_two_pass"])
def test_benchmark_command_runs_on_cpu(part, tmp_path):
    out = tmp_path / "bench.json"
    rows = bench.main(["--part", *part.split(), "--device", "cpu", "--warmup", "0", "--iters", "1",
                       "--repeats", "1", "--batch_size", "2", "--json", str(out)])
    assert rows == json.load(open(out))["rows"]
    assert rows and all(r["img_per_s"] > 0 and r["peak_mem_gib"] > 0 for r in rows)
    if part == "tokenizer":
        assert [r["part"] for r in rows] == [f"tokenizer stage {s} train" for s in (1, 2, 3)]
        assert all(r["gflops_per_image"] > 0 for r in rows)
    if part.startswith("t2i"):  # the frozen tokenizer and a (tiny, random) T5 encoder, timed too
        assert 0 < rows[0]["encoders_share"] < 1 and rows[0]["encoders_ms"] > 0


def test_benchmark_profile_and_first_step(tmp_path):
    """--profile DIR: the operator table and the Chrome trace of two steps after the timing."""
    rows = bench.main(["--part", "dit", "--device", "cpu", "--warmup", "1", "--iters", "1",
                       "--repeats", "1", "--batch_size", "2", "--profile", str(tmp_path)])
    assert rows[0]["first_step_s"] > 0
    table = (tmp_path / "dit_b2.txt").read_text()
    assert "self_cpu_time_total" in table and "aten::mm" in table
    assert (tmp_path / "dit_b2.json.gz").stat().st_size > 0


def test_benchmark_sweep_goes_on_past_a_batch_that_does_not_fit(monkeypatch):
    def part(args, batch):
        if batch > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [{"part": "fake", "batch": batch}]

    monkeypatch.setitem(bench.PARTS, "dit", part)
    rows = bench.main(["--part", "dit", "--device", "cpu", "--batch_size", "2", "4", "1"])
    assert rows == [{"part": "fake", "batch": 2},
                    {"part": "dit", "batch": 4, "out_of_memory": True},
                    {"part": "fake", "batch": 1}]


FAKE_OFFICIAL = """
# the official models/rmsnorm.py imports these
import fairscale.nn.model_parallel.initialize as fs_init
from fairscale.nn.model_parallel.layers import (ColumnParallelLinear, ParallelEmbedding,
                                                RowParallelLinear)

import dit


# the official constructor's flags, checked as bench.py must set them
class LightningDiT(dit.LightningDiT):
    def __init__(self, use_swiglu, use_rope, use_rmsnorm, use_qknorm, **kwargs):
        assert use_swiglu and use_rope and use_rmsnorm and not use_qknorm
        super().__init__(**kwargs)


LightningDiT_models = {}
"""


def test_benchmark_against_an_official_checkout(tmp_path):
    """--vs_official imports a checkout's models/lightningdit.py (with fairscale stood in) and times
    its step next to ours. A stand-in checkout here: the real one needs timm and einops, not
    dependencies."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("")
    (tmp_path / "models" / "lightningdit.py").write_text(FAKE_OFFICIAL)
    rows = bench.main(["--part", "dit", "--device", "cpu", "--warmup", "0", "--iters", "1",
                       "--repeats", "1", "--batch_size", "2", "3", "--vs_official", str(tmp_path)])
    expected = [("dit B/1 train", 2), ("official LightningDiT train", 2),
                ("dit B/1 train", 3), ("official LightningDiT train", 3)]
    assert [(r["part"], r["batch"]) for r in rows] == expected
    assert all(r["speedup_vs_official"] > 0 for r in rows[::2])


def test_readme_gpu_script_parses():
    """Every `step NAME SECONDS ARGS` of the README's GPU script is a valid bench.py command."""
    import os
    import re
    import shlex

    readme = open(os.path.join(os.path.dirname(bench.__file__), "README.md")).read()
    script = next(b for b in re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
                  if "TORCHINDUCTOR_CACHE_DIR" in b)
    steps = [shlex.split(line, comments=True) for line in script.splitlines()
             if line.startswith("step ")]
    assert len(steps) >= 8 and all(int(words[2]) > 0 for words in steps)
    for words in steps:
        bench.parse_args(words[3:])
