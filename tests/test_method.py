"""The method's formulas, each against an independent computation written here from the formula:

- tokenizer: the hinge discriminator loss, the adaptive GAN weight w_g, the composition of the
  tokenizer loss (L1 + lpips_weight LPIPS + sp_weight L_sp + w_g L_G, in value and in gradient),
  both forms of L_sp, and the frozen stage-2 reference;
- common.EMA: ema <- decay ema + (1 - decay) weights, buffers copied, frozen parameters untouched;
- flow matching: the MSE and the per-position cosine term over the channel dim (test_dit.py's oracle
  and zero predictions cannot tell which dim the cosine uses);
- the training scripts: the GAN starts at 20% of --steps, the discriminator's hinge loss sees the
  real images as real and the detached reconstruction as fake, the latents are normalised with the
  stored statistics, labels are dropped (CFG) while training, and the published optimiser and EMA
  settings are the defaults and are the ones the optimisers and EMAs get.

Kept out (pinned elsewhere): x_t and the velocity target (test_dit.py), the CFG combination and the
time shift (test_sample.py), which parts each stage trains (test_tokenizer.py).
"""

import inspect
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import dit
import train_dit
import train_tokenizer
from common import EMA, load_checkpoint
from dit import flow_matching_loss
from tokenizer import (AlignedTokenizer, PatchGAN, adaptive_gan_weight, build_lpips, hinge_d_loss,
                       semantic_preservation_loss, semantic_reference, set_trainable,
                       tokenizer_loss)

TINY_CFG = dict(encoder="tiny", image_size=32, decoder_ch=32, decoder_res_blocks=1)
# As tests/test_tokenizer.py's TINY_ARGS: a tiny stage-1 run on the demo set, a log record per step.
TINY_ARGS = ["--encoder", "tiny", "--random_encoder", "--random_lpips", "--image_size", "32",
             "--decoder_ch", "32", "--decoder_res_blocks", "1", "--disc_ch", "8",
             "--batch_size", "4", "--demo_images", "16", "--num_workers", "0", "--device", "cpu",
             "--log_every", "1", "--grid_every", "1000"]


@pytest.fixture(scope="module")
def lpips():
    return build_lpips(random_backbone=True)


# --------------------------------------------------------------------------------------------------
# The discriminator's hinge loss


def test_hinge_d_loss_formula():
    """0.5 * (mean relu(1 - real) + mean relu(1 + fake)): real logits pushed above +1, fake
    below -1."""
    real, fake = torch.tensor([2.0, 0.5, -1.0, 1.0]), torch.tensor([-2.0, 0.5, 1.5, -1.0])
    # relu(1 - real) = [0, 0.5, 2, 0]; relu(1 + fake) = [0, 1.5, 2.5, 0]
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 4 + 4.0 / 4))
    # A perfect discriminator (margins met) has zero loss; swapping its logits costs 0.5 * (3 + 3).
    assert hinge_d_loss(torch.full((3,), 2.0), torch.full((3,), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.full((3,), -2.0), torch.full((3,), 2.0)).item() == pytest.approx(3.0)
    # PatchGAN-shaped logits, real and fake batches of different sizes: each term is its own mean.
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(2, 1, 3, 3, generator=g) * 2, torch.randn(3, 1, 2, 2, generator=g) * 2
    want = 0.5 * (torch.clamp(1 - real, min=0).mean() + torch.clamp(1 + fake, min=0).mean())
    torch.testing.assert_close(hinge_d_loss(real, fake), want)


# --------------------------------------------------------------------------------------------------
# The adaptive GAN weight


def test_adaptive_gan_weight_formula():
    """w = scale * ||dL_nll/dW|| / (||dL_G/dW|| + 1e-4) with W the given tensor only, detached.
    Linear losses in W have the known gradients a and b."""
    g = torch.Generator().manual_seed(0)
    W = nn.Parameter(torch.randn(4, 3, generator=g))
    V = nn.Parameter(torch.randn(5, generator=g))  # another parameter: its gradients must not count
    a, b = torch.randn(4, 3, generator=g) * 3, torch.randn(4, 3, generator=g) * 0.5
    nll = (W * a).sum() + 100 * V.sum()
    g_loss = (W * b).sum() + 7 * V.sum()
    ratio = a.norm() / (b.norm() + 1e-4)
    assert ratio > 2  # the inverse ratio would be far off
    w = adaptive_gan_weight(nll, g_loss, W, 0.3)
    torch.testing.assert_close(w, 0.3 * ratio)
    assert not w.requires_grad
    # Default scale 0.5.
    torch.testing.assert_close(adaptive_gan_weight(nll, g_loss, W), 0.5 * ratio)
    # The graphs survive (the caller backpropagates the full loss afterwards), and w acts as a
    # constant.
    (nll + w * g_loss).backward()
    torch.testing.assert_close(W.grad, a + w * b)


def test_adaptive_gan_weight_clamp():
    """The ratio is clamped to [0, 1e4] and then scaled (as LDM/taming do): with no GAN gradient at
    W the weight is scale * 1e4, not 1e4."""
    W = nn.Parameter(torch.ones(2, 2))
    a = torch.full((2, 2), 5.0)  # ||a|| = 10: 10 / 1e-4 = 1e5 > 1e4
    w = adaptive_gan_weight((W * a).sum(), (W * 0).sum(), W, 0.3)
    assert w.item() == pytest.approx(0.3 * 1e4)


# --------------------------------------------------------------------------------------------------
# The tokenizer loss


class StubDisc(nn.Module):
    """D(x) = w . x over the channels + c, one logit per pixel: L_G has a closed form."""

    W, C = (0.5, -1.0, 2.0), 0.3

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(self.W))
        self.c = nn.Parameter(torch.tensor(self.C))

    def forward(self, x):
        return torch.einsum("bchw,c->bhw", x, self.w)[:, None] + self.c


