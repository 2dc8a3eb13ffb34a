"""Baseline tokenizers (baselines.py) behind the tokenizer interface: the real SD-VAE, FLUX VAE and
VA-VAE layouts (built on the meta device from their published configurations: no download),
VA-VAE's checkpoint mapped strictly onto our modules, and the whole pipeline (extraction, a patch-2
LightningDiT on 4-channel latents with its sample grid, sampling, --eval) on a tiny random diffusers
VAE; and the bad inputs."""

import json
import os

import numpy as np
import pytest
import torch

import baselines
import sample
import train_dit
import train_tokenizer
from common import UserError, load_checkpoint
from baselines import load_tokenizer
from tokenizer import latent_fingerprint

REF = os.path.join(os.path.dirname(__file__), "reference")
# stabilityai/sd-vae-ft-ema
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2,
              norm_num_groups=32, act_fn="silu", in_channels=3, out_channels=3, sample_size=256)
FLUX_VAE = {**SD_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
            "sample_size": 1024}  # black-forest-labs/FLUX.1-dev, vae/config.json
TINY_VAE = dict(block_out_channels=[16, 16, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=1,
                norm_num_groups=8)


@pytest.mark.parametrize("config,channels,params",
                         [(SD_VAE, 4, 83_653_863), (FLUX_VAE, 16, 83_819_683)])
def test_published_diffusers_vaes(config, channels, params):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = baselines.DiffusersVAE(AutoencoderKL(**config), "published", 256)
    assert vae.latent_shape == (channels, 32, 32)  # f8: 256 px -> 32 x 32
    assert sum(p.numel() for p in vae.parameters()) == params
    # FLUX has no post_quant_conv.
    assert len(vae.decoding_modules()) == (2 if config is SD_VAE else 1)


def reference_keys(name):
    with open(os.path.join(REF, name)) as f:
        rows = (line.rstrip("\n").split("\t") for line in f if not line.startswith("#"))
        return [(k, s) for k, s, _ in rows]


def ldm_state_dict(model):
    """Our VA-VAE's weights under the official LDM names (attention's qkv split into q, k, v)."""
    return {key: value for name, keys in baselines.ldm_names(model).items()
            for key, value in zip(keys, model.state_dict()[name].chunk(len(keys)))}


def test_vavae_layout_is_the_official_one():
    with torch.device("meta"):
        model = baselines.VAVAE()
    ours = sorted((k, str(tuple(v.shape))) for k, v in ldm_state_dict(model).items())
    assert ours == sorted(reference_keys("vavae_keys_f16d32.txt"))
    assert model.latent_shape == (32, 16, 16)


def test_vavae_checkpoint_loads_strictly_and_bad_ones_are_named(tmp_path):
    """Official names and shapes, random values, plus the training-only entries a VA-VAE
    checkpoint holds."""
    g = torch.Generator().manual_seed(0)
    shapes = {k: tuple(int(d) for d in s.strip("()").split(",") if d.strip())
              for k, s in reference_keys("vavae_keys_f16d32.txt")}
    state = {k: torch.randn(shape, generator=g) * 0.02 for k, shape in shapes.items()}
    path = tmp_path / "vavae.pt"
    torch.save({"state_dict": {**state, "loss.discriminator.main.0.weight": torch.zeros(2)}}, path)
    model = load_tokenizer(str(path), image_size=32)
    assert isinstance(model, baselines.VAVAE) and model.latent_shape == (32, 2, 2)
    q, k, v = (state[f"decoder.mid.attn_1.{x}.weight"] for x in "qkv")
    assert torch.equal(model.decoder.mid[1].qkv.weight, torch.cat([q, k, v]))
    assert torch.equal(model.decoder.up[0].conv1.weight, state["decoder.up.4.block.0.conv1.weight"])
    assert torch.equal(model.decoder.conv_out.weight, state["decoder.conv_out.weight"])
    with torch.no_grad():
        x_hat, z = model(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert z.shape == (1, 32, 2, 2) and x_hat.shape == (1, 3, 32, 32)
    del state["decoder.up.2.upsample.conv.weight"]
    torch.save(state, path)
    with pytest.raises(UserError,
                       match="not a VA-VAE f16d32 checkpoint.*decoder.up.2.upsample.conv.weight"):
        load_tokenizer(str(path))


@pytest.fixture(scope="module")
def tiny_vaes(tmp_path_factory):
    """Two tiny random diffusers VAEs with the same layout (f8, 4 channels), saved as folders."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("vaes")
    for i in range(2):
        torch.manual_seed(i)
        AutoencoderKL(**TINY_VAE).save_pretrained(root / f"vae{i}")
    return root


def test_pipeline_on_a_diffusers_vae(tiny_vaes, tmp_path):
    """Extraction, a patch-2 LightningDiT on 4 x 8 x 8 latents with its sample grid, the 50K-style
    .npz, and --eval, all with a diffusers VAE chosen once by --tokenizer."""
    vae, latents, run = str(tiny_vaes / "vae0"), str(tmp_path / "latents"), str(tmp_path / "dit")
    cpu = ["--device", "cpu", "--num_workers", "0"]
    train_dit.main(["--extract", "--tokenizer", vae, "--image_size", "64", "--latents", latents,
                    "--demo_images", "8", "--batch_size", "4", *cpu])
    meta = json.load(open(os.path.join(latents, "meta.json")))
    assert meta["latent_shape"] == [4, 8, 8] and meta["tokenizer_config"]["kind"] == "diffusers"
    z = np.load(os.path.join(latents, "latents.npy"))
    tok = load_tokenizer(vae, 64)
    from data import DemoShapes, to_model_range
    with torch.no_grad():
        want = tok.encode(to_model_range(DemoShapes(8, 64)[3][0][None], torch.device("cpu")))
    # Image 3 (row 2 * 3), the mean.
    np.testing.assert_allclose(z[6], want[0].numpy(), rtol=2e-3, atol=2e-3)
    train_dit.main(["--latents", latents, "--run_dir", run, "--model", "B/2", "--hidden_size", "32",
                    "--depth", "1", "--num_heads", "2", "--steps", "2", "--batch_size", "4",
                    "--log_every", "1", "--grid_every", "2", *cpu])
    assert os.path.exists(os.path.join(run, "samples_0000002.png"))  # the grid decoded by the VAE
    out = sample.main(["--ckpt", os.path.join(run, "ckpt.pt"), "--npz", "--num_samples", "3",
                       "--steps", "3", "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert np.load(out)["arr_0"].shape == (3, 64, 64, 3)
    metrics = train_tokenizer.main(["--eval", "--tokenizer", vae, "--image_size", "64",
                                    "--eval_images", "4", "--random_lpips", *cpu])
    assert metrics["images"] == 4 and metrics["encoder"] == f"diffusers {vae}"
    assert metrics["psnr"] > 0


def test_mixed_tokenizers_and_bad_inputs(tiny_vaes, tmp_path, monkeypatch):
    vae0, vae1 = str(tiny_vaes / "vae0"), str(tiny_vaes / "vae1")
    assert latent_fingerprint(load_tokenizer(vae0)) != latent_fingerprint(load_tokenizer(vae1))
    latents, run = str(tmp_path / "latents"), str(tmp_path / "dit")
    cpu = ["--device", "cpu", "--num_workers", "0"]
    train_dit.main(["--extract", "--tokenizer", vae0, "--image_size", "64", "--latents", latents,
                    "--demo_images", "4", "--batch_size", "4", *cpu])
    train_dit.main(["--latents", latents, "--run_dir", run, "--model", "B/2", "--hidden_size", "32",
                    "--depth", "1", "--num_heads", "2", "--steps", "1", "--batch_size", "4",
                    "--grid_every", "0", *cpu])
    ckpt = os.path.join(run, "ckpt.pt")
    with pytest.raises(UserError,
                       match=f"trained on latents of {vae0}, but {vae1} makes other latents"):
        sample.main(["--ckpt", ckpt, "--tokenizer", vae1, "--steps", "2", "--out", str(tmp_path),
                     "--device", "cpu"])
    (tmp_path / "notavae").mkdir()
    (tmp_path / "notavae" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(UserError, match="could not load the diffusers VAE .*notavae"):
        load_tokenizer(str(tmp_path / "notavae"))
    with pytest.raises(UserError, match="is a dit checkpoint, not a tokenizer"):
        load_tokenizer(ckpt)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(UserError,
                       match="not a tokenizer checkpoint of this project, nor a VA-VAE"):
        load_tokenizer(str(tmp_path / "other.pt"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="could not load the diffusers VAE 'nobody/no-vae'.*folder"):
        load_tokenizer("nobody/no-vae")
    fingerprint = latent_fingerprint(load_tokenizer(vae0))
    assert load_checkpoint(ckpt)["tokenizer_fingerprint"] == fingerprint
