"""Text-to-image: caption data (folders, WebDataset shards, damage, buckets, exact resume), the
model (shapes on non-square grids, AdaLN-Zero, padding, parameter count, FLOPs), the text encoder
and CLIP score on tiny random models, train_t2i.py (resume, 2 gloo ranks), sample_t2i.py's prompts,
and a short training run whose samples follow the colour named in the prompt."""

import io
import json
import os
import shutil
import signal
import tarfile
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import common
import sample
import sample_t2i
import t2i
import train_t2i
from baselines import load_tokenizer
from captions import CaptionBatches, CaptionStream, buckets, decode, parse_size, read_shard
from common import UserError, load_checkpoint, read_log
from conftest import randomize_, run_script, run_torchrun, save_random_clip, save_tokenizer
from data import DemoShapes
from text import TextEncoder, clip_score, save_random_text_encoder

# --------------------------------------------------------------------------------------------------
# Buckets


def test_buckets_have_the_area_whole_cells_and_both_orientations():
    sizes = buckets(256, 16)
    assert {(256, 256), (224, 288), (288, 224)} <= set(sizes)
    for h, w in sizes:
        assert h % 16 == 0 and w % 16 == 0
        assert abs(h * w / 256 ** 2 - 1) <= 0.1 and max(h / w, w / h) <= 2
        assert (w, h) in sizes
    assert [h / w for h, w in sizes] == sorted(h / w for h, w in sizes)  # tall to wide
    # patch 2: whole patches
    assert all(s[0] % 32 == 0 and s[1] % 32 == 0 for s in buckets(256, 32))
    assert decode(jpeg(500, 400), "c", sizes).shape == (288, 224, 3)  # 5:4 portrait -> 9:7
    assert decode(jpeg(300, 300), "c", sizes).shape == (256, 256, 3)
    assert parse_size("224x288", sizes) == (224, 288)
    with pytest.raises(UserError, match="--size 250x250 is not one of the buckets: .*224x288"):
        parse_size("250x250", sizes)


# --------------------------------------------------------------------------------------------------
# Caption data


def jpeg(h, w, colour=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path, samples):
    """samples: (key, {ext: bytes}) as img2dataset writes them, in order."""
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_webdataset_shards_buckets_and_skipped_samples(tmp_path):
    sizes = buckets(64, 16)  # 48x80, 64x64, 80x48
    write_tar(tmp_path / "00000.tar", [
        ("a", {".jpg": jpeg(64, 64), ".txt": b"a square", ".json": b"{}"}),
        ("b", {".jpg": jpeg(60, 100), ".txt": b"a wide one"}),
        ("c", {".jpg": jpeg(64, 64)}),  # no caption: skipped
        ("d", {".jpg": jpeg(64, 64), ".txt": b"  \n"}),  # empty caption: skipped
        ("e", {".jpg": b"not a jpeg", ".txt": b"corrupt"}),  # undecodable: skipped
        ("f", {".png": jpeg(100, 62), ".txt": "a tall one, caf\u00e9".encode()}),
        ("g", {".jpg": jpeg(70, 70), ".txt": b"another square"}),
    ])
    batches = take(CaptionStream(str(tmp_path), 1, sizes), 4)
    got = [(b["captions"][0], tuple(b["images"].shape)) for b in batches]
    assert got == [("a square", (1, 3, 64, 64)), ("a wide one", (1, 3, 48, 80)),
                   ("a tall one, caf\u00e9", (1, 3, 80, 48)), ("another square", (1, 3, 64, 64))]
    assert batches[-1]["skipped"] == 3 and batches[0]["images"].dtype == torch.uint8
    assert batches[0]["images"][0, :, 32, 32].tolist() == pytest.approx([200, 30, 30], abs=8)
    # Batches of two: each from one bucket, so the two squares travel together.
    pairs = take(CaptionStream(str(tmp_path / "00000.tar"), 2, sizes), 1)
    assert pairs[0]["captions"] == ["a square", "another square"]


