"""Latent extraction and LightningDiT training (train_dit.py) with tiny models on the demo set."""

import json
import os
import shutil
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
from common import EXIT_STOPPED, DistEnv, UserError, load_checkpoint
from conftest import ROOT, run_script, run_torchrun, wait_for_log
from data import DemoShapes, to_model_range
from common import set_rng_states
from baselines import load_tokenizer
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


# --------------------------------------------------------------------------------------------------
# Sharded training (--fsdp): FSDP2 and DCP checkpoints


def dcp_tensors(folder):
    """Every tensor of a sharded checkpoint (model, EMA, optimiser), whole, read in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = os.path.join(os.path.dirname(folder), os.path.basename(folder) + ".whole.pt")
    dcp_to_torch_save(folder, path)
    return torch.load(path, weights_only=False)


def assert_same(a, b, where=""):
    """Nested dicts and lists of tensors and numbers, equal bit for bit."""
    if isinstance(a, (dict, list)):
        assert type(a) is type(b) and len(a) == len(b), where
        for k in a if isinstance(a, dict) else range(len(a)):
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_ddp_and_hsdp_runs_and_a_resume_on_four_ranks_resharded_exactly(latents, tmp_path):
    """2 gloo ranks under DDP, and as two single-process "nodes" with --fsdp hybrid (a 2-D mesh,
    replicated across the nodes): the same losses. The HSDP checkpoint, resumed on 4 ranks with
    --fsdp (sharded 4 ways), is what was saved bit for bit: model, EMA, AdamW moments and steps,
    ranks 0-1's RNG, the data position. Ranks 2-3 get new RNG streams (set_rng_states), so the
    losses after that cannot be those of a 2-rank run."""
    _, folder = latents
    ddp, run = tmp_path / "ddp", tmp_path / "run"
    args = ["train_dit.py", "--latents", folder, *TINY_DIT, "--ckpt_every", "2", "--keep_every",
            "4"]
    run_torchrun([*args, "--run_dir", str(ddp), "--steps", "4"])
    assert load_checkpoint(str(ddp / "ckpt.pt"))["step"] == 4
    run_torchrun([*args, "--run_dir", str(run), "--steps", "4", "--fsdp", "hybrid"], nproc=1,
                 nodes=2)
    losses = [[r["loss"] for r in read_log(d)] for d in (ddp, run)]
    assert len(losses[0]) == 4 and np.allclose(losses[0], losses[1], rtol=0, atol=1e-5), losses
    saved = load_checkpoint(str(run / "ckpt" / "train_state.pt"))
    assert saved["step"] == 4 and len(saved["rng"]) == 2 and saved["args"]["fsdp"] == "hybrid"
    shutil.copytree(run / "ckpt", tmp_path / "saved")
    shutil.rmtree(run / "ckpt_0000004")
    run_torchrun(["tests/fsdp_resave.py", *args[1:], "--run_dir", str(run), "--steps", "6",
                  "--fsdp", "--resume"], nproc=4)
    assert_same(dcp_tensors(str(tmp_path / "saved")), dcp_tensors(str(run / "ckpt_0000004")))
    resharded = load_checkpoint(str(run / "ckpt_0000004" / "train_state.pt"))
    assert len(resharded["rng"]) == 4 and resharded["data"] == saved["data"]
    assert_same(resharded["rng"][:2], saved["rng"])
    assert [r["step"] for r in read_log(run)] == [1, 2, 3, 4, 5, 6]
    assert load_checkpoint(str(run / "ckpt" / "train_state.pt"))["step"] == 6
    model, meta = sample.load_dit(str(run / "export.pt"))  # written at the end of the run
    assert meta["step"] == 6 and "opt" not in meta and meta["latent_stats"]["mean"].shape == (32,)


KILL_IN_SAVE = """
import os, signal, sys
import common, train_dit
{patch}
train_dit.main(sys.argv[1:])
"""
KILLS = {  # the second save (step 4) killed ...
    "while writing": """
