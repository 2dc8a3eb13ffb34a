"""sample.py: ODE solvers at their orders on a closed-form flow, the time shift, classifier-free
guidance (plain, first-K channels, interval), per-index seeds, and the CLI on a tiny checkpoint: PNG
grid, ADM .npz identical over 1 and 2 ranks and batch sizes, resume from shards, balanced labels
recorded, and the bad-input messages."""

import json
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch

import fid
import sample
from common import UserError
from conftest import StubInception, randomize_, run_torchrun, save_tokenizer
from dit import build_dit
from sample import decode_to_uint8, per_index, sample_latents

# --------------------------------------------------------------------------------------------------
# Time grid and solvers

# The exact flow from noise to data N(mu, s^2) along x_t = t x1 + (1 - t) eps:
# x_t = t mu + sigma_t z with sigma_t = sqrt(t^2 s^2 + (1 - t)^2), so the noise z ends at mu + s z,
# and the velocity dx/dt = mu + sigma_t'/sigma_t (x - t mu) is smooth and nonlinear in t.
MU, S = 2.0, 0.5


class Flow(torch.nn.Module):
    """The exact velocity as a model (cfg 1: conditional only), recording the time of each call."""

    num_classes = 1

    def __init__(self):
        super().__init__()
        self.times = []

    def forward(self, x, t, y):
        self.times.append(t.item())
        t = t.double()
        return MU + (t * S ** 2 - (1 - t)) / (t ** 2 * S ** 2 + (1 - t) ** 2) * (x - t * MU)


@pytest.mark.parametrize("shift", [1.0, 0.3])
@pytest.mark.parametrize("solver,order,evals_per_interval", [("euler", 1, 1), ("heun", 2, 2)])
def test_solvers_converge_at_their_order(solver, order, evals_per_interval, shift):
    z = torch.randn(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    counts, errors, steps = [], [], [65, 129, 257, 513]
    for n in steps:
        flow = Flow()
        x1 = sample_latents(flow, torch.zeros(64, dtype=torch.long), z.clone(), n, shift=shift,
                            solver=solver)
        errors.append((x1 - (MU + S * z)).abs().max().item())
        counts.append(len(flow.times))
    slope = np.polyfit(np.log([1 / (n - 1) for n in steps]), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.25, (errors, slope)
    assert counts == [evals_per_interval * (n - 1) for n in steps]  # N time points = N-1 intervals


def test_shift_keeps_endpoints_and_is_monotone(capsys):
    def grid(steps, shift):  # every time Heun evaluates the model at: the whole grid
        flow = Flow()
        sample_latents(flow, torch.zeros(1, dtype=torch.long), torch.zeros(1, 1), steps,
                       shift=shift, solver="heun")
        return torch.tensor(sorted(set(flow.times)), dtype=torch.float64)

    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (0.3, 1.0, 3.0):
        ts = grid(101, s)
        assert len(ts) == 101 and ts[0] == 0 and ts[-1] == 1 and (ts.diff() > 0).all()
    torch.testing.assert_close(grid(101, 1.0), t, atol=1e-7, rtol=0)
    assert (grid(101, 0.3) <= t + 1e-7).all()  # s < 1: more of the steps near t = 0 (noise)
    assert grid(3, 0.3)[1].item() == pytest.approx(0.15 / 0.65, abs=1e-7)
    for bad, flag in ((["--steps", "1"], "--steps: must be at least 2"),
                      (["--shift", "0"], "--shift: must be > 0")):
        with pytest.raises(SystemExit):
            sample.parse_args(bad)
        assert flag in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Classifier-free guidance, observed over one Euler step from t = 0 (x1 = x + v(x, 0))


class Recorder(torch.nn.Module):
    """v(x, t, y) = (y + 1) x + t, recording every forward's batch size and labels."""

    num_classes = 4

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], y.tolist()))
        return (y.view(-1, 1, 1, 1) + 1).float() * x + t


def test_cfg_one_is_the_conditional_model():
    model, x, y = Recorder(), torch.randn(3, 6, 2, 2), torch.tensor([0, 1, 2])
    x1 = sample_latents(model, y, x, 2, 1.0, shift=1.0, cfg_channels=3, cfg_interval_start=0.0)
    assert torch.equal(x1, x + model(x, torch.tensor(0.0), y))
    assert model.calls[0] == (3, [0, 1, 2])  # one pass, no unconditional rows