def stage2_setup(seed=0):
    """A stage-2 tokenizer whose latent has drifted from its frozen reference (so L_sp > 0)."""
    torch.manual_seed(seed)
    model = AlignedTokenizer(TINY_CFG)
    set_trainable(model, 2)
    ref = semantic_reference(model)
    with torch.no_grad():
        model.adapter.fc2.weight.add_(0.05 * torch.randn_like(model.adapter.fc2.weight))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    return model, ref, x


def cosine_sp(z, z_ref):
    """Mean over (sample, position) of 1 - <z, z_ref> / (|z| |z_ref|), the products over
    channels."""
    z, z_ref = z.double(), z_ref.double()
    cos = (z * z_ref).sum(1) / (z.norm(dim=1) * z_ref.norm(dim=1))
    return (1 - cos).mean()


def test_tokenizer_loss_composition(lpips):
    """loss = l1 + lpips_weight lpips + sp_weight sp + w_g g_loss, every part from its definition,
    with non-default weights; the gradient is that of the same sum with w_g a constant and L_G
    reaching the decoder through D(x_hat)."""
    model, ref, x = stage2_setup()
    disc = StubDisc()
    lw, dw, sw = 0.7, 0.3, 2.5
    loss, x_hat_out, parts = tokenizer_loss(model, x, lpips, disc, ref, lpips_weight=lw,
                                            disc_weight=dw, sp_weight=sw)
    params = [p for p in model.parameters() if p.requires_grad]
    got_grads = torch.autograd.grad(loss, params)

    z = model.encode(x)
    x_hat = model.decode(z)
    l1 = (x_hat - x).abs().mean()
    lp = lpips(x_hat, x).mean()
    with torch.no_grad():
        z_ref = ref.encode(x)
    sp = ((z - z_ref) ** 2).mean()
    logits = (x_hat * torch.tensor(StubDisc.W).view(1, 3, 1, 1)).sum(1) + StubDisc.C
    g_loss = -logits.mean()
    W = model.decoder.conv_out.weight  # the decoder's last layer
    nll = l1 + lw * lp
    n_nll = torch.autograd.grad(nll, W, retain_graph=True)[0].norm()
    n_g = torch.autograd.grad(g_loss, W, retain_graph=True)[0].norm()
    w_g = (dw * n_nll / (n_g + 1e-4)).detach()
    want = l1 + lw * lp + sw * sp + w_g * g_loss

    torch.testing.assert_close(x_hat_out, x_hat)
    for name, value in (("l1", l1), ("lpips", lp), ("sp", sp), ("g_loss", g_loss), ("w_g", w_g),
                        ("loss", want)):
        torch.testing.assert_close(parts[name], value, msg=lambda m, name=name: f"{name}: {m}")
    assert sp.item() > 1e-4 and 1e-3 < w_g.item() < 1e3  # every term is present and matters
    assert not parts["w_g"].requires_grad
    want_grads = torch.autograd.grad(want, params)
    for p_got, p_want in zip(got_grads, want_grads):
        torch.testing.assert_close(p_got, p_want, rtol=1e-4, atol=1e-7)
    # D judged but did not learn, and is trainable again for its own step.
    assert all(p.requires_grad and p.grad is None for p in disc.parameters())