real = common.save_checkpoint
def save(obj, path):  # train_state.pt, after the shards of step 4
    if obj["step"] == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    real(obj, path)
common.save_checkpoint = save
""",
    "between the renames": """
real = os.rename
def rename(src, dst):  # ckpt.tmp -> ckpt, after ckpt -> ckpt.old
    if str(src).endswith("ckpt.tmp") and os.path.isdir(f"{dst}.old"):
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.rename = rename
"""}


@pytest.mark.parametrize("when", sorted(KILLS))
def test_fsdp_save_killed_keeps_the_last_checkpoint_and_resume_is_exact(latents, tmp_path, when):
    """--fsdp in one process (a process group of one): a run killed while it saves step 4 resumes
    from step 2 and then gives the uninterrupted run's losses exactly."""
    _, folder = latents
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--latents", folder, *TINY_DIT, "--fsdp", "--ckpt_every", "2", "--steps", "6"]
    train_dit.main([*args, "--run_dir", str(a)])
    proc = run_script(["-c", KILL_IN_SAVE.format(patch=KILLS[when]), *args, "--run_dir", str(b)])
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert {"ckpt.tmp", "ckpt.old"} & set(os.listdir(b)), os.listdir(b)
    train_dit.main([*args, "--run_dir", str(b), "--resume"])
    assert sorted(os.listdir(b / "ckpt")) == [".metadata", "__0_0.distcp", "train_state.pt"]
    assert [r["loss"] for r in read_log(a)] == [r["loss"] for r in read_log(b)]
    assert '"event": "resume", "step": 2,' in (b / "log.jsonl").read_text()
    assert_same(*(load_checkpoint(str(d / "export.pt"))["ema"] for d in (a, b)))


def test_fsdp_bad_inputs_have_clear_messages(latents, tmp_path):
    tok_path, folder = latents
    ddp, fsdp = str(tmp_path / "ddp"), str(tmp_path / "fsdp")
    train_dit.main(["--latents", folder, "--run_dir", ddp, "--steps", "1", *TINY_DIT])
    train_dit.main(["--latents", folder, "--run_dir", fsdp, "--steps", "1", *TINY_DIT, "--fsdp"])
    with pytest.raises(UserError, match=r"ckpt.pt is a single-file \(DDP\) checkpoint: resume "
                                        "without --fsdp"):
        train_dit.main(["--latents", folder, "--run_dir", ddp, "--resume", *TINY_DIT, "--fsdp"])
    with pytest.raises(UserError, match=r"fsdp/ckpt is a sharded \(--fsdp\) checkpoint: resume "
                                        "with --fsdp"):
        train_dit.main(["--latents", folder, "--run_dir", fsdp, "--resume", *TINY_DIT])
    with pytest.raises(UserError, match="fsdp/ckpt exists: pass --resume"):
        train_dit.main(["--latents", folder, "--run_dir", fsdp, *TINY_DIT])
    sharded = (f"{fsdp}/ckpt is a sharded \\(--fsdp\\) training checkpoint, not a .* file: "
               f"`python train_dit.py --export {fsdp}/ckpt`")
    with pytest.raises(UserError, match=sharded):
        sample.main(["--ckpt", f"{fsdp}/ckpt", "--device", "cpu"])
    with pytest.raises(UserError, match=sharded):  # e.g. train_tokenizer.py --init
        load_tokenizer(f"{fsdp}/ckpt")
    with pytest.raises(UserError, match=r"no sharded \(--fsdp\) checkpoint .*ddp/ckpt to export"):
        train_dit.main(["--export", "--run_dir", ddp])
    with pytest.raises(UserError, match="--batch_size 8 must split evenly over 1 ranks, each "
                                        "share into micro-batches of --micro_batch 3"):
        train_dit.main(["--latents", folder, "--run_dir", str(tmp_path / "r"), *TINY_DIT,
                        "--micro_batch", "3"])
    proc = run_script(["train_tokenizer.py", "--stage", "1", "--fsdp", "--device", "cpu",
                       "--run_dir", str(tmp_path)])
    assert proc.returncode == 2 and "unrecognized arguments: --fsdp" in proc.stderr, proc.stderr