@pytest.mark.parametrize("k", [None, 3])
def test_guidance_in_one_batched_forward_on_k_channels(k):
    model, x, y = Recorder(), torch.randn(3, 6, 2, 2), torch.tensor([0, 1, 2])
    w = 4.0
    v = sample_latents(model, y, x, 2, w, shift=1.0, cfg_channels=k) - x
    assert model.calls == [(6, [0, 1, 2, 4, 4, 4])]  # [y; null], null = num_classes
    v_c, v_u = (y.view(-1, 1, 1, 1) + 1) * x, 5 * x
    k = 6 if k is None else k
    torch.testing.assert_close(v[:, :k], (v_u + w * (v_c - v_u))[:, :k])
    torch.testing.assert_close(v[:, k:], v_c[:, k:])  # unguided channels stay conditional


def test_cfg_interval_turns_guidance_off_at_the_noisy_end():
    model, x, y = Recorder(), torch.randn(2, 4, 2, 2), torch.tensor([1, 3])
    x2 = sample_latents(model, y, x, 3, 3.0, shift=1.0, cfg_interval_start=0.5)  # t = 0, 0.5
    v_c = lambda x, t: (y.view(-1, 1, 1, 1) + 1) * x + t  # noqa: E731
    # Guidance off at t = 0 < 0.5: the unconditional rows are not computed at all.
    assert model.calls == [(2, [1, 3]), (4, [1, 3, 4, 4])]
    x1 = x + 0.5 * v_c(x, 0)
    v_u = 5 * x1 + 0.5
    torch.testing.assert_close(x2, x1 + 0.5 * (v_u + 3 * (v_c(x1, 0.5) - v_u)))


def test_sample_latents_on_a_dit(tiny_files):
    model = sample.load_models(tiny_files["dit"], None, ema=True)[0]
    noise = per_index(0, range(2), lambda g: torch.randn(32, 2, 2, generator=g))
    y = torch.tensor([1, 2])
    z = sample_latents(model, y, noise, steps=4, cfg_scale=1.0, shift=0.3)
    ref, t = noise, torch.linspace(0, 1, 4, dtype=torch.float64)
    ts = (0.3 * t / (0.3 * t + 1 - t)).tolist()
    with torch.no_grad():
        for t0, t1 in zip(ts[:-1], ts[1:]):
            ref = ref + (t1 - t0) * model(ref, torch.tensor(t0, dtype=torch.float32), y)
    assert torch.equal(z, ref) and not torch.equal(z, noise)
    z_heun = sample_latents(model, y, noise, steps=4, cfg_scale=2.0, shift=0.3, solver="heun",
                            cfg_channels=3)
    assert z_heun.shape == noise.shape and torch.isfinite(z_heun).all()


# --------------------------------------------------------------------------------------------------
# Seeds and decoding


def test_noise_and_labels_depend_only_on_seed_and_index():
    def noise(seed, indices):
        return per_index(seed, indices, lambda g: torch.randn(4, 2, 2, generator=g))

    def labels(seed, indices):
        return per_index(seed, indices, lambda g: torch.randint(10, (), generator=g), 1)

    full = noise(7, range(6))
    assert full.shape == (6, 4, 2, 2) and full.dtype == torch.float32
    assert torch.equal(noise(7, [3, 4]), full[3:5])
    assert not torch.equal(noise(8, [3]), full[3:4])
    y = labels(7, range(200))
    assert torch.equal(labels(7, range(100, 200)), y[100:])
    assert y.dtype == torch.long and y.min() >= 0 and y.max() <= 9 and len(y.unique()) == 10


class Identity:
    def decode(self, z):
        return z


def test_denormalize_and_decode(tiny_files):
    stats = {"mean": [1.0, -2.0, 0.0], "std": [2.0, 0.5, 1.0]}
    z = torch.tensor([-0.25, 3.0, 0.0]).view(1, 3, 1, 1)  # -> 0.5, -0.5, 0 -> 127.5 (x + 1)
    assert decode_to_uint8(Identity(), z, stats).flatten().tolist() == [191, 64, 128]
    tok = sample.load_tokenizer(tiny_files["tok"])
    latent_stats = torch.load(tiny_files["dit"])["latent_stats"]
    img = decode_to_uint8(tok, torch.randn(2, 32, 2, 2), latent_stats)
    assert img.dtype == torch.uint8 and img.shape == (2, 3, 32, 32)