def test_tokenizer_loss_without_gan_or_reference(lpips):
    """Before the GAN starts and outside stage 2 the loss is the reconstruction alone."""
    torch.manual_seed(1)
    model = AlignedTokenizer(TINY_CFG)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    loss, _, parts = tokenizer_loss(model, x, lpips, lpips_weight=0.7, sp_weight=2.5)
    with torch.no_grad():
        x_hat = model.decode(model.encode(x))
        want = (x_hat - x).abs().mean() + 0.7 * lpips(x_hat, x).mean()
    torch.testing.assert_close(loss.detach(), want)
    assert set(parts) == {"l1", "lpips", "loss"}


def test_semantic_preservation_cosine_over_channels(lpips):
    """The "cosine" form: 1 - cosine over the channel dim, averaged over samples and positions.
    Every dim has its own size, so a cosine over another dim cannot match."""
    g = torch.Generator().manual_seed(0)
    z, z_ref = torch.randn(2, 5, 3, 4, generator=g), torch.randn(2, 5, 3, 4, generator=g)
    torch.testing.assert_close(semantic_preservation_loss(z, z_ref, "cosine").double(),
                               cosine_sp(z, z_ref))
    torch.testing.assert_close(semantic_preservation_loss(z, z_ref, "mse").double(),
                               ((z.double() - z_ref.double()) ** 2).mean())
    assert semantic_preservation_loss(z, 3 * z, "cosine").abs().item() < 1e-6  # scale-free
    with pytest.raises(ValueError, match="mse or cosine"):
        semantic_preservation_loss(z, z_ref, "l1")
    # tokenizer_loss passes sp_loss on.
    model, ref, x = stage2_setup()
    with torch.no_grad():
        _, _, parts = tokenizer_loss(model, x, lpips, ref=ref, sp_loss="cosine")
        want = cosine_sp(model.encode(x), ref.encode(x))
    torch.testing.assert_close(parts["sp"].double(), want, rtol=1e-4, atol=1e-6)


def test_semantic_reference_is_a_frozen_copy_without_decoder():
    torch.manual_seed(0)
    model = AlignedTokenizer(TINY_CFG)
    set_trainable(model, 2)
    trainable_before = {n for n, p in model.named_parameters() if p.requires_grad}
    ref = semantic_reference(model)
    assert ref.decoder is None and model.decoder is not None
    assert not ref.training and all(not p.requires_grad for p in ref.parameters())
    # Model untouched.
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable_before
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z0 = model.encode(x)
        assert torch.equal(ref.encode(x), z0)
        for p in model.parameters():  # training moves the model's weights ...
            p.add_(0.01)
        assert not torch.allclose(model.encode(x), z0)
        assert torch.equal(ref.encode(x), z0)  # ... not the reference's


# --------------------------------------------------------------------------------------------------
# EMA


