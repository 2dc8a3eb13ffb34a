"""The tokenizer (DINOv2 encoder, adapter, decoder, losses) and its three training stages."""

import json
import math
import os
import signal
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

import common
import train_tokenizer
from baselines import load_tokenizer
from common import EXIT_STOPPED, MissingWeightsError, UserError, load_checkpoint
from conftest import ROOT, run_torchrun, wait_for_log
from tokenizer import (DINOV2_VARIANTS, TRAINABLE, AlignedTokenizer, Decoder, DINOv2, PatchGAN,
                       build_dinov2, build_lpips, default_config, semantic_reference,
                       set_trainable, tokenizer_loss)

REF = os.path.join(os.path.dirname(__file__), "reference")
TINY_CFG = dict(encoder="tiny", image_size=32, decoder_ch=32, decoder_res_blocks=1)
# A tiny stage run on the demo set: a 2-block 64-wide encoder, 32-px images, a 2M-parameter decoder.
TINY_ARGS = ["--encoder", "tiny", "--random_encoder", "--random_lpips", "--image_size", "32",
             "--decoder_ch", "32", "--decoder_res_blocks", "1", "--disc_ch", "8",
             "--batch_size", "4", "--demo_images", "16", "--num_workers", "0", "--device", "cpu",
             "--log_every", "1", "--grid_every", "1000"]


def read_reference_keys(name):
    rows = []
    with open(os.path.join(REF, name)) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            key, shape, _ = line.rstrip("\n").split("\t")
            rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    return rows


def read_log(run_dir, stage):
    """The per-step records of log.jsonl (the first record holds the run's flags)."""
    path = os.path.join(run_dir, f"stage{stage}", "log.jsonl")
    with open(path) as f:
        first = json.loads(f.readline())
    assert first["event"] == "start" and first["args"]["stage"] == stage
    return common.read_log(path)


# --------------------------------------------------------------------------------------------------
# DINOv2


@pytest.mark.parametrize("name", sorted(DINOV2_VARIANTS))
def test_dinov2_state_dict_matches_official_keys(name):
    with torch.device("meta"):
        model = DINOv2(**DINOV2_VARIANTS[name])
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    official = read_reference_keys(f"dinov2_keys_{name.removeprefix('dinov2_')}.txt")
    assert sorted(ours) == sorted(official)


def test_strict_load_roundtrip_and_wrong_variant(tmp_path):
    torch.manual_seed(0)
    model = DINOv2(**DINOV2_VARIANTS["dinov2_vits14"])
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(model.state_dict(), path)
    loaded = build_dinov2("dinov2_vits14", ckpt=str(path))
    x = torch.randn(1, 3, 56, 70)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    with pytest.raises(UserError, match="does not hold dinov2_vitb14 weights"):
        build_dinov2("dinov2_vitb14", ckpt=str(path))


def test_missing_dinov2_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, dst, *a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(MissingWeightsError) as err:
        build_dinov2("dinov2_vitl14_reg")
    msg = str(err.value)
    assert "dinov2_vitl14_reg4_pretrain.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert "--encoder_ckpt" in msg and "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/" in msg
    assert "--random_encoder" in msg  # the offline way out, for tests and demos
    with pytest.raises(MissingWeightsError, match="(?s)vgg16-397923af.pth.*--random_lpips"):
        build_lpips()
    with pytest.raises(UserError, match="unknown encoder"):
        build_dinov2("dinov3_vitl16")


def test_random_lpips_is_seeded_and_quiet():
    """The random LPIPS stand-in is the same network in every run (so --eval is repeatable),
    building it leaves the global RNG alone, and torchvision's deprecation warning is not shown."""
    import warnings

    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = build_lpips(random_backbone=True)
    assert torch.equal(torch.rand(3), before)
    assert not [w for w in caught if "pretrained" in str(w.message) or "weights" in str(w.message)]
    b, c = build_lpips(random_backbone=True), build_lpips(random_backbone=True, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y)
                   for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(a(x, y), b(x, y))