# --------------------------------------------------------------------------------------------------
# The CLI on a tiny checkpoint


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    files = {k: str(d / f"{k}.pt") for k in ("tok", "tok16", "dit", "dit_nostats")}
    tok = save_tokenizer(files["tok"])
    save_tokenizer(files["tok16"], latent_channels=16)
    args = dict(input_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=4)
    ema = randomize_(build_dit("B/1", **args), seed=0)
    raw = randomize_(build_dit("B/1", **args), seed=1)
    g = torch.Generator().manual_seed(2)
    stats = {"mean": torch.randn(32, generator=g), "std": torch.rand(32, generator=g) + 0.5}
    ckpt = {"kind": "dit", "model_name": "B/1", "model_args": args, "model": raw.state_dict(),
            "ema": ema.state_dict(), "step": 10, "tokenizer": files["tok"],
            "tokenizer_config": tok.config, "latent_stats": stats}
    torch.save(ckpt, files["dit"])
    torch.save({k: v for k, v in ckpt.items() if k != "latent_stats"}, files["dit_nostats"])
    return files


def cli(files, *args, ckpt="dit"):
    return ["--ckpt", files[ckpt], "--device", "cpu", "--steps", "3", "--seed", "5",
            *map(str, args)]


def test_grid(tiny_files, tmp_path, capsys):
    path = sample.main(cli(tiny_files, "--cfg", 1.5, "--classes", "0,1,3", "--out", tmp_path))
    assert path == str(tmp_path / "grid_cfg1.5_steps3.png") and path in capsys.readouterr().out
    from PIL import Image
    assert Image.open(path).size == (3 * 66 - 2, 64)  # three 32-px images shown at 64 px, 2-px gaps
    # bf16 autocast path (CUDA's default) and raw weights run on the CPU too.
    path = sample.main(cli(tiny_files, "--precision", "bf16", "--raw_weights", "--solver", "heun",
                           "--out", tmp_path))
    assert Image.open(path).size == (8 * 66 - 2, 2 * 66 - 2)  # 16 random classes, 8 per row


def read_like_adm_evaluator(path):
    """What guided-diffusion's evaluations/evaluator.py does: stream arr_0.npy out of the zip."""
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        assert np.lib.format.read_magic(f) == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        assert not fortran and dtype == np.uint8
        return np.frombuffer(f.read(), dtype=dtype).reshape(shape)