def test_ema_update_formula_buffers_and_frozen_parameters():
    """ema <- decay ema + (1 - decay) w for the trainable weights, step after step; buffers are
    copied; a parameter frozen when the EMA was made keeps its copied value."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    decay = 0.9  # not 0.5: decay and 1 - decay must be told apart
    ema = EMA(model, decay)
    assert not ema.model.training and all(not p.requires_grad for p in ema.model.parameters())
    want = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    frozen_start = model[2].weight.detach().clone()
    with torch.no_grad():
        for _ in range(3):
            for p in model.parameters():  # the frozen one changes too: the EMA must not follow it
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(torch.randn(4))
            model[1].running_var.mul_(2.0)
            model[1].num_batches_tracked.add_(5)
            ema.update(model)
            for n, p in model.named_parameters():
                if p.requires_grad:
                    want[n] = decay * want[n] + (1 - decay) * p.double()
    got = dict(ema.model.named_parameters())
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n].double(), want[n], rtol=1e-5, atol=1e-6)
    assert torch.equal(got["2.weight"], frozen_start)
    assert not torch.equal(got["2.weight"], model[2].weight)
    for name, b in model.named_buffers():
        assert torch.equal(dict(ema.model.named_buffers())[name], b), name


# --------------------------------------------------------------------------------------------------
# Flow matching: the loss terms


def test_flow_matching_loss_terms_against_formula():
    """mse = mean (v_pred - v)^2 over every element; cos = mean over (sample, position) of
    1 - cos(v_pred, v) over the channel dim; loss = mse + cos. eps is recovered from x_t with
    x_t = t x1 + (1 - t) eps (pinned in test_dit.py); distinct dim sizes expose a wrong cosine
    dim."""
    g = torch.Generator().manual_seed(0)
    x1, pred = torch.randn(3, 5, 2, 4, generator=g), torch.randn(3, 5, 2, 4, generator=g)
    seen = {}

    def model(x_t, t, y):
        seen.update(x_t=x_t, t=t)
        return pred

    loss, parts = flow_matching_loss(model, x1, None, generator=torch.Generator().manual_seed(1))
    t = seen["t"].double().view(-1, 1, 1, 1)
    eps = (seen["x_t"].double() - t * x1.double()) / (1 - t)
    v, p = x1.double() - eps, pred.double()
    mse = ((p - v) ** 2).mean()
    cos = (1 - (p * v).sum(1) / (p.norm(dim=1) * v.norm(dim=1))).mean()
    torch.testing.assert_close(parts["mse"].double(), mse, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(parts["cos"].double(), cos, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss.double(), mse + cos, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# The published defaults


def test_published_defaults_in_parse_args():
    tok = train_tokenizer.parse_args(["--stage", "1"])
    tok_settings = (tok.lr, tuple(tok.betas), tok.ema_decay, tok.batch_size)
    assert tok_settings == (1e-4, (0.5, 0.9), 0.999, 256)
    assert tok.disc_start is None  # -> 20% of --steps (test_gan_starts_at_20_percent_of_steps)
    weights = dict(lpips_weight=1.0, disc_weight=0.5, sp_weight=1.0, sp_loss="mse")
    assert {k: getattr(tok, k) for k in weights} == weights
    # The library function's own defaults are the same (callers other than the script get the
    # recipe).
    sig = inspect.signature(tokenizer_loss).parameters
    assert {k: sig[k].default for k in weights} == weights
    d = train_dit.parse_args([])
    dit_settings = (d.lr, tuple(d.betas), d.weight_decay, d.ema_decay, d.batch_size)
    assert dit_settings == (2e-4, (0.9, 0.95), 0.0, 0.9999, 1024)
    assert d.steps == 80_000  # 64 ImageNet epochs at batch 1024


# --------------------------------------------------------------------------------------------------
# The tokenizer training loop


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory):
    """A 20-step stage-1 run with the default --disc_start (20% of 20 = 4 steps without the GAN; 20
    rather than 5 steps so that 0.1, 0.15, 0.25 or 0.3 of the steps, which floor to the same step as
    0.2 at 5 or 10 steps, all differ here), recording the EMA it builds and the discriminator's
    inputs behind each hinge loss."""
    run_dir = str(tmp_path_factory.mktemp("tok"))
    seen = {"decay": [], "updates": 0, "d_inputs": []}
    disc_calls = []  # (logits, input) of every discriminator forward since the last hinge loss

    class RecordingEMA(EMA):
        def __init__(self, model, decay):
            seen["decay"].append(decay)
            super().__init__(model, decay)

        def update(self, model):
            seen["updates"] += 1
            super().update(model)

    class RecordingPatchGAN(PatchGAN):
        def forward(self, x):
            out = super().forward(x)
            disc_calls.append((out, x))
            return out

    def recording_hinge(logits_real, logits_fake):
        inputs = {id(out): x for out, x in disc_calls}
        with_grad = [x for _, x in disc_calls if x.requires_grad]  # tokenizer_loss's D(x_hat)
        real, fake = inputs[id(logits_real)].detach(), inputs[id(logits_fake)]
        seen["d_inputs"].append((real, fake, with_grad))
        disc_calls.clear()
        return hinge_d_loss(logits_real, logits_fake)

    mp = pytest.MonkeyPatch()
    mp.setattr(train_tokenizer, "EMA", RecordingEMA)
    mp.setattr(train_tokenizer, "PatchGAN", RecordingPatchGAN)
    mp.setattr(train_tokenizer, "hinge_d_loss", recording_hinge)
    try:
        train_tokenizer.main(["--stage", "1", "--steps", "20", "--run_dir", run_dir, *TINY_ARGS])
    finally:
        mp.undo()
    return run_dir, seen


def test_gan_starts_at_20_percent_of_steps(tokenizer_run):
    run_dir, _ = tokenizer_run
    records = common.read_log(os.path.join(run_dir, "stage1", "log.jsonl"))
    assert [r["step"] for r in records] == list(range(1, 21))
    # Record k holds step k - 1 (0-based): the GAN is on from step 4 = 20% of 20, i.e. records
    # 5..20.
    for key in ("g_loss", "w_g", "d_loss"):
        assert [key in r for r in records] == [False] * 4 + [True] * 16, key


def test_discriminator_sees_real_images_as_real_and_detached_reconstructions_as_fake(tokenizer_run):
    _, seen = tokenizer_run
    assert len(seen["d_inputs"]) == 16  # one D step per GAN step
    for real_in, fake_in, with_grad in seen["d_inputs"]:
        assert len(with_grad) == 1  # the generator's L_G = -mean D(x_hat), on the undetached x_hat
        x_hat = with_grad[0]
        assert torch.equal(fake_in, x_hat.detach()) and not fake_in.requires_grad
        # The real input is the data batch: 8-bit images mapped to [-1, 1], exactly k / 127.5 - 1.
        levels = (real_in + 1) * 127.5
        assert (levels - levels.round()).abs().max() < 1e-3
        assert not torch.allclose(real_in, x_hat.detach())


def test_tokenizer_optimisers_and_ema_get_the_published_settings(tokenizer_run):
    run_dir, seen = tokenizer_run
    assert seen["decay"] == [0.999] and seen["updates"] == 20  # one EMA update per step
    ckpt = load_checkpoint(os.path.join(run_dir, "stage1", "ckpt.pt"))
    for name in ("opt", "opt_d"):  # Adam (no decoupled weight decay), lr 1e-4, betas (0.5, 0.9)
        (group,) = ckpt[name]["param_groups"]
        settings = (group["lr"], tuple(group["betas"]), group["weight_decay"])
        assert settings == (1e-4, (0.5, 0.9), 0), name
        assert not group.get("decoupled_weight_decay", False), name  # a key of newer torch versions


# --------------------------------------------------------------------------------------------------
# The LightningDiT training loop


def test_dit_training_normalises_latents_drops_labels_and_uses_published_settings(
        tmp_path, monkeypatch):
    """On a hand-made latent set with known statistics: every x1 the loss sees is (z - mean) / std
    of a stored latent, with its label; the model trains with label dropout 0.1 (what CFG needs);
    AdamW and the EMA get the published defaults."""
    N, C, S = 8, 4, 2
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(N, C, S, S, generator=g) * 3 + 1).half()
    labels = np.arange(N) % 2
    # Not the data's: they must come from meta.
    mean, std = [1.0, -2.0, 0.5, 3.0], [2.0, 0.5, 1.0, 4.0]
    folder = tmp_path / "latents"
    folder.mkdir()
    np.save(folder / "latents.npy", z.numpy())
    np.save(folder / "labels.npy", labels)
    meta = {"num_latents": N, "latent_shape": [C, S, S], "num_classes": 2, "classes": ["a", "b"],
            "tokenizer": str(tmp_path / "none.pt"), "tokenizer_config": {}, "data": "test",
            "mean": mean, "std": std}
    (folder / "meta.json").write_text(json.dumps(meta))

    seen, decays, adamw_kwargs = [], [], []
    real_loss, real_adamw = dit.flow_matching_loss, torch.optim.AdamW

    def recording_loss(model, x1, y, generator=None):
        m = common.unwrap(model)
        seen.append((x1.clone(), y.clone(), m.training, m.y_embedder.dropout_prob))
        return real_loss(model, x1, y, generator)

    class RecordingEMA(EMA):
        def __init__(self, model, decay):
            decays.append(decay)
            super().__init__(model, decay)

    class RecordingAdamW(real_adamw):
        def __init__(self, params, **kwargs):
            adamw_kwargs.append(kwargs)
            super().__init__(params, **kwargs)

    monkeypatch.setattr(dit, "flow_matching_loss", recording_loss)
    monkeypatch.setattr(train_dit, "EMA", RecordingEMA)
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    run = str(tmp_path / "run")
    train_dit.main(["--latents", str(folder), "--run_dir", run, "--model", "B/1",
                    "--hidden_size", "32", "--depth", "1", "--num_heads", "2", "--batch_size", "4",
                    "--steps", "2", "--num_workers", "0", "--device", "cpu", "--log_every", "1",
                    "--grid_every", "0"])

    want = (z.float() - torch.tensor(mean).view(1, C, 1, 1)) / torch.tensor(std).view(1, C, 1, 1)
    assert len(seen) == 2
    for x1, y, training, p_drop in seen:
        assert training and p_drop == 0.1
        for row, label in zip(x1, y):
            dist = (want - row).flatten(1).abs().amax(1)
            j = int(dist.argmin())
            assert dist[j] < 1e-6 and label.item() == labels[j], (dist.min(), label)
    assert decays == [0.9999] and len(adamw_kwargs) == 1
    (group,) = load_checkpoint(os.path.join(run, "ckpt.pt"))["opt"]["param_groups"]
    assert (group["lr"], tuple(group["betas"]), group["weight_decay"]) == (2e-4, (0.9, 0.95), 0.0)
