"""cfg_search.py: one sample + FID pass per setting, the table, plot and best setting, a resumed
sweep that reads finished settings back instead of redoing them, and the refusals that keep results
of another model or an impossible reference out (tiny random models, stub Inception)."""

import json
import shutil

import numpy as np
import pytest
import torch

import cfg_search
import fid
import sample
from common import UserError
from conftest import StubInception, randomize_, save_tokenizer
from dit import build_dit


def save_dit(path, tok_path, step=10):
    args = dict(input_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=4)
    model = randomize_(build_dit("B/1", **args), seed=0)
    g = torch.Generator().manual_seed(2)
    torch.save({"kind": "dit", "model_name": "B/1", "model_args": args,
                "model": model.state_dict(), "ema": model.state_dict(), "step": step,
                "tokenizer": str(tok_path), "tokenizer_config": {"image_size": 32},
                "latent_stats": {"mean": torch.randn(32, generator=g),
                                 "std": torch.rand(32, generator=g) + 0.5}}, path)


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    save_tokenizer(str(tmp_path / "tok.pt"))
    save_dit(tmp_path / "dit.pt", tmp_path / "tok.pt")
    images = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=images)
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: StubInception())
    sampled = []  # the guidance scale of every generated batch
    images = sample.Sampler.images
    monkeypatch.setattr(sample.Sampler, "images",
                        lambda self, *a: (sampled.append(self.args.cfg), images(self, *a))[1])
    out = tmp_path / "sweep"
    argv = [str(tmp_path / "ref.npz"), "--ckpt", str(tmp_path / "dit.pt"), "--num_samples", "6",
            "--steps", "3", "--batch_size", "6", "--device", "cpu", "--num_workers", "0",
            "--out", str(out)]
    return argv, out, sampled


def test_sweep_table_plot_best_and_resume(sweep):
    argv, out, sampled = sweep
    best = cfg_search.main([*argv, "--cfg_scales", "1", "3", "--keep_samples"])
    rows = json.load(open(out / "results.json"))
    assert [(r["cfg"], r["cfg_interval_start"]) for r in rows] == [(1.0, 0.0), (3.0, 0.0)]
    assert sampled == [1.0, 3.0]
    # Each row is fid.py's evaluation of that setting's samples against the reference's statistics.
    for r in rows:
        again = fid.evaluate(str(out / f"cfg{r['cfg']:g}_from0" / "samples.npz"),
                             str(out / "reference_stats.npz"), model=StubInception(),
                             progress=False)
        assert r["fid"] == pytest.approx(again["fid"], abs=1e-9)
        assert r["sfid"] == pytest.approx(again["sfid"], abs=1e-9) and r["num_samples"] == 6
    assert rows[0]["fid"] != rows[1]["fid"]  # guidance changed the samples
    assert best == {k: v for k, v in min(rows, key=lambda r: r["fid"]).items() if k in best}
    assert json.load(open(out / "best.json")) == best
    assert (out / "fid_vs_cfg.png").exists() and (out / "results.csv").read_text().count("\n") == 3
    # A second run with one more scale: the finished ones are read back, only the new one sampled.
    sampled.clear()
    cfg_search.main([*argv, "--cfg_scales", "1", "3", "2"])
    assert sampled == [2.0]
    rows2 = json.load(open(out / "results.json"))
    assert [r["cfg"] for r in rows2] == [1.0, 2.0, 3.0]
    assert rows2[0] == rows[0] and rows2[2] == rows[1]
    assert not (out / "cfg2_from0" / "samples.npz").exists()  # evaluated, then deleted
    # Another sampler setting in the same folder is refused, not mixed in.
    with pytest.raises(UserError, match="holds a sweep made with other settings.*'steps'"):
        cfg_search.main([*[a if a != "3" else "4" for a in argv], "--cfg_scales", "1"])