def test_npz_identical_over_ranks_and_batch_sizes_and_resumes(tiny_files, tmp_path, monkeypatch):
    common = ("--npz", "--num_samples", 6, "--shard_size", 4, "--cfg", 2.0, "--cfg_channels", 3,
              "--cfg_interval_start", 0.3, "--solver", "heun")
    one = sample.main(cli(tiny_files, *common, "--batch_size", 4, "--keep_shards",
                          "--out", tmp_path / "one"))
    ref = np.load(one)
    assert sorted(ref.files) == ["arr_0", "arr_1", "labelling"] and ref["labelling"] == "uniform"
    assert ref["arr_0"].dtype == np.uint8 and ref["arr_0"].shape == (6, 32, 32, 3)
    assert ref["arr_1"].dtype == np.int64 and ref["arr_1"].shape == (6,) and ref["arr_1"].max() < 4
    assert np.array_equal(read_like_adm_evaluator(one), ref["arr_0"])
    assert ref["arr_0"].std() > 1  # not a constant image
    assert json.load(open(tmp_path / "one" / "settings.json"))["cfg_channels"] == 3

    # Two ranks (gloo on the CPU): shard 0 on rank 0, shard 1 on rank 1.
    run_torchrun(["sample.py",
                  *cli(tiny_files, *common, "--batch_size", 4, "--out", tmp_path / "two")])
    two = np.load(tmp_path / "two" / "samples.npz")
    assert np.array_equal(two["arr_0"], ref["arr_0"]) and np.array_equal(two["arr_1"], ref["arr_1"])
    # Removed after concatenation.
    assert not os.path.exists(tmp_path / "two" / "shards" / "shard_000000.npz")

    # Another batch size: the same noise and labels; kernels may differ in the last bits.
    other = np.load(sample.main(cli(tiny_files, *common, "--batch_size", 1,
                                    "--out", tmp_path / "bs1")))
    assert np.array_equal(other["arr_1"], ref["arr_1"])
    assert np.abs(other["arr_0"].astype(int) - ref["arr_0"]).max() <= 1
    assert (other["arr_0"] != ref["arr_0"]).mean() < 0.01

    # Resume: only the missing shard is generated again.
    os.remove(one)
    os.remove(tmp_path / "one" / "shards" / "shard_000001.npz")
    generated, images = [], sample.Sampler.images

    def recording_images(self, indices, bar):
        generated.append(indices)
        return images(self, indices, bar)

    monkeypatch.setattr(sample.Sampler, "images", recording_images)
    resumed = sample.main(cli(tiny_files, *common, "--batch_size", 4, "--keep_shards",
                              "--out", tmp_path / "one"))
    resumed = np.load(resumed)
    assert generated == [[4, 5]]
    assert np.array_equal(resumed["arr_0"], ref["arr_0"])
    assert np.array_equal(resumed["arr_1"], ref["arr_1"])
    # A finished run is not redone; other settings in the same folder are refused.
    sample.main(cli(tiny_files, *common, "--out", tmp_path / "one"))
    assert generated == [[4, 5]]
    other_cfg = [a if a != 2.0 else 3.0 for a in common]
    with pytest.raises(UserError, match="holds samples made with other settings.*'cfg'"):
        sample.main(cli(tiny_files, *other_cfg, "--out", tmp_path / "one"))
    with pytest.raises(UserError, match="other settings.*'precision': \\('fp32', 'bf16'\\)"):
        sample.main(cli(tiny_files, *common, "--precision", "bf16", "--out", tmp_path / "one"))


def test_balanced_labels_are_recorded_in_the_npz_settings_and_fid_json(tiny_files, tmp_path):
    """--balanced_labels: sample i gets class i mod 4 (from i alone: any ranks, any shards); the
    .npz, settings.json and fid.py's result say which labelling it was (RAE: ~0.1 FID apart)."""
    common = ("--npz", "--num_samples", 6, "--shard_size", 4)
    path = sample.main(cli(tiny_files, *common, "--balanced_labels", "--out", tmp_path / "b"))
    npz = np.load(path)
    assert npz["arr_1"].tolist() == [0, 1, 2, 3, 0, 1] and npz["labelling"] == "balanced"
    assert json.load(open(tmp_path / "b" / "settings.json"))["labelling"] == "balanced"
    result = fid.evaluate(path, path, model=StubInception(), progress=False, sfid=False)
    assert result["labelling"] == "balanced" and "balanced labels" in fid.result_line(result)
    uniform = sample.main(cli(tiny_files, *common, "--out", tmp_path / "u"))
    result = fid.evaluate(uniform, path, model=StubInception(), progress=False, sfid=False)
    assert result["labelling"] == "uniform"
    with pytest.raises(SystemExit):  # argparse: not allowed with
        sample.main(cli(tiny_files, *common, "--balanced_labels", "--classes", "1"))


def test_the_stage3_refinement_decodes_by_default(tiny_files, tmp_path):
    """A checkpoint names the tokenizer its latents came from (stage 2); when that run also has a
    stage-3 tokenizer refined from it, sample.py decodes with that one, as the README and the demo
    do."""
    ckpt = torch.load(tiny_files["dit"], weights_only=True)
    tok_dir = tmp_path / "tok"
    stage2, stage3 = tok_dir / "stage2" / "tokenizer.pt", tok_dir / "stage3" / "tokenizer.pt"
    stage2.parent.mkdir(parents=True)
    save_tokenizer(str(stage2))
    dit = str(tmp_path / "dit.pt")
    torch.save({**ckpt, "tokenizer": str(stage2)}, dit)
    assert sample.load_models(dit, None, ema=True)[2]["tokenizer"] == str(stage2)
    stage3.parent.mkdir()
    refined = save_tokenizer(str(stage3))
    state = torch.load(stage3, weights_only=True)
    torch.save({**state, "init": str(stage2)}, stage3)
    model, tokenizer, meta = sample.load_models(dit, None, ema=True)
    assert meta["tokenizer"] == str(stage3)
    assert all(torch.equal(a, b)
               for a, b in zip(tokenizer.state_dict().values(), refined.state_dict().values()))
    # Refined from another tokenizer.
    torch.save({**state, "init": str(tmp_path / "elsewhere.pt")}, stage3)
    assert sample.load_models(dit, None, ema=True)[2]["tokenizer"] == str(stage2)
    explicit = sample.load_models(dit, tiny_files["tok"], ema=True)[2]["tokenizer"]
    assert explicit == tiny_files["tok"]  # --tokenizer always wins


