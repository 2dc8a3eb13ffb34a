"""cfg_search.py: one sample + FID pass per setting, the table, plot and best setting, and a
resumed sweep that reads finished settings back instead of redoing them (tiny random models, stub
Inception)."""

import json

import numpy as np
import pytest
import torch

import cfg_search
import fid
import sample
from common import UserError
from conftest import StubInception, randomize_, save_tokenizer
from dit import build_dit


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    tok = save_tokenizer(str(tmp_path / "tok.pt"))
    args = dict(input_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=4)
    model = randomize_(build_dit("B/1", **args), seed=0)
    g = torch.Generator().manual_seed(2)
    torch.save(
        {
            "kind": "dit",
            "model_name": "B/1",
            "model_args": args,
            "model": model.state_dict(),
            "ema": model.state_dict(),
            "step": 10,
            "tokenizer": str(tmp_path / "tok.pt"),
            "tokenizer_config": tok.config,
            "latent_stats": {
                "mean": torch.randn(32, generator=g),
                "std": torch.rand(32, generator=g) + 0.5,
            },
        },
        tmp_path / "dit.pt",
    )
    np.savez(
        tmp_path / "ref.npz",
        arr_0=np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), np.uint8),
    )
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: StubInception())
    sampled = []  # the guidance scale of every generated batch
    generate = sample.generate
    monkeypatch.setattr(
        sample, "generate", lambda *a, **k: (sampled.append(a[5].cfg), generate(*a, **k))[1]
    )
    out = tmp_path / "sweep"
    argv = [
        str(tmp_path / "ref.npz"),
        "--ckpt",
        str(tmp_path / "dit.pt"),
        "--num_samples",
        "6",
        "--steps",
        "3",
        "--batch_size",
        "6",
        "--device",
        "cpu",
        "--num_workers",
        "0",
        "--out",
        str(out),
    ]
    return argv, out, sampled


def test_sweep_table_plot_best_and_resume(sweep):
    argv, out, sampled = sweep
    best = cfg_search.main([*argv, "--cfg_scales", "1", "3", "--keep_samples"])
    rows = json.load(open(out / "results.json"))
    assert [(r["cfg"], r["cfg_interval_start"]) for r in rows] == [
        (1.0, 0.0),
        (3.0, 0.0),
    ] and sampled == [1.0, 3.0]
    # Each row is fid.py's evaluation of that setting's samples against the reference's statistics.
    for r in rows:
        again = fid.evaluate(
            str(out / f"cfg{r['cfg']:g}_from0" / "samples.npz"),
            str(out / "reference_stats.npz"),
            model=StubInception(),
            progress=False,
        )
        assert r["fid"] == again["fid"] and r["sfid"] == again["sfid"] and r["num_samples"] == 6
    assert rows[0]["fid"] != rows[1]["fid"]  # guidance changed the samples
    assert best == {k: v for k, v in min(rows, key=lambda r: r["fid"]).items() if k in best}
    assert json.load(open(out / "best.json")) == best
    assert (out / "fid_vs_cfg.png").exists() and (out / "results.csv").read_text().count("\n") == 3
    # A second run with one more scale: the finished ones are read back, only the new one sampled.
    sampled.clear()
    cfg_search.main([*argv, "--cfg_scales", "1", "3", "2"])
    assert sampled == [2.0]
    rows2 = json.load(open(out / "results.json"))
    assert (
        [r["cfg"] for r in rows2] == [1.0, 2.0, 3.0] and rows2[0] == rows[0] and rows2[2] == rows[1]
    )
    assert not (
        out / "cfg2_from0" / "samples.npz"
    ).exists()  # evaluated, then deleted (no --keep_samples)
    # Another sampler setting in the same folder is refused, not mixed in.
    with pytest.raises(UserError, match="holds a sweep with other settings"):
        cfg_search.main([*[a if a != "3" else "4" for a in argv], "--cfg_scales", "1"])
    with pytest.raises(SystemExit):
        cfg_search.parse_args([*argv, "--cfg_scales", "1", "--cfg", "2"])  # set by the sweep