def test_a_changed_model_is_not_mixed_with_finished_settings(sweep, tmp_path):
    """Issue: after more training (same --ckpt path, a later step), another --tokenizer or
    --precision, the finished scales were read back beside the new model's."""
    argv, out, sampled = sweep
    cfg_search.main([*argv, "--cfg_scales", "1"])
    save_dit(tmp_path / "dit.pt", tmp_path / "tok.pt", step=20)  # training went on
    with pytest.raises(UserError, match=r"other settings.*'step': \(10, 20\)"):
        cfg_search.main([*argv, "--cfg_scales", "1", "3"])
    save_dit(tmp_path / "dit.pt", tmp_path / "tok.pt", step=10)
    shutil.copy(tmp_path / "tok.pt", tmp_path / "tok3.pt")  # e.g. a stage-3 decoder
    with pytest.raises(UserError, match="other settings.*'tokenizer'"):
        cfg_search.main([*argv, "--cfg_scales", "1", "--tokenizer", str(tmp_path / "tok3.pt")])
    with pytest.raises(UserError, match=r"other settings.*'precision': \('fp32', 'bf16'\)"):
        cfg_search.main([*argv, "--cfg_scales", "1", "--precision", "bf16"])
    assert sampled == [1.0]


def test_a_reference_without_spatial_statistics_is_refused_before_sampling(sweep, tmp_path):
    argv, out, sampled = sweep
    ref = str(tmp_path / "stats.npz")
    np.savez(ref, mu=np.zeros(64), sigma=np.eye(64), num_images=np.int64(12))  # stub Inception
    argv = [ref, *argv[1:]]
    with pytest.raises(UserError, match="stats.npz has no spatial statistics.*--no_sfid"):
        cfg_search.main([*argv, "--cfg_scales", "1"])
    assert sampled == []  # nothing drawn before the refusal
    # Its advice works in the same --out.
    cfg_search.main([*argv, "--cfg_scales", "1", "--no_sfid"])
    assert sampled == [1.0] and "sfid" not in json.load(open(out / "best.json"))


def test_rank_by_fd_dinov2(sweep, tmp_path):
    """--rank_by fd_dinov2 (random one-block DINOv2): computed for every setting, a column of the
    table, the best setting's metric; a reference that cannot give it is refused before sampling."""
    argv, out, sampled = sweep
    ref = str(tmp_path / "stats.npz")
    np.savez(ref, mu=np.zeros(64), sigma=np.eye(64), mu_s=np.zeros(12), sigma_s=np.eye(12))
    with pytest.raises(UserError, match="stats.npz has no DINOv2 statistics"):
        cfg_search.main([ref, *argv[1:], "--cfg_scales", "1", "--rank_by", "fd_dinov2",
                         "--random_dinov2", "--out", str(tmp_path / "refused")])
    assert sampled == []
    best = cfg_search.main([*argv, "--cfg_scales", "1", "3", "--rank_by", "fd_dinov2",
                            "--random_dinov2", "--balanced_labels"])
    rows = json.load(open(out / "results.json"))
    assert all(r["fd_dinov2"] > 0 and r["labelling"] == "balanced" for r in rows)
    assert best["fd_dinov2"] == min(r["fd_dinov2"] for r in rows)
    assert "fd_dinov2" in (out / "results.csv").read_text().splitlines()[0]
    # The best by each metric, where they disagree.
    rows = [{"cfg": w, "cfg_interval_start": 0.0, "fid": f, "fd_dinov2": d, "num_samples": 6,
             "reference": "r"} for w, f, d in ((1.0, 5.0, 90.0), (2.0, 6.0, 80.0))]
    by = {m: cfg_search.write_results(rows, str(tmp_path), print, m)["cfg"]
          for m in ("fid", "fd_dinov2")}
    assert by == {"fid": 1.0, "fd_dinov2": 2.0}


def test_flags_set_by_the_sweep_and_scales_that_are_not_finite(capsys):
    with pytest.raises(SystemExit):  # it said "must be at least 0.0"
        cfg_search.parse_args(["ref.npz", "--cfg_scales", "1", "inf"])
    assert "--cfg_scales: must be finite" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # sample.py's --cfg is the sweep's: not --cfg_scales' abbrev.
        cfg_search.parse_args(["ref.npz", "--cfg_scales", "1", "--cfg", "2"])
    assert "unrecognized arguments: --cfg 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cfg_search.parse_args(["ref.npz", "--cfg_scales", "1", "--interval_starts", "1"])