def test_bad_inputs(tiny_files, tmp_path, monkeypatch, capsys):
    with pytest.raises(UserError, match="no latent statistics"):
        sample.main(cli(tiny_files, "--out", tmp_path, ckpt="dit_nostats"))
    with pytest.raises(UserError, match=r"makes other latents \(shape \(16, 2, 2\), the model's "
                                        r"\(32, 2, 2\)"):
        sample.main(cli(tiny_files, "--tokenizer", tiny_files["tok16"], "--out", tmp_path))
    with pytest.raises(UserError, match=r"unknown class id\(s\) \[4\].*4 classes"):
        sample.main(cli(tiny_files, "--classes", "1,4", "--out", tmp_path))
    with pytest.raises(SystemExit):
        sample.main(cli(tiny_files, "--steps", 1, "--out", tmp_path))  # the last --steps wins
    with pytest.raises(UserError, match="tokenizer .*missing.pt not found.*--tokenizer"):
        sample.main(cli(tiny_files, "--tokenizer", tmp_path / "missing.pt", "--out", tmp_path))
    with pytest.raises(UserError, match="--cfg_channels must be between 1 and 32"):
        sample.main(cli(tiny_files, "--cfg", 2, "--cfg_channels", 33, "--out", tmp_path))
    for bad in ("inf", "nan"):  # guidance of inf gave images of NaN
        with pytest.raises(SystemExit):
            sample.parse_args(["--cfg", bad])
        assert "--cfg: must be finite" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # the default --ckpt runs/dit/ckpt.pt does not exist here
    with pytest.raises(UserError, match=r"LightningDiT checkpoint not found: runs/dit/ckpt.pt"):
        sample.main(["--cfg", "1.5"])


def test_a_file_of_a_sharded_checkpoint_points_to_export_pt(tiny_files, tmp_path):
    """It suggested --raw_weights (which failed next) and never named export.pt."""
    from common import load_checkpoint

    folder = tmp_path / "run" / "ckpt"  # a sharded (--fsdp) checkpoint: DCP files + train_state.pt
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(b"")
    state = {k: v for k, v in torch.load(tiny_files["dit"]).items() if k not in ("model", "ema")}
    torch.save(state, folder / "train_state.pt")
    kept = tmp_path / "run" / "ckpt_0000008"  # a kept copy: its own export, not the latest's
    shutil.copytree(folder, kept)
    for ckpt, export in ((folder, "export.pt"), (kept, "export_0000008.pt")):
        for load in (lambda path: sample.main(["--ckpt", path, "--device", "cpu"]),
                     load_checkpoint):
            with pytest.raises(UserError) as e:
                load(str(ckpt / "train_state.pt"))
            message = str(e.value)
            assert f"sample from {tmp_path / 'run' / export}, which" in message, message
            assert f"--export {ckpt}` writes" in message and "--raw_weights" not in message
        assert f"`python train_t2i.py --export {ckpt}` writes" in message  # load_checkpoint's


def test_a_text_to_image_checkpoint_points_to_sample_t2i(tiny_files, tmp_path):
    ckpt = torch.load(tiny_files["dit"])
    torch.save({**ckpt, "kind": "t2i"}, tmp_path / "t2i.pt")
    with pytest.raises(UserError, match="t2i.pt is a text-to-image checkpoint: use sample_t2i.py"):
        sample.main(["--ckpt", str(tmp_path / "t2i.pt"), "--device", "cpu"])