def _cubic_resize_matrix(n_in, n_out, scale):
    """Rows of weights that PyTorch's bicubic (no antialias, align_corners=False, A=-0.75) applies,
    written from the textbook definition: source x = (i + 0.5) / scale - 0.5, 4 taps, edges
    clamped."""
    A = -0.75

    def kernel(d):
        d = abs(d)
        if d <= 1:
            return ((A + 2) * d - (A + 3)) * d * d + 1
        if d < 2:
            return ((A * d - 5 * A) * d + 8 * A) * d - 4 * A
        return 0.0

    W = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        f = int(np.floor(src))
        for tap in range(f - 1, f + 3):
            W[i, min(max(tap, 0), n_in - 1)] += kernel(src - tap)
    return W


@pytest.mark.parametrize("hw", [(224, 224), (224, 308)])
def test_pos_embed_interpolation_plain_models(hw):
    """The plain hub models pass scale factor (n + 0.1) / 37, which moves the sample points."""
    torch.manual_seed(0)
    model = DINOv2(embed_dim=8, depth=1, num_heads=2)  # 518 px -> 37 x 37 positions
    h, w = hw[0] // 14, hw[1] // 14
    got = model.interpolate_pos_encoding(h, w, torch.float32)[0]
    grid = model.pos_embed[0, 1:].detach().double().reshape(37, 37, 8).numpy()
    Wh = _cubic_resize_matrix(37, h, (h + 0.1) / 37)
    Ww = _cubic_resize_matrix(37, w, (w + 0.1) / 37)
    want = np.einsum("ia,abc,jb->ijc", Wh, grid, Ww).reshape(h * w, 8)
    assert got.shape == (1 + h * w, 8)
    torch.testing.assert_close(got[0], model.pos_embed[0, 0].detach())  # CLS position unchanged
    np.testing.assert_allclose(got[1:].detach().numpy(), want, atol=1e-5)


@pytest.mark.parametrize("hw", [(224, 224), (224, 308)])
def test_pos_embed_interpolation_reg_models(hw):
    """The _reg models resize to the grid size with antialiasing, which is PIL's bicubic filter."""
    torch.manual_seed(0)
    model = DINOv2(embed_dim=4, depth=1, num_heads=2, registers=True)
    h, w = hw[0] // 14, hw[1] // 14
    got = model.interpolate_pos_encoding(h, w, torch.float32)[0, 1:].detach().reshape(h, w, 4)
    grid = model.pos_embed[0, 1:].detach().reshape(37, 37, 4).numpy()
    for c in range(4):
        channel = Image.fromarray(grid[:, :, c].astype(np.float32), mode="F")
        want = np.asarray(channel.resize((w, h), Image.BICUBIC))
        np.testing.assert_allclose(got[:, :, c].numpy(), want, atol=2e-5)


def test_encoder_drops_cls_and_registers():
    torch.manual_seed(0)
    model = DINOv2(embed_dim=16, depth=1, num_heads=2, registers=True)
    out = model(torch.randn(2, 3, 28, 42))
    assert out.shape == (2, 2 * 3, 16)
    # Registers carry no position: changing them changes the output, but the count stays 6 patches.
    with pytest.raises(ValueError, match="multiples of 14"):
        model(torch.randn(1, 3, 30, 28))


def test_tokens_stay_float32_under_bf16_autocast():
    """As in the official model: CLS and position embeddings join the bf16 patch embeddings in
    float32."""
    torch.manual_seed(0)
    model = DINOv2(embed_dim=16, depth=1, num_heads=2, registers=True)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(1, 3, 28, 28))
    assert seen == [torch.float32]