# --------------------------------------------------------------------------------------------------
# Sharded checkpoints: export only reads, kept copies survive a kill, damage is one line


KILL_AT_KEEP = """
import os, signal, sys
import train_dit
real = os.rename
def rename(src, dst):  # the kept copy of step 4 put in place
    if str(dst).endswith("ckpt_0000004"):
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.rename = rename
train_dit.main(sys.argv[1:])
"""


def test_fsdp_kept_copy_is_made_again_after_a_kill_at_its_rename(latents, tmp_path):
    _, folder = latents
    args = ["--latents", folder, *TINY_DIT, "--fsdp", "--ckpt_every", "2", "--keep_every", "4",
            "--steps", "6", "--run_dir", str(tmp_path)]
    proc = run_script(["-c", KILL_AT_KEEP, *args])
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    train_dit.main([*args, "--resume"])
    kept = load_checkpoint(str(tmp_path / "ckpt_0000004" / "train_state.pt"))
    assert kept["step"] == 4
    assert load_checkpoint(str(tmp_path / "ckpt" / "train_state.pt"))["step"] == 6


def test_fsdp_export_only_reads_and_takes_a_kept_checkpoint(latents, tmp_path):
    _, folder = latents
    train_dit.main(["--latents", folder, *TINY_DIT, "--fsdp", "--ckpt_every", "1",
                    "--keep_every", "1", "--steps", "2", "--run_dir", str(tmp_path)])
    # a save in flight: its half-written folder is the trainer's, not --export's to delete
    shutil.copytree(tmp_path / "ckpt", tmp_path / "ckpt.tmp")
    train_dit.main(["--export", "--run_dir", str(tmp_path)])
    assert (tmp_path / "ckpt.tmp" / "train_state.pt").exists()
    path = train_dit.main(["--export", str(tmp_path / "ckpt_0000001")])
    assert path == str(tmp_path / "export_0000001.pt")
    model, meta = sample.load_dit(path)
    assert meta["step"] == 1
    assert load_checkpoint(str(tmp_path / "export.pt"))["step"] == 2


@pytest.mark.parametrize("damage", ["shard deleted", "shard truncated", "no .metadata", "empty"])
def test_fsdp_damaged_checkpoint_is_one_line_naming_the_kept_copy(latents, tmp_path, damage):
    _, folder = latents
    args = ["--latents", folder, *TINY_DIT, "--fsdp", "--ckpt_every", "1", "--keep_every", "2",
            "--steps", "3", "--run_dir", str(tmp_path)]
    train_dit.main(args)
    ckpt = tmp_path / "ckpt"
    if damage == "empty":
        shutil.rmtree(ckpt)
        ckpt.mkdir()
    elif damage == "no .metadata":
        (ckpt / ".metadata").unlink()
    else:
        shard = ckpt / "__0_0.distcp"
        shard.unlink() if damage == "shard deleted" else shard.write_bytes(shard.read_bytes()[:99])
    for argv in ([*args, "--resume"], ["--export", str(ckpt)]):
        with pytest.raises(UserError, match=f"the sharded checkpoint {ckpt} is damaged or "
                           f"incomplete .*the last kept copy is {tmp_path / 'ckpt_0000002'}"):
            train_dit.main(argv)


def test_micro_batch_above_a_ranks_share_means_no_accumulation(latents, tmp_path):
    _, folder = latents
    train_dit.main(["--latents", folder, *TINY_DIT, "--micro_batch", "16", "--steps", "1",
                    "--run_dir", str(tmp_path)])
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 1
    args = type("Args", (), {"batch_size": 7, "micro_batch": None})
    with pytest.raises(UserError) as e:  # names only the flags the user gave
        common.micro_batches(args, DistEnv(0, 0, 2, torch.device("cpu")))
    assert "--micro_batch" not in str(e.value) and "--batch_size 7" in str(e.value)
