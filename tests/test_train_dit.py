"""Latent extraction and LightningDiT training (train_dit.py) with tiny models on the demo set."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import common
import dit
import sample
import train_dit
import train_tokenizer
from baselines import load_tokenizer
from common import EXIT_STOPPED, DistEnv, UserError, load_checkpoint, set_rng_states
from conftest import ROOT, run_torchrun, wait_for_log
from data import DemoShapes, to_model_range
from tokenizer import AlignedTokenizer

TINY_DIT = ["--model", "B/1", "--hidden_size", "32", "--depth", "1", "--num_heads", "2",
            "--batch_size", "8", "--num_workers", "0", "--device", "cpu", "--log_every", "1",
            "--grid_every", "0", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """A random tiny tokenizer (32 px -> 32x2x2) and the latents of 24 demo images."""
    root = tmp_path_factory.mktemp("latents")
    torch.manual_seed(0)
    tok = AlignedTokenizer(dict(encoder="tiny", image_size=32, decoder_ch=32, decoder_res_blocks=1))
    tok_path = str(root / "tokenizer.pt")
    torch.save({"kind": "tokenizer", "stage": 2, "config": tok.config, "model": tok.state_dict()},
               tok_path)
    folder = str(root / "latents")
    train_dit.main(["--extract", "--tokenizer", tok_path, "--latents", folder,
                    "--demo_images", "24", "--batch_size", "5", "--num_workers", "0",
                    "--device", "cpu"])
    return tok_path, folder


def read_log(run_dir):
    """The per-step records of log.jsonl (the first record holds the run's flags)."""
    path = os.path.join(run_dir, "log.jsonl")
    with open(path) as f:
        first = json.loads(f.readline())
    assert first["event"] == "start" and "model" in first["args"]
    return common.read_log(path)


def test_extraction_stores_image_and_flip_and_stats(latents):
    tok_path, folder = latents
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert meta["num_latents"] == 48 and meta["latent_shape"] == [32, 2, 2]
    assert meta["num_classes"] == 4
    z = np.load(os.path.join(folder, "latents.npy"))
    labels = np.load(os.path.join(folder, "labels.npy"))
    assert z.dtype == np.float16 and z.shape == (48, 32, 2, 2)
    tok = load_tokenizer(tok_path)
    demo = DemoShapes(24, 32)
    x = to_model_range(torch.stack([demo[i][0] for i in range(24)]), torch.device("cpu"))
    with torch.no_grad():
        want, want_flip = tok.encode(x), tok.encode(x.flip(-1))
    np.testing.assert_allclose(z[0::2], want.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(z[1::2], want_flip.numpy(), rtol=2e-3, atol=2e-3)
    assert labels.tolist() == [i // 2 % 4 for i in range(48)]
    all_z = z.astype(np.float64)  # fewer than 10K latents: the statistics use all of them
    np.testing.assert_allclose(meta["mean"], all_z.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(meta["std"], all_z.std(axis=(0, 2, 3), ddof=1), rtol=1e-6)


def test_two_rank_extraction_equals_one_rank(latents, tmp_path):
    tok_path, folder = latents
    run_torchrun(["train_dit.py", "--extract", "--tokenizer", tok_path, "--latents", str(tmp_path),
                  "--demo_images", "24", "--batch_size", "5", "--num_workers", "0",
                  "--device", "cpu"])
    for name in ("latents.npy", "labels.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / name), np.load(os.path.join(folder, name)))


def test_loss_decreases_and_checkpoint_is_complete(latents, tmp_path):
    _, folder = latents
    run = str(tmp_path)
    train_dit.main(["--latents", folder, "--run_dir", run, "--steps", "600", *TINY_DIT,
                    "--log_every", "50"])
    log = read_log(run)
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], (log[0]["loss"], log[-1]["loss"])
    model, meta = sample.load_dit(os.path.join(run, "ckpt.pt"))
    assert meta["step"] == 600 and meta["model_args"]["in_channels"] == 32
    assert set(meta["latent_stats"]) == {"mean", "std"}
    assert meta["latent_stats"]["mean"].shape == (32,)
    assert meta["tokenizer"].endswith("tokenizer.pt")
    assert meta["classes"] == ["disc", "square", "triangle", "ring"]


def test_resume_equals_uninterrupted_run(latents, tmp_path):
    _, folder = latents
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = ["--latents", folder, *TINY_DIT, "--micro_batch", "4"]  # with gradient accumulation
    train_dit.main([*args, "--steps", "8", "--run_dir", a])
    train_dit.main([*args, "--steps", "5", "--run_dir", b])
    train_dit.main([*args, "--steps", "8", "--run_dir", b, "--resume"])
    assert [r["loss"] for r in read_log(a)] == [r["loss"] for r in read_log(b)]
    ca, cb = (load_checkpoint(os.path.join(d, "ckpt.pt")) for d in (a, b))
    for part in ("model", "ema"):
        assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part])
    # The usual cure for a loss spike: resume with a lower lr. The optimiser keeps its moments but
    # takes the new lr (its saved state must not bring the old one back).
    train_dit.main([*args, "--steps", "9", "--run_dir", b, "--resume", "--lr", "1e-5"])
    opt = load_checkpoint(os.path.join(b, "ckpt.pt"))["opt"]
    assert [g["lr"] for g in opt["param_groups"]] == [1e-5] and opt["state"]


def test_resume_on_more_ranks_gives_every_rank_its_own_noise():
    """A checkpoint of 2 ranks resumed on 4: ranks 0 and 1 continue their streams exactly; ranks 2
    and 3 get new ones (a copy of rank 0's or 1's stream would repeat its noise and timesteps)."""
    saved = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        saved.append({"torch": torch.get_rng_state()})
    draws = []
    for rank in range(4):
        set_rng_states(saved, DistEnv(rank, rank, 4, torch.device("cpu")))
        draws.append(torch.rand(4))
    for seed in (0, 1):
        torch.manual_seed(seed)
        assert torch.equal(draws[seed], torch.rand(4))
    assert len({tuple(d.tolist()) for d in draws}) == 4


def test_nan_guard_stops_and_keeps_last_good_checkpoint(latents, tmp_path, monkeypatch):
    _, folder = latents
    real_loss, calls = dit.flow_matching_loss, [0]

    def loss_with_a_nan(model, x1, y, generator=None):
        calls[0] += 1
        loss, parts = real_loss(model, x1, y, generator)
        return (loss * float("nan"), parts) if calls[0] == 7 else (loss, parts)

    monkeypatch.setattr(dit, "flow_matching_loss", loss_with_a_nan)
    with pytest.raises(UserError, match="non-finite loss at step 7"):
        train_dit.main(["--latents", folder, "--run_dir", str(tmp_path), "--steps", "20", *TINY_DIT,
                        "--log_every", "4", "--ckpt_every", "5"])
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 5 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert [r["step"] for r in read_log(str(tmp_path))] == [4]


def test_bad_inputs_have_clear_messages(latents, tmp_path):
    tok_path, folder = latents
    with pytest.raises(UserError, match="run `train_dit.py --extract"):
        train_dit.main(["--latents", str(tmp_path / "empty"), "--run_dir", str(tmp_path / "r"),
                        *TINY_DIT])
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "latents.npy").write_bytes(b"")
    with pytest.raises(UserError, match="did not finish"):
        train_dit.main(["--latents", str(tmp_path / "half"), *TINY_DIT])
    run = str(tmp_path / "run")
    train_dit.main(["--latents", folder, "--run_dir", run, "--steps", "1", *TINY_DIT])
    with pytest.raises(UserError, match="different run: model_args is .*'depth': 1.* there "
                       "but .*'depth': 2"):
        train_dit.main(["--latents", folder, "--run_dir", run, "--resume", *TINY_DIT,
                        "--depth", "2"])
    with pytest.raises(UserError, match="pass --resume"):
        train_dit.main(["--latents", folder, "--run_dir", run, *TINY_DIT])
    # Latents of another tokenizer (64 channels) do not fit the checkpoint's model.
    other = tmp_path / "other"
    other.mkdir()
    meta = json.load(open(os.path.join(folder, "meta.json")))
    meta.update(latent_shape=[64, 2, 2], mean=[0.0] * 64, std=[1.0] * 64)
    (other / "meta.json").write_text(json.dumps(meta))
    np.save(other / "latents.npy", np.zeros((48, 64, 2, 2), np.float16))
    np.save(other / "labels.npy", np.zeros(48, np.int64))
    with pytest.raises(UserError,
                       match="in_channels.: 32.* there but .*in_channels.: 64.*other latents"):
        train_dit.main(["--latents", str(other), "--run_dir", run, "--resume", *TINY_DIT])
    flat = tmp_path / "flat"  # images without class subfolders
    flat.mkdir()
    for i in range(2):
        Image.fromarray(DemoShapes(2, 32).render(i)).save(flat / f"{i}.png")
    with pytest.raises(UserError, match="no class subfolders"):
        train_dit.main(["--extract", "--tokenizer", tok_path, "--data", str(flat),
                        "--latents", str(tmp_path / "l2"), "--device", "cpu", "--num_workers", "0"])
    with pytest.raises(UserError, match="is not a LightningDiT checkpoint"):
        sample.load_dit(tok_path)
    with pytest.raises(UserError, match="--batch_size 8 must split evenly over 1 ranks, each "
                                        "share into micro-batches of --micro_batch 3"):
        train_dit.main(["--latents", folder, "--run_dir", str(tmp_path / "r"), *TINY_DIT,
                        "--micro_batch", "3"])


@pytest.mark.parametrize("parse", [train_dit.parse_args, train_tokenizer.parse_args])
def test_only_the_text_to_image_trainer_shards(parse, capsys):
    with pytest.raises(SystemExit):  # LightningDiT-XL and the tokenizer fit a GPU under DDP
        parse(["--stage", "1", "--fsdp"] if parse is train_tokenizer.parse_args else ["--fsdp"])
    assert "unrecognized arguments: --fsdp" in capsys.readouterr().err


def test_sigterm_saves_a_checkpoint_and_resume_continues(latents, tmp_path):
    _, folder = latents
    run = str(tmp_path)
    args = ["train_dit.py", "--latents", folder, "--run_dir", run, *TINY_DIT]
    proc = subprocess.Popen([sys.executable, *args, "--steps", "1000000"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    log = os.path.join(run, "log.jsonl")
    wait_for_log(log, '"step": 1,')
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == EXIT_STOPPED and "continue with --resume" in out, out[-2000:]
    step = load_checkpoint(os.path.join(run, "ckpt.pt"))["step"]
    assert 1 <= step < 1000000
    train_dit.main([*args[1:], "--steps", str(step + 2), "--resume"])
    assert load_checkpoint(os.path.join(run, "ckpt.pt"))["step"] == step + 2


def test_sigterm_to_torchrun_stops_all_ranks_between_log_steps(latents, tmp_path):
    """torchrun forwards SIGTERM to its workers and kills them 30 s later: the ranks must agree to
    stop within a few steps (not at the next log step) and save."""
    _, folder = latents
    run = str(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train_dit.py", "--latents", folder, "--run_dir", run, *TINY_DIT,
           "--log_every", "1000000", "--steps", "1000000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    log = os.path.join(run, "log.jsonl")
    wait_for_log(log, '"event": "start"')
    time.sleep(2)  # some training steps
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()  # torchrun itself exits 1 after a SIGTERM
    assert "stopped at step" in out and "continue with --resume" in out, out[-3000:]
    step = load_checkpoint(os.path.join(run, "ckpt.pt"))["step"]
    assert step % 10 == 0 and 0 < step < 1000000


def test_micro_batch_above_a_ranks_share_means_no_accumulation(latents, tmp_path):
    _, folder = latents
    train_dit.main(["--latents", folder, *TINY_DIT, "--micro_batch", "16", "--steps", "1",
                    "--run_dir", str(tmp_path)])
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 1
    args = type("Args", (), {"batch_size": 7, "micro_batch": None})
    with pytest.raises(UserError) as e:  # names only the flags the user gave
        common.micro_batches(args, DistEnv(0, 0, 2, torch.device("cpu")))
    assert "--micro_batch" not in str(e.value) and "--batch_size 7" in str(e.value)
