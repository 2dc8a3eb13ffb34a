"""The GPU fast paths give the results of the plain float32 path (within bf16 tolerance where bf16 is
involved), checked on the CPU: bf16 autocast, SDPA vs reference attention, fused optimisers,
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
from common import EMA, DistEnv, autocast, cleanup_distributed, parallelize
from conftest import randomize_
from tokenizer import AlignedTokenizer, PatchGAN, build_lpips, tokenizer_loss

CPU = torch.device("cpu")
TINY_DIT = dict(input_size=4, patch_size=1, in_channels=8, hidden_size=64, depth=2, num_heads=4, num_classes=5)


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
    assert rel_err(torch.cat([g.flatten() for g in grads16]), torch.cat([g.flatten() for g in grads32])) < 5e-2


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
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), fused=fused, foreach=not fused)
        for _ in range(3):
            dit_loss_and_grads(model)
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # updates are ~1e-3: equal to float precision


def test_torch_compile_matches_eager():
    model = tiny_dit().eval()
    x, t, y = torch.randn(3, 8, 4, 4), torch.rand(3), torch.tensor([0, 1, 2])
    eager = model(x, t, y)
    compiled = torch.compile(model)(x, t, y)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_fsdp_compiled_blocks_with_checkpointing_match_eager():
    """common.parallelize with --fsdp (a process group of one) and --compile on: each block's
    forward compiled inside FSDP's hooks, recomputed in backward (gradient checkpointing); three
    AdamW steps give the eager unsharded model's losses and EMA. Compiling takes ~30 s on 2 cores
    with a cold cache."""
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
            losses.append(loss.item())
        state = ema.state_dict()  # DTensors under FSDP, but for the buffers (RoPE tables)
        emas.append({k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()})
    cleanup_distributed()
    torch.testing.assert_close(losses[:3], losses[3:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emas[0], emas[1], rtol=1e-4, atol=1e-5)  # Adam amplifies rounding


def test_batched_cfg_equals_two_forwards():
    model = tiny_dit().eval()
    y, noise = torch.tensor([0, 3]), torch.randn(2, 8, 4, 4)
    batched = sample.sample_latents(model, y, noise, steps=5, cfg_scale=2.0)
    two_pass = sample.sample_latents(bench.TwoPass(model), y, noise, steps=5, cfg_scale=2.0)
    torch.testing.assert_close(batched, two_pass, rtol=1e-5, atol=1e-5)


def tokenizer_parts(model, disc, lpips, x, bf16=False):
    with autocast(CPU, bf16):
        loss, _, parts = tokenizer_loss(model, x, lpips, disc, None)
    return {k: v.detach().float() for k, v in parts.items()}


def test_tokenizer_channels_last_and_bf16_match_fp32():
    torch.manual_seed(0)
    model = AlignedTokenizer(dict(encoder="tiny", image_size=32, decoder_ch=32, decoder_res_blocks=1))
    disc = PatchGAN(8).eval()  # eval: BatchNorm uses fixed statistics, so repeated calls are comparable
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
    # The adaptive GAN weight is a ratio of two gradient norms taken in bf16, so it moves by a few per
    # cent; at this random init w_g * g_loss dominates the total loss, so the parts are compared, not the total.
    assert abs(bf16["w_g"] - ref["w_g"]) / ref["w_g"] < 0.1


@pytest.mark.parametrize("part", ["dit", "sample", "tokenizer", "fid", "t2i", "t2i --fsdp"])
def test_benchmark_command_runs_on_cpu(part, tmp_path):
    out = tmp_path / "bench.json"
    rows = bench.main(["--part", *part.split(), "--device", "cpu", "--warmup", "0", "--iters", "1",
                       "--repeats", "1", "--batch_size", "2", "--json", str(out)])
    assert rows == json.load(open(out))["rows"]
    assert rows and all(r["img_per_s"] > 0 and r["peak_mem_gib"] > 0 for r in rows)
    if part == "tokenizer":
        assert [r["part"] for r in rows] == [f"tokenizer stage {s} train" for s in (1, 2, 3)]
        assert all(r["gflops_per_image"] > 0 for r in rows)


FAKE_OFFICIAL = """
import fairscale.nn.model_parallel.initialize as fs_init  # the official models/rmsnorm.py imports these
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear

import dit


class LightningDiT(dit.LightningDiT):  # the official constructor's flags, checked as bench.py must set them
    def __init__(self, use_swiglu, use_rope, use_rmsnorm, use_qknorm, **kwargs):
        assert use_swiglu and use_rope and use_rmsnorm and not use_qknorm
        super().__init__(**kwargs)


LightningDiT_models = {}
"""


def test_benchmark_against_an_official_checkout(tmp_path):
    """--vs_official imports a checkout's models/lightningdit.py (with fairscale stood in) and times its
    step next to ours. A stand-in checkout here: the real one needs timm and einops, not dependencies."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("")
    (tmp_path / "models" / "lightningdit.py").write_text(FAKE_OFFICIAL)
    rows = bench.main(["--part", "dit", "--device", "cpu", "--warmup", "0", "--iters", "1", "--repeats", "1",
                       "--batch_size", "2", "3", "--vs_official", str(tmp_path)])
    assert [(r["part"], r["batch"]) for r in rows] == [("dit B/1 train", 2), ("official LightningDiT train", 2),
                                                        ("dit B/1 train", 3), ("official LightningDiT train", 3)]
    assert all(r["speedup_vs_official"] > 0 for r in rows[::2])