@pytest.mark.parametrize("cut", [0, 300, 700])  # at a header, in a header, in an image
def test_a_shard_cut_short_is_read_up_to_the_damage(tmp_path, cut):
    path = tmp_path / "cut.tar"
    write_tar(path, [(f"{i:03d}", {".jpg": jpeg(32, 32), ".txt": f"image {i}".encode()})
                     for i in range(6)])
    whole = list(read_shard(str(path)))
    assert [s[2] for s in whole] == [f"image {i}" for i in range(6)]
    # 4 samples of 2560 bytes (4 tar blocks + 2 headers)
    path.write_bytes(path.read_bytes()[: 4 * 2560 + cut])
    with pytest.warns(UserWarning, match="cut.tar is damaged"):
        samples = list(read_shard(str(path)))
    good = [s for s in samples if s[1] is not None and s[2]]
    assert [s[2] for s in good] == [f"image {i}" for i in range(4)]
    assert len(samples) - len(good) >= 1
    stream = CaptionStream(str(path), 1, buckets(32, 16))
    assert take(stream, 4)[-1]["skipped"] == 0  # the damage is counted when the stream reaches it
    with pytest.warns(UserWarning, match="cut.tar is damaged"):
        assert take(stream, 5)[-1]["skipped"] >= 1


@pytest.fixture(scope="module")
def demo_captions(tmp_path_factory):
    """The demo set with its captions, 32 px: 48 images in class subfolders, x.png + x.txt."""
    folder = str(tmp_path_factory.mktemp("t2i") / "demo")
    DemoShapes(48, 32, num_classes=4).save(folder)
    return folder


def test_caption_folder_and_missing_caption(demo_captions, tmp_path):
    folder = tmp_path / "folder"
    DemoShapes(6, 32, num_classes=2).save(str(folder))
    txts = sorted(folder.rglob("*.txt"))
    assert len(txts) == 6 and "background" in txts[0].read_text()
    txts[0].unlink()
    batches = take(CaptionStream(str(folder), 5, buckets(32, 16)), 1)
    assert len(batches[0]["captions"]) == 5 and batches[0]["skipped"] == 1
    assert all(c.startswith("a ") for c in batches[0]["captions"])
    write_tar(tmp_path / "one.tar", [("a", {".jpg": jpeg(32, 32), ".txt": b"x"})])
    with pytest.raises(UserError, match="1 shard.* for 1 rank.* x 2 loader worker"):
        CaptionStream(str(tmp_path / "one.tar"), 5, buckets(32, 16), num_workers=2)
    with pytest.raises(UserError, match="does not exist"):
        CaptionStream(str(tmp_path / "nothing"), 5, buckets(32, 16))