# --------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_shapes_and_default_sizes():
    with torch.device("meta"):
        big = AlignedTokenizer(default_config())
    assert big.latent_shape == (32, 16, 16)
    n_dec = sum(p.numel() for p in Decoder().parameters())
    assert 40e6 < n_dec < 43e6  # "about 42M"
    tok = AlignedTokenizer(TINY_CFG)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_hat, z = tok(x)
    assert z.shape == (2, 32, 2, 2) and x_hat.shape == x.shape
    torch.testing.assert_close(tok.decode(tok.encode(x)), x_hat)
    assert PatchGAN(8)(x).shape[:2] == (2, 1)
    # Any size and aspect ratio.
    assert tok.encode(torch.rand(2, 3, 48, 80) * 2 - 1).shape == (2, 32, 3, 5)
    with pytest.raises(UserError, match="multiples of 16"):
        tok.encode(torch.rand(2, 3, 40, 40))
    with pytest.raises(UserError, match="to_model_range"):
        tok.encode(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_preprocess_is_imagenet_normalised_224():
    tok = AlignedTokenizer({**TINY_CFG, "image_size": 256})
    x = torch.ones(1, 3, 256, 256) * 0.5  # [-1, 1] -> 0.75 in [0, 1]
    out = tok.preprocess(x)
    assert out.shape == (1, 3, 224, 224)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(out[0, :, 100, 100], (0.75 - mean) / std)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_trains_exactly_its_parts(stage):
    torch.manual_seed(0)
    model = AlignedTokenizer(TINY_CFG)
    ref = None
    if stage == 2:
        ref = AlignedTokenizer(TINY_CFG).requires_grad_(False)
        ref.load_state_dict(model.state_dict())
    set_trainable(model, stage)
    lpips = build_lpips(random_backbone=True)
    disc = PatchGAN(8)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    loss, _, parts = tokenizer_loss(model, x, lpips, disc, ref)
    loss.backward()
    trained = {name.split(".")[0] for name, p in model.named_parameters()
               if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == set(TRAINABLE[stage])
    # Every trainable parameter gets a gradient (DDP needs it).
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
        trains = name.split(".")[0] in trained and name != "encoder.mask_token"
        assert p.requires_grad == trains, name
    assert all(p.grad is None for p in disc.parameters())  # the tokenizer loss does not train D
    assert all(p.grad is None for p in lpips.parameters())
    assert set(parts) >= {"l1", "lpips", "g_loss", "w_g", "loss"}
    assert ("sp" in parts) == (stage == 2)
    if stage == 2:
        assert parts["sp"].item() == 0.0  # same weights, same image: z == z_ref


def test_trained_and_frozen_encoders_run_the_same_kernels():
    """Stage 2's L_sp is exactly 0 at the first step only if the trained encoder and its frozen copy
    call the same kernels: a matmul that runs mm with grad and bmm without rounds differently on
    some CPUs (it did, on a strided token slice)."""
    from torch.profiler import profile

    torch.manual_seed(0)
    model = AlignedTokenizer(TINY_CFG)
    set_trainable(model, 2)
    ref = semantic_reference(model)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    ops = []
    for grad, net in ((True, model), (False, ref)):
        with torch.set_grad_enabled(grad), profile() as prof:
            net.encode(x)
        ops.append([e.name for e in prof.events()])
    assert ops[0] == ops[1]


def test_tiny_tokenizer_overfits_one_batch():
    torch.manual_seed(0)
    model = AlignedTokenizer(TINY_CFG)
    set_trainable(model, 1)
    lpips = build_lpips(random_backbone=True)
    from data import DemoShapes, to_model_range
    ds = DemoShapes(2, 32)
    x = to_model_range(torch.stack([ds[i][0] for i in range(2)]), torch.device("cpu"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=2e-3, betas=(0.5, 0.9))
    losses = []
    for _ in range(80):
        loss, _, parts = tokenizer_loss(model, x, lpips)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(parts["loss"].item())
    assert min(losses[-10:]) < losses[0] / 4, (losses[0], losses[-10:])


# --------------------------------------------------------------------------------------------------
# The training script


def test_three_stages_chain_and_freeze(tmp_path, capsys):
    run = str(tmp_path)
    train_tokenizer.main(["--stage", "1", "--steps", "3", "--disc_start", "1", "--run_dir", run,
                          *TINY_ARGS])
    # Stages 2 and 3 without --random_encoder: they inherit it from stage 1's export and say so.
    later = [a for a in TINY_ARGS if a != "--random_encoder"]
    train_tokenizer.main(["--stage", "2", "--steps", "2", "--disc_start", "0", "--run_dir", run,
                          *later])
    train_tokenizer.main(["--stage", "3", "--steps", "2", "--disc_start", "0", "--run_dir", run,
                          *later])
    exports = {s: load_checkpoint(os.path.join(run, f"stage{s}", "tokenizer.pt"))["ema"]
               for s in (1, 2, 3)}
    ckpt1 = load_checkpoint(os.path.join(run, "stage1", "ckpt.pt"))

    def same(a, b, part):
        return all(torch.equal(a[k], b[k]) for k in a if k.startswith(part + "."))

    # Stage 1: the encoder stayed as built (raw weights == EMA weights), the decoder learned.
    assert same(ckpt1["model"], ckpt1["ema"], "encoder")
    assert not same(ckpt1["model"], ckpt1["ema"], "decoder")
    # Stage 2 changed the encoder; stage 3 kept encoder and adapter and changed only the decoder.
    assert not same(exports[1], exports[2], "encoder")
    assert not same(exports[1], exports[2], "adapter")
    assert same(exports[2], exports[3], "encoder") and same(exports[2], exports[3], "adapter")
    assert not same(exports[2], exports[3], "decoder")
    log2 = read_log(run, 2)
    assert log2[0]["sp"] == 0.0 and log2[1]["sp"] > 0.0  # L_sp starts at exactly zero
    log1 = read_log(run, 1)
    assert "d_loss" in log2[0] and "g_loss" in log1[1] and "g_loss" not in log1[0]
    assert os.path.exists(os.path.join(run, "stage3", "recon_0000002.png"))
    assert load_checkpoint(os.path.join(run, "stage3", "tokenizer.pt"))["random_encoder"]
    with open(os.path.join(run, "stage3", "log.jsonl")) as f:
        assert json.loads(f.readline())["random_encoder"]  # the start record
    assert "encoder grew from RANDOM weights" in capsys.readouterr().out
    tok = load_tokenizer(os.path.join(run, "stage3", "tokenizer.pt"))
    assert tok.latent_shape == (32, 2, 2)
    # --eval: reconstruction metrics of the final tokenizer on a few demo images.
    out = os.path.join(run, "eval.json")
    metrics = train_tokenizer.main(["--eval", "--run_dir", run, "--eval_images", "6", "--rfid",
                                    "--random_inception", "--json", out, *TINY_ARGS])
    assert metrics == json.load(open(out)) and metrics["images"] == 6
    assert 0 < metrics["psnr"] < 60 and -1 <= metrics["ssim"] <= 1 and metrics["lpips"] > 0
    assert math.isfinite(metrics["rfid"]) and metrics["rfid"] >= 0
    assert "RANDOM" in metrics["inception_weights"]
    assert metrics["encoder"] == "tiny (grown from RANDOM weights)"


def test_resume_equals_uninterrupted_run(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["--stage", "1", "--disc_start", "2", *TINY_ARGS]
    train_tokenizer.main([*common, "--steps", "6", "--run_dir", a])
    train_tokenizer.main([*common, "--steps", "3", "--run_dir", b])
    train_tokenizer.main([*common, "--steps", "6", "--run_dir", b, "--resume"])
    la, lb = read_log(a, 1), read_log(b, 1)
    assert [r["step"] for r in lb] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(la, lb):
        for k in ("loss", "l1", "lpips", "g_loss", "d_loss"):
            assert ra.get(k) == rb.get(k), (ra["step"], k)
    ca, cb = (load_checkpoint(os.path.join(d, "stage1", "ckpt.pt")) for d in (a, b))
    for part in ("model", "ema", "disc"):
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), (part, k)


def test_bad_inputs_have_clear_messages(tmp_path):
    run = str(tmp_path)
    with pytest.raises(UserError, match="run --stage 1 first"):
        train_tokenizer.main(["--stage", "2", "--run_dir", run, *TINY_ARGS])
    with pytest.raises(UserError, match="training checkpoint to resume not found"):
        train_tokenizer.main(["--stage", "1", "--resume", "--run_dir", run, *TINY_ARGS])
    with pytest.raises(MissingWeightsError, match="--encoder_ckpt /nonexistent.pth does not exist"):
        train_tokenizer.main(["--stage", "1", "--run_dir", run, "--encoder", "dinov2_vits14",
                              "--encoder_ckpt", "/nonexistent.pth"])
    train_tokenizer.main(["--stage", "1", "--steps", "1", "--run_dir", run, *TINY_ARGS])
    with pytest.raises(UserError, match="pass --resume"):
        train_tokenizer.main(["--stage", "1", "--steps", "1", "--run_dir", run, *TINY_ARGS])
    with pytest.raises(UserError, match="--latent_channels 64 .checkpoint: 32."):
        train_tokenizer.main(["--stage", "2", "--run_dir", run, *TINY_ARGS,
                              "--latent_channels", "64"])
    with pytest.raises(UserError, match="comes from stage 1: pass --init with a stage-2 tokenizer"):
        train_tokenizer.main(["--stage", "3", "--init", os.path.join(run, "stage1", "tokenizer.pt"),
                              "--run_dir", run, *TINY_ARGS])
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": torch.zeros(1)}, bogus)
    with pytest.raises(UserError, match="not a tokenizer checkpoint"):
        train_tokenizer.main(["--stage", "2", "--init", str(bogus), "--run_dir", run, *TINY_ARGS])
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not read tokenizer checkpoint"):
        load_tokenizer(str(tmp_path / "garbage.pt"))
    with pytest.raises(SystemExit):
        train_tokenizer.parse_args(["--stage", "4"])


def test_nan_discriminator_loss_stops_before_a_save(tmp_path, monkeypatch):
    real, calls = train_tokenizer.hinge_d_loss, [0]

    def d_loss_with_a_nan(real_logits, fake_logits):
        calls[0] += 1
        loss = real(real_logits, fake_logits)
        return loss * float("nan") if calls[0] == 4 else loss

    monkeypatch.setattr(train_tokenizer, "hinge_d_loss", d_loss_with_a_nan)
    run = str(tmp_path)
    with pytest.raises(UserError, match="non-finite loss at step 4"):
        train_tokenizer.main(["--stage", "1", "--steps", "8", "--disc_start", "0",
                              "--ckpt_every", "2", "--run_dir", run, *TINY_ARGS])
    ckpt = load_checkpoint(os.path.join(run, "stage1", "ckpt.pt"))
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["disc"].values() if v.is_floating_point())


def test_sigterm_saves_a_checkpoint(tmp_path):
    run = str(tmp_path)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "train_tokenizer.py", "--stage", "1",
                             "--steps", "100000", "--run_dir", run, *TINY_ARGS],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    log = os.path.join(run, "stage1", "log.jsonl")
    wait_for_log(log, '"step": 1,')
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == EXIT_STOPPED, out[-2000:]
    ckpt = load_checkpoint(os.path.join(run, "stage1", "ckpt.pt"))
    assert 1 <= ckpt["step"] < 100000 and "continue with --resume" in out
    # Not finished: nothing exported.
    assert not os.path.exists(os.path.join(run, "stage1", "tokenizer.pt"))


def test_two_process_gloo_stages(tmp_path):
    run = str(tmp_path)
    # Stage 2 trains the encoder too: every trainable parameter must get a gradient.
    for stage in (1, 2):
        run_torchrun(["train_tokenizer.py", "--stage", str(stage), "--steps", "2",
                      "--disc_start", "1", "--run_dir", run, *TINY_ARGS])
        assert os.path.exists(os.path.join(run, f"stage{stage}", "tokenizer.pt"))
        assert [r["step"] for r in read_log(run, stage)] == [1, 2]


def test_encoder_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = DINOv2(embed_dim=16, depth=2, num_heads=2)
    x = torch.randn(2, 3, 28, 28)
    grads = []
    for ckpt in (False, True):
        model.grad_checkpointing = ckpt
        model.zero_grad()
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
