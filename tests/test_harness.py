"""The run harness and the scripts' shared plumbing (common.py), checked end to end:

- counts (steps, batch sizes, cadences) are refused when the command line is parsed, naming the
  flag;
- atomic writes: stale temporary files of a killed writer are cleaned up, a failing writer (full
  disk) leaves the previous file intact and no temporary file;
- sample.py --npz: a damaged settings.json is a clear error, and settings.json is written
  atomically;
- fid.py on a folder whose first image is unreadable;
- unwritable outputs are reported before any work (fid.py --json/--save_stats, sample.py --out);
- a resumed run marks its log, and `read_log` keeps one record per step, the latest;
- user errors are one line on stderr, exit status 2, once under torchrun;
- load_checkpoint refuses foreign pickles without passing on PyTorch's "load unsafely" advice, and
  names a truncated file;
- Ctrl-C (SIGINT) stops a training run like SIGTERM does: it saves and exits with EXIT_STOPPED.
"""

import errno
import json
import os
import pickle
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
import fid
import sample
import train_dit
import train_tokenizer
from common import EXIT_STOPPED, UserError, atomic_write, load_checkpoint, save_checkpoint
from conftest import ROOT, StubInception, randomize_, run_script
from dit import build_dit
from tokenizer import AlignedTokenizer

# As tests/test_train_dit.py: a one-block LightningDiT on 32x2x2 latents, batch 8, on the CPU.
TINY_DIT = ["--model", "B/1", "--hidden_size", "32", "--depth", "1", "--num_heads", "2",
            "--batch_size", "8", "--num_workers", "0", "--device", "cpu", "--log_every", "1",
            "--grid_every", "0", "--lr", "1e-3"]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                  "PYTHONPATH": ROOT}


def tiny_tokenizer(path, stage=2):
    """A random tiny tokenizer (32 px -> 32x2x2 latents), saved as the trainer exports it."""
    tok = AlignedTokenizer(dict(encoder="tiny", image_size=32, decoder_ch=32, decoder_res_blocks=1))
    ckpt = {"kind": "tokenizer", "stage": stage, "config": tok.config, "model": tok.state_dict()}
    torch.save(ckpt, path)
    return tok


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """The latents of 24 demo images under a random tiny tokenizer (as test_train_dit.py's
    fixture)."""
    root = tmp_path_factory.mktemp("latents")
    torch.manual_seed(0)
    tiny_tokenizer(str(root / "tokenizer.pt"))
    folder = str(root / "latents")
    train_dit.main(["--extract", "--tokenizer", str(root / "tokenizer.pt"), "--latents", folder,
                    "--demo_images", "24", "--batch_size", "8", "--num_workers", "0",
                    "--device", "cpu"])
    return folder


@pytest.fixture(scope="module")
def dit_ckpt(tmp_path_factory):
    """A tiny LightningDiT checkpoint with latent statistics and its tokenizer (as
    test_sample.py's)."""
    d = tmp_path_factory.mktemp("sample")
    torch.manual_seed(0)
    tok = tiny_tokenizer(str(d / "tok.pt"), stage=3)
    args = dict(input_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=4)
    model = randomize_(build_dit("B/1", **args))
    g = torch.Generator().manual_seed(2)
    stats = {"mean": torch.randn(32, generator=g), "std": torch.rand(32, generator=g) + 0.5}
    ckpt = {"kind": "dit", "model_name": "B/1", "model_args": args, "model": model.state_dict(),
            "ema": model.state_dict(), "step": 10, "tokenizer": str(d / "tok.pt"),
            "tokenizer_config": tok.config, "latent_stats": stats}
    torch.save(ckpt, d / "dit.pt")
    return str(d / "dit.pt")


def sample_cli(ckpt, out, *args):
    return ["--ckpt", ckpt, "--device", "cpu", "--steps", "3", "--out", str(out), *map(str, args)]