@pytest.fixture(scope="module")
def mixed_captions(tmp_path_factory):
    """30 captioned images of three aspect ratios (so three buckets at 64 px: 48x80, 64x64, 80x48),
    one of them a JPEG cut short whose header still reads (it must be skipped on resume as the first
    time)."""
    folder = tmp_path_factory.mktemp("mixed")
    shapes = [(64, 64), (40, 70), (70, 40)]
    for i in range(30):
        h, w = shapes[i % 3]
        data = jpeg(h, w, colour=(8 * i, 100, 255 - 8 * i))
        (folder / f"{i:02d}.jpg").write_bytes(data[: len(data) // 2] if i == 7 else data)
        (folder / f"{i:02d}.txt").write_text(f"image {i}")
    return str(folder)


def batches_of(path, workers, rank=0, world=1, state=None, batch_size=2):
    stream = CaptionStream(path, batch_size, buckets(64, 16), rank, world, seed=3,
                           num_workers=workers)
    b = CaptionBatches(stream, workers)
    if state is not None:
        b.load_state_dict(state)
    return b


@pytest.mark.parametrize("workers", [0, 2])
def test_caption_batches_resume_exactly(mixed_captions, workers):
    """From several points: with part-filled buckets, before and after the truncated image, past an
    epoch."""
    for stop in (1, 2, 3, 5, 8, 9, 16):
        first = batches_of(mixed_captions, workers)
        it = iter(first)
        got = [next(it) for _ in range(stop)]
        state = first.state_dict()
        expected = [next(it) for _ in range(6)]
        again = iter(batches_of(mixed_captions, workers, state=state))
        for (img_a, cap_a), (img_b, cap_b) in zip(expected, (next(again) for _ in range(6))):
            assert cap_a == cap_b and torch.equal(img_a, img_b), stop
    shapes = {tuple(images.shape[2:]) for images, _ in got + expected}
    assert shapes == {(48, 80), (64, 64), (80, 48)}
    # Every usable image comes once per epoch (29: one is truncated), buckets' leftovers dropped.
    seen = [c for _, caps in take(batches_of(mixed_captions, 0), 14) for c in caps]
    assert len(set(seen)) == len(seen) == 28 and "image 7" not in seen


def test_every_rank_resumes_from_its_own_position(tmp_path):
    """Ranks' epochs differ in length (uneven shards), so their positions differ: each resumes from
    its own."""
    for n, shard in zip((6, 14, 30), "abc"):
        samples = [(f"{shard}{i:02d}", {".jpg": jpeg(64, 64), ".txt": f"{shard} {i}".encode()})
                   for i in range(n)]
        write_tar(tmp_path / f"{shard}.tar", samples)
    ranks = [batches_of(str(tmp_path), 0, rank, 2) for rank in (0, 1)]
    its = [iter(b) for b in ranks]
    for _ in range(12):  # past the end of an epoch on one rank, not on the other
        for it in its:
            next(it)
    mine = [b.state_dict()["ranks"][0] for b in ranks]  # what all_gather_object collects under DDP
    assert mine[0]["position"] != mine[1]["position"]
    state = {"ranks": mine, "num_workers": 0}
    for rank, it in enumerate(its):
        expected = [next(it)[1] for _ in range(5)]
        again = iter(batches_of(str(tmp_path), 0, rank, 2, state=state))
        assert [next(again)[1] for _ in range(5)] == expected


def test_a_worker_that_can_never_fill_a_batch_is_an_error(mixed_captions):
    with pytest.raises(UserError, match="made no batch of 16 from a whole epoch"):
        take(CaptionStream(mixed_captions, 16, buckets(64, 16)), 1)


# --------------------------------------------------------------------------------------------------
# The model


def tiny_t2i(patch=1, **kw):
    return t2i.build_t2i(f"T2I-tiny/{patch}", in_channels=4, text_dim=16, **kw)


def text_batch(B=2, L=6, valid=(4, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(B, L, 16, generator=g)
    mask = torch.arange(L)[None, :] < torch.tensor(valid)[:, None]
    return states, mask


@pytest.mark.parametrize("patch,H,W", [(1, 3, 5), (2, 6, 10), (1, 4, 4)])
def test_shapes_on_non_square_grids_and_zero_init(patch, H, W):
    model = tiny_t2i(patch)
    x, t = torch.randn(2, 4, H, W), torch.rand(2)
    # AdaLN-Zero: the initial model says 0
    assert torch.equal(model(x, t, text_batch()), torch.zeros(2, 4, H, W))
    out = randomize_(model)(x, t, text_batch())
    assert out.shape == (2, 4, H, W) and out.abs().mean() > 0.01


def test_padding_is_ignored_and_the_caption_matters():
    model = randomize_(tiny_t2i()).eval()
    x, t = torch.randn(2, 4, 3, 5), torch.rand(2)
    states, mask = text_batch()
    out = model(x, t, (states, mask))
    longer = (torch.cat([states, torch.randn(2, 3, 16)], 1),
              torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], 1))
    assert torch.allclose(model(x, t, longer), out, atol=1e-5)  # more padding: the same
    noise = states.clone()
    noise[0, 5] += 3.0  # a padded position of caption 0 (4 valid tokens)
    assert torch.allclose(model(x, t, (noise, mask)), out, atol=1e-5)
    noise[0, 1] += 3.0  # a real token
    changed = model(x, t, (noise, mask))
    assert not torch.allclose(changed[0], out[0], atol=1e-3)
    assert torch.allclose(changed[1], out[1], atol=1e-5)


def test_image_tokens_know_their_2d_position():
    """RoPE on a non-square grid: transposing the input must not simply transpose the output."""
    model = randomize_(tiny_t2i()).eval()
    x = torch.randn(1, 4, 4, 4)
    text = text_batch(B=1, valid=(6,))
    assert not torch.allclose(model(x.transpose(2, 3), torch.rand(1), text),
                              model(x, torch.rand(1), text).transpose(2, 3), atol=1e-3)


def test_2b_config_size_and_flops():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        big = t2i.build_t2i("T2I-2B/1", in_channels=32, text_dim=4096)
    assert 1.9e9 < sum(p.numel() for p in big.parameters()) < 2.3e9
    # GPU kernels want aligned rows (efficient SDPA fails on a misaligned v slice of linear1)
    for name in ("T2I-S/1", "T2I-B/1", "T2I-L/1", "T2I-2B/1"):
        with torch.device("meta"):
            m = t2i.build_t2i(name, in_channels=32, text_dim=4096)
        assert m.hidden_size // m.num_heads == 64, name
        assert m.single_blocks[0].linear1.out_features % 64 == 0, name
        assert m.double_blocks[0].img.mlp.w3.in_features % 64 == 0, name
    model, B, (h, w), L = randomize_(tiny_t2i(2)), 3, (6, 10), 6
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(B, 4, h, w), torch.rand(B), text_batch(B, L, (2, 4, 6)))
    assert counter.get_total_flops() == B * common.forward_flops(model, h * w // 4, L)


# --------------------------------------------------------------------------------------------------
# Text encoder and CLIP score


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return save_random_text_encoder(str(tmp_path_factory.mktemp("t5") / "t5"), dim=32, layers=1)


def test_text_encoder_pads_masks_and_warns_when_it_cuts(t5):
    enc = TextEncoder(t5, max_length=16)
    states, mask = enc(["a red disc", "", "blue"])
    assert states.shape == (3, 16, 32) and enc.dim == 32
    assert mask.sum(1).tolist() == [11, 1, 5]  # ByT5: one token per byte, + </s>
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc(["x" * 40])  # training: cut silently
    with pytest.warns(UserWarning, match="longer than the text encoder's 16 tokens"):
        long_states, long_mask = enc(["x" * 40], warn=True)
    assert long_mask.all()
    a, _ = enc(["a red disc"])
    assert torch.allclose(a, states[:1], atol=1e-5)  # padding does not change real tokens' states


def test_unknown_text_encoder_offline_names_the_folder_option():
    proc = run_script(["-c", "import text; text.TextEncoder('nobody/no-such-encoder')"],
                      env={"HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode != 0
    assert "could not load the text encoder 'nobody/no-such-encoder'" in proc.stderr
    assert "save_pretrained(folder)" in proc.stderr and "pass that folder" in proc.stderr


def test_clip_score_is_the_clamped_cosine_of_clips_embeddings(tmp_path):
    import transformers

    name = save_random_clip(str(tmp_path / "clip"), image_size=32)
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    prompts = ["a red disc", "a ring", "blue", "yellow square on the left", "a"]
    model = transformers.CLIPModel.from_pretrained(name)
    tok = transformers.AutoTokenizer.from_pretrained(name)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():  # at CLIP's own size: no resize; features through the other entry points
        pixels = (torch.from_numpy(images).permute(0, 3, 1, 2) / 255 - mean) / std
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(**tok(prompts, padding=True, return_tensors="pt"))
    img, txt = (getattr(v, "pooler_output", v) for v in (img, txt))
    cosine = (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
    expected = 100 * cosine.clamp(min=0).mean()
    score = clip_score(images, prompts, name, batch_size=2)
    assert score == pytest.approx(expected.item(), abs=1e-4)
    # CLIP preprocessing scores a non-square image by its centre (short side resized, then cropped).
    wide = np.random.default_rng(1).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    score = clip_score(wide, prompts[:2], name)
    assert score == pytest.approx(clip_score(wide[:, :, 8:40], prompts[:2], name), abs=1e-4)
    # sample_t2i.py --score: the CLIP score of an .npz whose arr_1 holds each sample's prompt line.
    (tmp_path / "prompts.txt").write_text("\n".join(prompts[::-1]) + "\n")
    np.savez(tmp_path / "s.npz", arr_0=images, arr_1=np.arange(5)[::-1])
    score = ["--score", str(tmp_path / "s.npz"), "--clip_model", name,
             "--prompts", str(tmp_path / "prompts.txt"), "--device", "cpu"]
    assert sample_t2i.main(score)["clip_score"] == pytest.approx(expected.item(), abs=1e-4)
    np.savez(tmp_path / "s.npz", arr_0=images, arr_1=np.arange(5) + 3)
    with pytest.raises(UserError, match=r"from 0 to 4 \(lines of .*prompts.txt.* from 3 to 7"):
        sample_t2i.main(score)


# --------------------------------------------------------------------------------------------------
# Training and sampling


def t2i_args(data, t5, run_dir, *extra):
    return ["--captions", data, "--text_encoder", t5, "--max_length", "48", "--model", "T2I-tiny/1",
            "--batch_size", "8", "--lr", "1e-3", "--stats_samples", "16", "--num_workers", "0",
            "--device", "cpu", "--log_every", "1", "--run_dir", str(run_dir), *map(str, extra)]


@pytest.fixture(scope="module")
def t2i_run(demo_captions, t5, tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i_run")
    tok = str(root / "tokenizer.pt")
    save_tokenizer(tok)
    run = root / "run"
    train_t2i.main(t2i_args(demo_captions, t5, run, "--tokenizer", tok, "--steps", 6,
                            "--grid_every", 3))
    return tok, run


def test_train_t2i_writes_a_complete_run(t2i_run):
    tok, run = t2i_run
    assert [r["step"] for r in read_log(str(run / "log.jsonl"))] == list(range(1, 7))
    assert (run / "samples_0000003.png").exists() and (run / "samples_0000006.png").exists()
    ckpt = load_checkpoint(str(run / "ckpt.pt"))
    assert ckpt["kind"] == "t2i" and ckpt["step"] == 6
    assert ckpt["latent_factor"] == 16 and ckpt["max_length"] == 48
    assert [tuple(b) for b in ckpt["buckets"]] == [(32, 32)]
    assert ckpt["latent_stats"]["mean"].shape == (32,) and len(ckpt["latent_stats"]["prompts"]) == 8
    model, meta = sample.load_dit(str(run / "ckpt.pt"), kind="t2i", build=t2i.build_t2i)
    assert isinstance(model, t2i.TextToImageDiT) and meta["model_args"]["text_dim"] == 32


def test_train_t2i_resume_equals_uninterrupted_run(t2i_run, demo_captions, t5, tmp_path):
    tok, a = t2i_run
    b = tmp_path / "b"
    train_t2i.main(t2i_args(demo_captions, t5, b, "--tokenizer", tok, "--steps", 4,
                            "--grid_every", 3))
    train_t2i.main(t2i_args(demo_captions, t5, b, "--tokenizer", tok, "--steps", 6,
                            "--grid_every", 3, "--resume"))
    loss_a, loss_b = ([r["loss"] for r in read_log(str(d / "log.jsonl"))] for d in (a, b))
    assert loss_a == loss_b
    ca, cb = (load_checkpoint(str(d / "ckpt.pt")) for d in (a, b))
    for part in ("model", "ema"):
        assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part])


def test_two_process_gloo_t2i_training_and_resume(t2i_run, demo_captions, t5, tmp_path):
    tok, _ = t2i_run
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--tokenizer", tok, "--grid_every", 0]
    run_torchrun(["train_t2i.py", *t2i_args(demo_captions, t5, a, *args, "--steps", 4)])
    run_torchrun(["train_t2i.py", *t2i_args(demo_captions, t5, b, *args, "--steps", 2)])
    run_torchrun(["train_t2i.py", *t2i_args(demo_captions, t5, b, *args, "--steps", 4, "--resume")])
    assert [r["step"] for r in read_log(str(a / "log.jsonl"))] == [1, 2, 3, 4]
    loss_a, loss_b = ([r["loss"] for r in read_log(str(d / "log.jsonl"))] for d in (a, b))
    assert loss_a == loss_b
    assert len(load_checkpoint(str(b / "ckpt.pt"))["data"]["ranks"]) == 2


def test_sample_prompts_sizes_npz_clip_score_and_bad_input(t2i_run, tmp_path, capsys):
    tok, run = t2i_run
    ckpt = str(run / "ckpt.pt")
    base = ["--ckpt", ckpt, "--device", "cpu", "--steps", "3", "--cfg", "4"]
    grid = sample_t2i.main([*base, "--prompt", "a red disc in the centre", "--num_samples", "3",
                            "--out", str(tmp_path)])
    assert Image.open(grid).size == (3 * 66 - 2, 64)
    (tmp_path / "prompts.txt").write_text("a red disc\n\na blue ring on the left\n")
    npz = sample_t2i.main([*base, "--prompts", str(tmp_path / "prompts.txt"), "--npz",
                           "--num_samples", "5", "--out", str(tmp_path / "npz")])
    with np.load(npz) as data:
        assert data["arr_0"].shape == (5, 32, 32, 3) and data["arr_1"].tolist() == [0, 1, 0, 1, 0]
    # The CLIP score of the samples just drawn (read back, not drawn again), beside them.
    clip = save_random_clip(str(tmp_path / "clip"), image_size=32)
    result = sample_t2i.main([*base, "--prompts", str(tmp_path / "prompts.txt"), "--npz",
                              "--num_samples", "5", "--out", str(tmp_path / "npz"),
                              "--clip_model", clip])
    with np.load(npz) as data:
        prompts = ["a red disc", "a blue ring on the left"]
        expected = clip_score(data["arr_0"], [prompts[i] for i in data["arr_1"]], clip)
    assert result["clip_score"] == pytest.approx(expected, abs=1e-4)
    assert json.load(open(tmp_path / "npz" / "clip_score.json")) == result
    (tmp_path / "prompts.txt").write_text("a red disc\na green ring on the left\n")
    with pytest.raises(UserError, match="holds samples made with other settings.*'prompts'"):
        sample_t2i.main([*base, "--prompts", str(tmp_path / "prompts.txt"), "--npz",
                         "--num_samples", "5", "--out", str(tmp_path / "npz")])
    with pytest.raises(UserError, match="--size 64x64 is not one of the buckets: 32x32"):
        sample_t2i.main([*base, "--prompt", "x", "--size", "64x64"])
    with pytest.raises(SystemExit):
        sample_t2i.main([*base, "--out", str(tmp_path)])
    assert "one of the arguments --prompt --prompts is required" in capsys.readouterr().err
    with pytest.raises(UserError, match="holds no prompts"):
        (tmp_path / "empty.txt").write_text("\n \n")
        sample_t2i.main([*base, "--prompts", str(tmp_path / "empty.txt")])
    with pytest.raises(UserError, match="is a text-to-image checkpoint: use sample_t2i.py"):
        sample.main(["--ckpt", ckpt, "--device", "cpu"])


# --------------------------------------------------------------------------------------------------
# The prompt conditions the samples


class PoolTokenizer(nn.Module):
    """A stand-in tokenizer that keeps colour and layout where the tests can see them: 8x8 average
    pooling (32 px -> 3x4x4 latents), decoded by repeating each cell."""

    config = {"image_size": 32}
    latent_shape = (3, 4, 4)

    def encode(self, x):
        return F.avg_pool2d(x, 8)

    def decode(self, z):
        return F.interpolate(z, scale_factor=8, mode="nearest")

    def decoding_modules(self):
        return []


def test_prompts_that_differ_in_colour_give_samples_of_that_colour(t5, tmp_path, monkeypatch):
    data = str(tmp_path / "demo")
    DemoShapes(256, 32, num_classes=4).save(data)
    for module in (train_t2i, sample):
        monkeypatch.setattr(module, "load_tokenizer", lambda path, size=None: PoolTokenizer())
    train_t2i.main(t2i_args(data, t5, tmp_path / "run", "--tokenizer", "pool", "--steps", 300,
                            "--batch_size", 32, "--ema_decay", 0.99, "--log_every", 50,
                            "--grid_every", 0, "--stats_samples", 256))
    mean = {}
    for colour in ("red", "green", "blue", "yellow"):
        (tmp_path / "p.txt").write_text(f"a {colour} disc in the centre, light background\n")
        npz = sample_t2i.main(["--ckpt", str(tmp_path / "run" / "ckpt.pt"),
                           "--prompts", str(tmp_path / "p.txt"), "--npz", "--num_samples", "8",
                           "--steps", "20", "--cfg", "4", "--device", "cpu",
                           "--out", str(tmp_path / colour)])
        with np.load(npz) as d:
            mean[colour] = d["arr_0"].reshape(-1, 3).astype(float).mean(0)  # (R, G, B)
    r, g, b = 0, 1, 2
    assert mean["red"][r] - mean["red"][b] > 10 and mean["blue"][b] - mean["blue"][r] > 10, mean
    assert mean["red"][r] > mean["blue"][r] + 10 and mean["blue"][b] > mean["red"][b] + 10, mean
    assert mean["green"][g] > max(mean["green"][r], mean["green"][b]) + 10, mean
    assert min(mean["yellow"][r], mean["yellow"][g]) > mean["yellow"][b] + 20, mean


# --------------------------------------------------------------------------------------------------
# Sharded training (--fsdp, fsdp.py) and gradient accumulation

FSDP_TOLERANCE = 1e-5  # |loss difference| per step, float32 (README: sharded training)


def dcp_tensors(folder):
    """Every tensor of a sharded checkpoint (model, EMA, optimiser), whole, read in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = f"{folder}.whole.pt"
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


def losses(run_dir):
    return np.array([r["loss"] for r in read_log(str(run_dir / "log.jsonl"))])


def test_fsdp_and_hsdp_match_ddp_reshard_exactly_and_export_samples(t2i_run, demo_captions, t5,
                                                                    tmp_path):
    """2 gloo ranks, 2 micro-batches of 2 per rank and step: FSDP (with gradient checkpointing, and
    the sample grid drawn by both ranks) gives DDP's losses within FSDP_TOLERANCE over 20 steps, its
    export.pt DDP's EMA weights, and sample_t2i.py draws from it. Its checkpoint of step 10 resumed
    as HSDP (two single-process "nodes": a 2-D mesh, replicated across them) gives DDP's steps
    11-20; resumed on 4 ranks, it is saved again bit for bit (model, EMA, AdamW moments and steps,
    ranks 0-1's RNG), ranks 2-3 with new RNG streams (common.set_rng_states)."""
    tok, _ = t2i_run
    ddp, fsdp, hsdp, four = (tmp_path / d for d in ("ddp", "fsdp", "hsdp", "four"))
    args = ["--tokenizer", tok, "--steps", 20, "--micro_batch", 2, "--ckpt_every", 10,
            "--keep_every", 10, "--grad_checkpointing"]
    run_torchrun(["train_t2i.py", *t2i_args(demo_captions, t5, ddp, *args, "--grid_every", 0)])
    run_torchrun(["train_t2i.py", *t2i_args(demo_captions, t5, fsdp, *args, "--grid_every", 20,
                                            "--fsdp")])
    assert len(losses(fsdp)) == 20
    assert np.abs(losses(ddp) - losses(fsdp)).max() <= FSDP_TOLERANCE, (losses(ddp), losses(fsdp))
    assert (fsdp / "samples_0000020.png").exists()
    exported = load_checkpoint(str(fsdp / "export.pt"))
    reference = load_checkpoint(str(ddp / "ckpt.pt"))
    assert exported["step"] == 20 and exported["kind"] == "t2i" and "opt" not in exported
    for k, v in reference["ema"].items():
        assert torch.allclose(exported["ema"][k], v, rtol=0, atol=FSDP_TOLERANCE), k
    assert torch.equal(exported["latent_stats"]["mean"], reference["latent_stats"]["mean"])
    train_t2i.main(["--export", "--run_dir", str(fsdp)])  # again from the checkpoint: the same
    assert_same(exported["ema"], load_checkpoint(str(fsdp / "export.pt"))["ema"])
    grid = sample_t2i.main(["--ckpt", str(fsdp / "export.pt"), "--device", "cpu", "--steps", "3",
                            "--prompt", "a red disc", "--num_samples", "2", "--out", str(tmp_path)])
    assert Image.open(grid).size == (2 * 66 - 2, 64)
    with pytest.raises(UserError, match=f"sample from {fsdp}/export.pt, which `python "
                                        f"train_t2i.py --export {fsdp}/ckpt` writes"):
        sample_t2i.main(["--ckpt", str(fsdp / "ckpt"), "--device", "cpu", "--prompt", "x"])
    saved = fsdp / "ckpt_0000010"
    for d in (hsdp, four):
        shutil.copytree(saved, d / "ckpt")
    run_torchrun(["train_t2i.py", *t2i_args(demo_captions, t5, hsdp, *args, "--grid_every", 0,
                                            "--fsdp", "hybrid", "--resume")], nproc=1, nodes=2)
    assert np.abs(losses(ddp)[10:] - losses(hsdp)).max() <= FSDP_TOLERANCE
    run_torchrun(["tests/fsdp_resave.py", *t2i_args(demo_captions, t5, four, *args, "--fsdp",
                                                    "--resume", "--steps", 10)], nproc=4)
    assert_same(dcp_tensors(saved), dcp_tensors(four / "ckpt_0000010"))
    before, after = (fsdp_train_state(d) for d in (saved, four / "ckpt_0000010"))
    assert len(before["rng"]) == 2 and len(after["rng"]) == 4 and before["args"]["fsdp"] == "shard"
    assert_same(after["rng"][:2], before["rng"])
    assert len(after["data"]["ranks"]) == 4 and after["step"] == 10


def fsdp_train_state(folder):
    import fsdp

    return fsdp.train_state(str(folder))


KILL_IN_SAVE = """
import os, signal, sys
import fsdp, train_t2i
where = sys.argv.pop(1)
real_save, real_rename = fsdp.save_checkpoint, os.rename
def save(obj, path):  # train_state.pt of step 4, after its shards
    if where == "while writing" and obj["step"] == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, path)
def rename(src, dst):
    if (where == "between the renames" and str(src).endswith("ckpt.tmp")  # ckpt.tmp -> ckpt
            and os.path.isdir(f"{dst}.old") or  # after ckpt -> ckpt.old
            where == "at the kept copy" and str(dst).endswith("ckpt_0000004")):
        os.kill(os.getpid(), signal.SIGKILL)
    real_rename(src, dst)
fsdp.save_checkpoint, os.rename = save, rename
train_t2i.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def fsdp_run(t2i_run, demo_captions, t5, tmp_path_factory):
    """--fsdp in one process (a process group of one): 6 steps, saved every 2, kept every 4."""
    run = tmp_path_factory.mktemp("fsdp") / "run"
    args = t2i_args(demo_captions, t5, run, "--tokenizer", t2i_run[0], "--fsdp", "--steps", 6,
                    "--ckpt_every", 2, "--keep_every", 4, "--grid_every", 0)
    train_t2i.main(args)
    return run, args


def elsewhere(args, run_dir):
    i = args.index("--run_dir")
    return [*args[:i + 1], str(run_dir), *args[i + 2:]]


def test_fsdp_save_killed_anywhere_resumes_exactly(fsdp_run, tmp_path):
    """Killed while it writes step 4, between its two renames, or as its kept copy is put in place:
    each time the run resumes from step 2, and then gives the uninterrupted run's losses exactly."""
    a, args = fsdp_run
    b = tmp_path / "b"
    args = elsewhere(args, b)
    for where, left in (("while writing", "ckpt.tmp"), ("between the renames", "ckpt.old"),
                        ("at the kept copy", "ckpt_0000004.tmp")):
        proc = run_script(["-c", KILL_IN_SAVE, where, *args, *(["--resume"] if b.exists() else [])])
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        assert left in os.listdir(b), (where, os.listdir(b))
    train_t2i.main([*args, "--resume"])
    assert sorted(os.listdir(b / "ckpt")) == [".metadata", "__0_0.distcp", "train_state.pt"]
    assert list(losses(a)) == list(losses(b))
    assert (b / "log.jsonl").read_text().count('"event": "resume", "step": 2,') == 3
    assert fsdp_train_state(b / "ckpt_0000004")["step"] == 4
    assert_same(*(load_checkpoint(str(d / "export.pt"))["ema"] for d in (a, b)))


def test_fsdp_export_only_reads_and_bad_inputs(fsdp_run, t2i_run, tmp_path):
    run, args = fsdp_run
    a = tmp_path / "a"
    shutil.copytree(run, a)
    shutil.copytree(a / "ckpt", a / "ckpt.tmp")  # a save in flight: not --export's to delete
    train_t2i.main(["--export", "--run_dir", str(a)])
    assert (a / "ckpt.tmp" / "train_state.pt").exists()
    assert load_checkpoint(str(a / "export.pt"))["step"] == 6
    path = train_t2i.main(["--export", str(a / "ckpt_0000004")])
    assert path == str(a / "export_0000004.pt")
    model, meta = sample.load_dit(path, kind="t2i", build=t2i.build_t2i)
    assert meta["step"] == 4 and isinstance(model, t2i.TextToImageDiT)
    ddp = t2i_run[1]
    no_fsdp = [x for x in args if x != "--fsdp"]
    with pytest.raises(UserError, match=r"ckpt.pt is a single-file \(DDP\) checkpoint: resume "
                                        "without --fsdp"):
        train_t2i.main([*elsewhere(args, ddp), "--resume"])
    with pytest.raises(UserError, match=r"run/ckpt is a sharded \(--fsdp\) checkpoint: resume "
                                        "with --fsdp"):
        train_t2i.main([*no_fsdp, "--resume"])
    with pytest.raises(UserError, match="run/ckpt exists: pass --resume"):
        train_t2i.main(args)
    sharded = f"{run}/ckpt is \\(part of\\) a sharded training checkpoint, not a .* file"
    with pytest.raises(UserError, match=sharded):  # e.g. train_tokenizer.py --init
        load_tokenizer(str(run / "ckpt"))
    with pytest.raises(UserError, match=r"no sharded \(--fsdp\) checkpoint .*/run/ckpt to export"):
        train_t2i.main(["--export", "--run_dir", str(ddp)])


@pytest.mark.parametrize("damage", ["shard deleted", "shard truncated", "no .metadata", "empty"])
def test_fsdp_damaged_checkpoint_is_one_line_naming_the_kept_copy(fsdp_run, tmp_path, damage):
    run, args = fsdp_run
    shutil.copytree(run, tmp_path / "run")
    args = elsewhere(args, tmp_path / "run")
    ckpt = tmp_path / "run" / "ckpt"
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
                           f"incomplete .*the last kept copy is {ckpt}_0000004"):
            train_t2i.main(argv)