def save_pngs(folder, names, h=20, w=28, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(folder / name)


def unwritable(tmp_path, name):
    """A path no one can create, root included (tests run as root, so chmod would not stop a write):
    its folder would have to be made inside a regular file."""
    (tmp_path / "afile").write_text("a file, not a folder")
    return str(tmp_path / "afile" / name)


def temp_files(folder):
    return sorted(n for n in os.listdir(folder) if ".tmp" in n)


# --------------------------------------------------------------------------------------------------
# 1. Counts are checked when the command line is parsed


COUNT_FLAGS = [("--steps", "0"), ("--steps", "-1"), ("--batch_size", "0"), ("--log_every", "0"),
               ("--ckpt_every", "0")]


@pytest.mark.parametrize("parse,fixed", [(train_tokenizer.parse_args, ["--stage", "1"]),
                                         (train_dit.parse_args, [])],
                         ids=["train_tokenizer", "train_dit"])
@pytest.mark.parametrize("flag,value", COUNT_FLAGS + [("--grid_every", "-1")])
def test_trainers_refuse_bad_counts_when_parsing(parse, fixed, flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        parse([*fixed, flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be at least" in err and f"got {value}" in err, err


@pytest.mark.parametrize("parse,fixed", [(sample.parse_args, []), (fid.parse_args, ["a", "b"])],
                         ids=["sample", "fid"])
def test_sample_and_fid_refuse_batch_size_0_when_parsing(parse, fixed, capsys):
    with pytest.raises(SystemExit) as e:
        parse([*fixed, "--batch_size", "0"])
    assert e.value.code == 2
    assert "argument --batch_size: must be at least 1, got 0" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# 2. Atomic writes


def test_save_removes_temp_files_of_an_interrupted_save(tmp_path):
    target = tmp_path / "ckpt.pt"
    # What a writer killed mid-save leaves: its temporary file, named after its (dead) process id.
    stale = [tmp_path / ".ckpt.pt.tmp4242", tmp_path / f".ckpt.pt.tmp{os.getpid()}"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    other = tmp_path / ".ckpt_0000002.pt.tmp4242"  # another file's temporary: not ours to remove
    other.write_bytes(b"x")
    save_checkpoint({"w": torch.arange(3)}, str(target))
    assert not any(p.exists() for p in stale)
    assert other.exists()
    assert torch.equal(load_checkpoint(str(target))["w"], torch.arange(3))


def test_a_failing_writer_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write(str(target), lambda f: f.write(b"version 1"))

    def full_disk(f):  # half the data goes out, then the disk is full
        f.write(b"version 2, first half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="No space left on device.*out.bin there, if any, is"):
        atomic_write(str(target), full_disk)
    assert target.read_bytes() == b"version 1"
    assert temp_files(tmp_path) == []


class FailsToPickle:
    """Stands for a disk that fills up while torch.save is writing: pickling this raises OSError."""

    def __reduce__(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failing_checkpoint_save_keeps_the_previous_checkpoint(tmp_path):
    target = str(tmp_path / "ckpt.pt")
    save_checkpoint({"step": 1, "w": torch.ones(4)}, target)
    with pytest.raises(UserError, match="No space left"):
        save_checkpoint({"step": 2, "w": torch.zeros(1000), "z": FailsToPickle()}, target)
    ckpt = load_checkpoint(target)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(4))
    assert temp_files(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# 3. sample.py --npz and its settings.json


@pytest.mark.parametrize("content", [b"", b'{"cfg": 1.0, "st'], ids=["empty", "truncated"])
def test_npz_damaged_settings_file_is_a_user_error_naming_it(dit_ckpt, tmp_path, content,
                                                              monkeypatch):
    monkeypatch.setattr(sample.Sampler, "images",
                        lambda *a, **k: pytest.fail("sampled despite a damaged settings.json"))
    out = tmp_path / "npz"
    out.mkdir()
    (out / "settings.json").write_bytes(content)
    with pytest.raises(UserError, match="settings.json") as e:
        sample.main(sample_cli(dit_ckpt, out, "--npz", "--num_samples", 2))
    assert str(out / "settings.json") in str(e.value)
    assert "\n" not in str(e.value)  # one line


def test_npz_settings_file_is_written_atomically(dit_ckpt, tmp_path):
    out = tmp_path / "npz"
    out.mkdir()
    # A temporary file of a killed earlier run: only a write through atomic_write removes it.
    (out / ".settings.json.tmp4242").write_text('{"cfg": 1.')
    path = sample.main(sample_cli(dit_ckpt, out, "--npz", "--num_samples", 2, "--shard_size", 2))
    assert path == str(out / "samples.npz") and np.load(path)["arr_0"].shape == (2, 32, 32, 3)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["num_samples"] == 2 and settings["steps"] == 3
    assert temp_files(out) == []


# --------------------------------------------------------------------------------------------------
# 4. fid.py: a folder whose first image (in sorted order) is unreadable


def test_fid_folder_whose_first_image_is_unreadable(tmp_path, monkeypatch):
    samples, reference = tmp_path / "samples", tmp_path / "reference"
    save_pngs(samples, ["1.png", "2.png", "3.png"], seed=0)
    (samples / "0.png").write_bytes(b"not a png at all")  # first in sorted order
    save_pngs(reference, ["0.png", "1.png", "2.png"], seed=1)
    # The default crop is the short side of the first READABLE image (20 of 20x28).
    source = fid.load_source(str(samples))
    assert source.image_size == 20
    with pytest.warns(UserWarning) as caught:
        pools, _ = fid.compute_activations(source, StubInception(), batch_size=2, num_workers=0,
                                           progress=False)
    messages = [str(w.message) for w in caught]
    assert any("unreadable image" in m and "0.png" in m for m in messages), messages
    assert any("1 unreadable files were replaced" in m for m in messages), messages
    assert pools.shape == (4, 64) and np.isfinite(pools).all()
    # The whole command line too (with the stub network in place of the Inception weights).
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: StubInception())
    out = tmp_path / "fid.json"
    with pytest.warns(UserWarning) as caught:  # also: 3-4 images make a rank-deficient covariance
        result = fid.main([str(samples), str(reference), "--device", "cpu", "--num_workers", "0",
                           "--json", str(out)])
    assert any("0.png" in str(w.message) for w in caught)
    assert np.isfinite(result["fid"])
    assert result["num_samples"] == 4 and result["num_reference"] == 3
    assert json.loads(out.read_text())["fid"] == result["fid"]


# --------------------------------------------------------------------------------------------------
# 5. Unwritable outputs are found before the work


@pytest.mark.parametrize("flag,what",
                         [("--json", "results file"), ("--save_stats", "statistics file")])
def test_fid_unwritable_output_fails_before_any_feature(tmp_path, monkeypatch, flag, what):
    save_pngs(tmp_path / "a", ["0.png", "1.png"])
    # The stub network: without it a missing Inception file would also end in a UserError.
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: StubInception())
    monkeypatch.setattr(fid, "compute_activations",
                        lambda *a, **k: pytest.fail("features computed first"))
    bad = unwritable(tmp_path, "out.json" if flag == "--json" else "stats.npz")
    with pytest.raises(UserError, match=f"cannot write the {what} {bad}"):
        fid.main([str(tmp_path / "a"), str(tmp_path / "a"), "--device", "cpu", "--num_workers", "0",
                  flag, bad])


@pytest.mark.parametrize("mode", [[], ["--npz", "--num_samples", "2"]], ids=["grid", "npz"])
def test_sample_unwritable_out_fails_before_any_sample(dit_ckpt, tmp_path, monkeypatch, mode):
    monkeypatch.setattr(sample.Sampler, "images",
                        lambda *a, **k: pytest.fail("sampled before checking --out"))
    bad = unwritable(tmp_path, "samples")
    with pytest.raises(UserError, match=f"cannot write the output {bad}"):
        sample.main(sample_cli(dit_ckpt, bad, *mode))


# --------------------------------------------------------------------------------------------------
# 6. A resumed run marks its log


def test_resume_marks_the_log_and_read_log_keeps_the_latest_records(latents, tmp_path):
    run = tmp_path / "run"
    args = ["--latents", latents, "--run_dir", str(run), *TINY_DIT, "--ckpt_every", "2",
            "--keep_every", "2"]
    train_dit.main([*args, "--steps", "3"])
    assert load_checkpoint(str(run / "ckpt_0000002.pt"))["step"] == 2
    # Go back to step 2: steps 3.. run again.
    shutil.copy(run / "ckpt_0000002.pt", run / "ckpt.pt")
    train_dit.main([*args, "--steps", "4", "--resume"])
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    events = [(r["event"], r["step"]) for r in lines if "event" in r]
    assert events == [("start", 0), ("resume", 2)]
    resume_at = next(i for i, r in enumerate(lines) if r.get("event") == "resume")
    assert [r["step"] for r in lines[:resume_at] if "event" not in r] == [1, 2, 3]
    assert [r["step"] for r in lines[resume_at:] if "event" not in r] == [3, 4]
    records = common.read_log(str(run / "log.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    later_step3 = next(r for r in lines[resume_at:] if r.get("step") == 3 and "event" not in r)
    earlier_step3 = next(r for r in lines[:resume_at] if r.get("step") == 3 and "event" not in r)
    assert records[2] == later_step3 and later_step3["time"] > earlier_step3["time"]
    # An exact resume: the re-run step 3 has the loss it had the first time.
    assert later_step3["loss"] == earlier_step3["loss"]
    # Back to step 2 once more, now for a shorter run:
    # the abandoned step 4 must not stay in the log.
    shutil.copy(run / "ckpt_0000002.pt", run / "ckpt.pt")
    train_dit.main([*args, "--steps", "3", "--resume"])
    records = common.read_log(str(run / "log.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3]


def test_curves_png_and_tensorboard(latents, tmp_path, monkeypatch):
    """Every run draws its logged numbers (losses, lr, images/s) into curves.png, and logs them to
    TensorBoard when that is installed (a stand-in SummaryWriter here: tensorboard is not a
    dependency)."""
    import types

    scalars = []

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, key, value, step):
            scalars.append((key, step))

        def flush(self):
            pass

    fake_tensorboard = types.SimpleNamespace(SummaryWriter=FakeWriter)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake_tensorboard)
    run = tmp_path / "run"
    train_dit.main(["--latents", latents, "--run_dir", str(run), *TINY_DIT, "--steps", "3"])
    curves = Image.open(run / "curves.png")
    assert curves.size[0] >= 600 and len(np.unique(np.asarray(curves))) > 2  # panels were drawn
    assert {("loss", 1), ("lr", 3), ("img_per_s", 2)} <= set(scalars)
    records = common.read_log(str(run / "log.jsonl"))
    assert all(r["lr"] == 1e-3 for r in records)


def test_plot_curves_draws_values_that_start_late(tmp_path):
    """The GAN terms only exist from the discriminator's start: they get a panel too."""
    records = [{"step": s, "loss": 1.0 / s, **({"d_loss": 0.5} if s > 2 else {})}
               for s in range(1, 6)]
    common.plot_curves(records, str(tmp_path / "c.png"))
    width, height = Image.open(tmp_path / "c.png").size
    assert (width, height) == (2 * 300, 170)  # two panels in one row


# --------------------------------------------------------------------------------------------------
# 7. A user error is one line on stderr and exit status 2


def test_user_error_is_one_line_with_status_2(tmp_path):
    proc = run_script(["train_dit.py", "--latents", str(tmp_path / "missing"),
                       "--run_dir", str(tmp_path / "run"), "--device", "cpu"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: no extracted latents"), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "run").exists()  # it failed before writing anything


def test_user_error_under_torchrun_is_printed_once(tmp_path):
    # conftest.run_torchrun asserts success, so the same command line is built here.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train_dit.py", "--latents", str(tmp_path / "missing"),
           "--run_dir", str(tmp_path / "run"), "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True,
                          timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert out.count("error: no extracted latents") == 1, out[-3000:]
    assert "Traceback" not in out.split("error: no extracted latents")[0], out[-3000:]


# --------------------------------------------------------------------------------------------------
# 8. load_checkpoint refuses foreign objects and names damaged files


class NotATensor:
    def __init__(self):
        self.value = 1


class RunsCode:
    """Unpickling this would run a shell command (it creates a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_load_checkpoint_refuses_foreign_objects_without_unsafe_advice(tmp_path):
    marker = tmp_path / "code_ran"
    files = {"class": tmp_path / "class.pt", "torch_system": tmp_path / "torch_system.pt",
             "pickle_system": tmp_path / "pickle_system.pt"}
    torch.save({"x": NotATensor(), "w": torch.ones(2)}, files["class"])
    torch.save({"x": RunsCode(marker)}, files["torch_system"])
    with open(files["pickle_system"], "wb") as f:  # a plain pickle, not a torch zip file
        pickle.dump({"x": RunsCode(marker)}, f, protocol=2)
    for name, path in files.items():
        with pytest.raises(UserError) as e:
            load_checkpoint(str(path), "training checkpoint")
        msg = str(e.value)
        assert str(path) in msg, (name, msg)
        # PyTorch's own message suggests weights_only=False or allow-listing the object, i.e.
        # running or trusting the file's code: neither is passed on.
        assert "weights_only" not in msg and "safe_globals" not in msg, (name, msg)
    assert not marker.exists()


def test_load_checkpoint_names_a_truncated_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"step": 3, "w": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="could not read checkpoint") as e:
        load_checkpoint(str(path))
    assert str(path) in str(e.value)


# --------------------------------------------------------------------------------------------------
# 9. Ctrl-C stops a training run like SIGTERM (the existing tests cover SIGTERM only)


def logged_a_step(log):
    try:
        return bool(common.read_log(str(log)))
    except (OSError, ValueError):  # not there yet, or a line half written
        return False


def test_ctrl_c_saves_and_exits_with_exit_stopped(latents, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train_dit.py", "--latents", latents,
                             "--run_dir", str(run), *TINY_DIT, "--steps", "1000000"],
                            cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    log = run / "log.jsonl"
    deadline = time.time() + 120
    # Wait for a step record (not only the start record): the stop handler is in place inside
    # the loop.
    while time.time() < deadline and proc.poll() is None and not logged_a_step(log):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == EXIT_STOPPED, out[-3000:]
    assert "received SIGINT" in out and "continue with --resume" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    step = load_checkpoint(str(run / "ckpt.pt"))["step"]
    assert 1 <= step < 1000000
    assert common.read_log(str(log))[-1]["step"] <= step
