"""Bad input never gives a wrong result: the probes of a demanding user, one test per
defect, on tiny random models. A wrong result, a lost file or a run that cannot resume is a
UserError instead (one line naming the file or flag, and the fix), or a warning where the input
can still be used."""

import argparse
import gzip
import io
import json
import os
import shutil
import tarfile
import warnings

import numpy as np
import pytest
import torch
from conftest import save_random_clip, save_tokenizer
from PIL import Image

import captions
import sample
import sample_t2i
import train_dit
import train_t2i
import train_tokenizer
from baselines import load_diffusers_vae
from captions import CaptionStream, buckets, list_shards, read_shard
from common import DistEnv, Logger, UserError, load_checkpoint, read_log, save_checkpoint
from dit import build_dit
from t2i import build_t2i
from text import TextEncoder, clip_score, clip_score_npz, read_prompts, save_random_text_encoder
from train_dit import LatentDataset

CPU = DistEnv(0, 0, 1, torch.device("cpu"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny T5 encoder (32-d, ByT5 tokenizer), CLIP and diffusers VAE, saved as folders."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, layers_per_block=1,
                  norm_num_groups=4).save_pretrained(root / "vae")
    return {"t5": save_random_text_encoder(str(root / "t5"), dim=32, layers=1),
            "clip": save_random_clip(str(root / "clip")), "vae": str(root / "vae"), "root": root}


def copy_without(folder, dest, *names, add=None):
    shutil.copytree(folder, dest)
    for name in names:
        os.remove(os.path.join(dest, name))
    for name, obj in (add or {}).items():
        torch.save(obj, os.path.join(dest, name))
    return str(dest)


def jpeg(h=64, w=64):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def caption_folder(folder, n, captioned=None):
    """n 64x64 JPEGs, the first `captioned` (default all) with a .txt caption."""
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        (folder / f"{i:02d}.jpg").write_bytes(jpeg())
        if captioned is None or i < captioned:
            (folder / f"{i:02d}.txt").write_text(f"image {i}")
    return str(folder)


def tar_bytes(samples):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# 1-5: wrong results or lost files


def test_a_text_encoder_folder_without_its_tokenizer_is_refused(models, tmp_path):
    """transformers built an empty vocabulary: captions of a length gave the same text states."""
    folder = copy_without(models["t5"], tmp_path / "t5", "tokenizer_config.json",
                          "added_tokens.json")
    with pytest.raises(UserError, match="maps different words to the same tokens.*tokenizer"):
        TextEncoder(folder, max_length=8)


def test_clip_score_refuses_a_folder_that_is_not_a_clip_model(models):
    """A T5 folder as CLIP gave a "CLIP score" of randomly initialised weights."""
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(UserError, match="is not a complete CLIP model: .* weights are not in its"):
        clip_score(images, ["a", "b"], models["t5"])


def test_a_diffusers_vae_with_missing_weights_is_refused(models, tmp_path):
    from safetensors.torch import load_file

    weights = load_file(os.path.join(models["vae"], "diffusion_pytorch_model.safetensors"))
    half = dict(list(weights.items())[: len(weights) // 2])
    folder = copy_without(models["vae"], tmp_path / "vae", "diffusion_pytorch_model.safetensors",
                          add={"diffusion_pytorch_model.bin": half})
    with pytest.raises(UserError, match="is not a complete diffusers VAE"):
        load_diffusers_vae(folder, 32)


@pytest.mark.parametrize("parse,flag,value", [
    (train_dit.parse_args, "--ema_decay", "2"), (train_dit.parse_args, "--ema_decay", "1"),
    (train_dit.parse_args, "--lr", "nan"), (train_dit.parse_args, "--lr", "-1e-4"),
    (train_dit.parse_args, "--betas", "1.5"), (train_dit.parse_args, "--grad_clip", "-1"),
    (train_dit.parse_args, "--seed", "-1"), (train_dit.parse_args, "--grid_cfg", "inf"),
    (train_t2i.parse_args, "--caption_dropout", "1.5"),
    (train_t2i.parse_args, "--weight_decay", "-0.1"),
    (train_tokenizer.parse_args, "--disc_weight", "-1"),
    (train_tokenizer.parse_args, "--decoder_ch_mult", "1,0"),
    (sample.parse_args, "--cfg", "nan"), (sample.parse_args, "--cfg_interval_start", "1.5"),
])
def test_numeric_flags_out_of_range_are_refused_when_parsing(parse, flag, value, capsys):
    """--ema_decay 2 made every EMA tensor NaN/inf, saved, and sampled as garbage with exit 0."""
    fixed = {train_t2i.parse_args: ["--captions", "x"],
             train_tokenizer.parse_args: ["--stage", "1"]}.get(parse, [])
    with pytest.raises(SystemExit) as e:
        parse([*fixed, f"{flag}={value}"] if flag != "--betas" else [*fixed, flag, value, "0.9"])
    assert e.value.code == 2 and f"argument {flag}: must be" in capsys.readouterr().err


def test_max_length_over_the_encoders_limit_is_refused_when_it_loads(models):
    """It tried to allocate 80 GB after the statistics pass."""
    with pytest.raises(UserError, match="--max_length 100000 is more than the 512 tokens"):
        TextEncoder(models["t5"], max_length=100_000)
    with pytest.raises(UserError, match="--max_length 65 is more than the 64 tokens"):
        TextEncoder(models["clip"], max_length=65)  # CLIP's position table


def test_a_truncated_last_log_line_is_read_past_and_cut_before_a_resume_appends(tmp_path):
    """A crash during an append made every later --resume die with a JSONDecodeError."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match="line 3 is damaged"):
        assert [r["step"] for r in read_log(str(log))] == [1, 2]
    with pytest.warns(UserWarning, match="cut short"):
        Logger(CPU, str(tmp_path)).log({"event": "resume", "step": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["step"] for r in read_log(str(log))] == [1, 2]
    assert json.loads(log.read_text().splitlines()[-1])["event"] == "resume"


# --------------------------------------------------------------------------------------------------
# 6-10: one clear line instead of a traceback


def test_a_full_disk_during_a_checkpoint_save_is_one_message(tmp_path, monkeypatch):
    target = str(tmp_path / "ckpt.pt")
    save_checkpoint({"step": 1}, target)

    def full_disk(obj, f):
        f.write(b"PK half a zip")
        raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed "
                           "writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match="could not write .*ckpt.pt .*write failed.*disk full"):
        save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert load_checkpoint(target)["step"] == 1


def test_a_prompt_file_that_is_not_utf8_is_one_message(tmp_path):
    (tmp_path / "p.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(UserError, match="prompt file .*p.txt .*'utf-8' codec can't decode"):
        read_prompts(str(tmp_path / "p.txt"))


def test_a_byte_order_mark_stays_out_of_the_first_prompt(tmp_path):
    """Windows editors begin UTF-8 files with a BOM: it stayed in the first prompt."""
    (tmp_path / "p.txt").write_bytes("\ufeffa red disc\nblue\n".encode())
    assert read_prompts(str(tmp_path / "p.txt")) == ["a red disc", "blue"]


def test_a_byte_order_mark_stays_out_of_a_caption(tmp_path):
    data = caption_folder(tmp_path / "data", 2)
    (tmp_path / "data" / "00.txt").write_bytes("\ufeffimage 0".encode())
    captions = [c for shard in list_shards(data) for _, _, c in read_shard(shard)]
    assert sorted(captions) == ["image 0", "image 1"]


def test_a_prompt_longer_than_the_encoder_is_cut_in_its_warning(models):
    with pytest.warns(UserWarning, match="longer than the text encoder's 8 tokens") as record:
        TextEncoder(models["t5"], max_length=8)(["a red disc " * 100], warn=True)
    assert len(str(record[0].message)) < 200


BAD_FOLDERS = [("text encoder", "objects.bin"), ("text encoder", "no such folder")] + [
    ("diffusers VAE", c) for c in ("objects.bin", "no weights", "bad config.json", "no such dir")]


@pytest.mark.parametrize("kind,case", BAD_FOLDERS)
def test_model_folders_that_load_badly_are_one_message_naming_the_path(models, tmp_path, kind,
                                                                        case):
    """(A text encoder folder without weights or with a bad config.json was one message already.)"""
    text_encoder = kind == "text encoder"
    src, weights, bin_name = (
        (models["t5"], "model.safetensors", "pytorch_model.bin") if text_encoder else
        (models["vae"], "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"))
    folder = str(tmp_path / "model")
    if case.startswith("no such"):
        folder = str(tmp_path / "no" / "such")
    else:
        add = {bin_name: {"x": torch.zeros(1), "y": [1, 2]}}
        copy_without(src, folder, weights, add=add if case == "objects.bin" else None)
    if case == "bad config.json":
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write('{"_class_name": "AutoencoderKL", ')
    with pytest.raises(UserError) as e:
        TextEncoder(folder, max_length=8) if text_encoder else load_diffusers_vae(folder, 32)
    message = str(e.value)
    assert folder in message and "\n" not in message and "Repo id" not in message
    if case.startswith("no such"):
        assert "does not exist" in message


def t2i_checkpoint(path, tokenizer, text_encoder, text_dim):
    """A text-to-image checkpoint as train_t2i.py writes one: a tiny model, 32-channel latents."""
    tok = save_tokenizer(tokenizer)
    args = dict(in_channels=32, text_dim=text_dim)
    model = build_t2i("T2I-tiny/1", **args)
    torch.save({"kind": "t2i", "model_name": "T2I-tiny/1", "model_args": args,
                "ema": model.state_dict(), "step": 1, "tokenizer": tokenizer,
                "tokenizer_config": tok.config, "latent_factor": 16, "buckets": [[32, 32]],
                "latent_stats": {"mean": torch.zeros(32), "std": torch.ones(32)},
                "text_encoder": text_encoder, "max_length": 16}, path)
    return str(path)


def test_sample_refuses_a_text_encoder_of_another_width_before_sampling(models, tmp_path):
    ckpt = t2i_checkpoint(tmp_path / "t2i.pt", str(tmp_path / "tok.pt"), models["t5"], text_dim=16)
    with pytest.raises(UserError, match="gives 32-d states, but the model in .* trained on 16-d"):
        sample_t2i.main(["--ckpt", ckpt, "--prompt", "x", "--device", "cpu", "--steps", "2",
                         "--out", str(tmp_path)])


@pytest.mark.parametrize("arr_1,match", [(np.arange(4.0), "not float64"),
                                         (np.arange(3), "4 integers"),
                                         (np.array([0, 1, -1, 2]), "integers from 0.* from -1")],
                         ids=["float", "short", "negative"])
def test_clip_score_refuses_a_bad_arr_1(models, tmp_path, arr_1, match):
    """A negative index silently scored an image against the last prompt."""
    (tmp_path / "p.txt").write_text("a\nb\nc\n")
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8), arr_1=arr_1)
    with pytest.raises(UserError, match=match):
        clip_score_npz(str(tmp_path / "s.npz"), str(tmp_path / "p.txt"), models["clip"], "cpu")


def class_checkpoint(tmp_path):
    tok = save_tokenizer(str(tmp_path / "tok.pt"))
    args = dict(input_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=4)
    torch.save({"kind": "dit", "model_name": "B/1", "model_args": args,
                "ema": build_dit("B/1", **args).state_dict(), "tokenizer": str(tmp_path / "tok.pt"),
                "tokenizer_config": tok.config,
                "latent_stats": {"mean": torch.zeros(32), "std": torch.ones(32)}},
               tmp_path / "dit.pt")
    return str(tmp_path / "dit.pt")


def test_a_damaged_shard_on_npz_resume_is_one_message(tmp_path):
    out = tmp_path / "npz"
    cli = ["--ckpt", class_checkpoint(tmp_path), "--device", "cpu", "--steps", "2", "--npz",
           "--num_samples", "2", "--shard_size", "1", "--out", str(out)]
    sample.main([*cli, "--keep_shards"])
    os.remove(out / "samples.npz")
    shard = out / "shards" / "shard_000001.npz"
    shard.write_bytes(shard.read_bytes()[:100])  # damaged on disk after it was written
    with pytest.raises(UserError, match="shard_000001.npz is damaged .*delete it"):
        sample.main(cli)


def test_an_object_array_in_latents_npy_is_one_message(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"num_latents": 2, "latent_shape": [4, 2, 2],
                                                    "num_classes": 1, "mean": [0.0] * 4,
                                                    "std": [1.0] * 4}))
    np.save(tmp_path / "latents.npy", np.array([{"a": 1}, None], dtype=object))
    np.save(tmp_path / "labels.npy", np.zeros(2, dtype=np.int64))
    with pytest.raises(UserError, match="could not read the latents .*Python objects.*--extract"):
        LatentDataset(str(tmp_path))[0]


# --------------------------------------------------------------------------------------------------
# 11-13: messages that mislead


class PoolTokenizer(torch.nn.Module):
    """A stand-in tokenizer: 16x16 average pooling of 64-px images (3 x 4 x 4 latents)."""

    config, latent_shape = {"image_size": 64}, (3, 4, 4)

    def encode(self, x):
        return torch.nn.functional.avg_pool2d(x, 16)


def test_latent_statistics_of_a_small_caption_set_use_the_training_batch(tmp_path):
    """Fewer than 16 usable samples were refused even with --batch_size 2 (16 was hard-coded)."""
    args = argparse.Namespace(captions=caption_folder(tmp_path / "data", 4), batch_size=2, seed=0,
                              stats_samples=4)
    stats = train_t2i.LatentStats()
    train_t2i.measure_latents(stats, args, CPU, PoolTokenizer(), buckets(64, 16), False)
    assert stats.mean.shape == (3,) and len(stats.prompts) == 4


def test_a_caption_set_that_makes_no_batch_says_what_it_found(tmp_path):
    data = caption_folder(tmp_path / "data", 4, captioned=0)
    with pytest.raises(UserError, match=r"hold 4 samples: 0 usable, 4 without a caption \(a"), \
            pytest.warns(UserWarning, match="without a caption"):
        next(iter(CaptionStream(data, 2, buckets(64, 16))))


def test_skipped_caption_samples_are_counted_once_and_named(tmp_path):
    """The end-of-run count took missing captions for unreadable images, counted a sample once per
    epoch, and pointed at warnings that were never given."""
    data = caption_folder(tmp_path / "data", 5, captioned=4)
    with pytest.warns(UserWarning, match="skipped the sample .*04.jpg: without a caption"):
        batches = [b for b, _ in zip(CaptionStream(data, 2, buckets(64, 16)), range(6))]  # 3 epochs
    assert {b["epoch"] for b in batches} == {0, 1, 2} and [b["skipped"] for b in batches] == [1] * 6


def test_captions_naming_a_file_that_is_not_a_shard_says_so(tmp_path):
    (tmp_path / "captions.txt").write_text("a caption")
    with pytest.raises(UserError, match="is a file but not a WebDataset shard"):
        list_shards(str(tmp_path / "captions.txt"))


@pytest.mark.parametrize("name", ["shard.tar.gz", "shard.tar"])
def test_a_gzipped_shard_is_read_whole(tmp_path, name):
    """A .tar.gz "did not exist"; a gzipped tar named .tar was reported as damaged."""
    (tmp_path / name).write_bytes(gzip.compress(tar_bytes([(f"k{i}", {".jpg": jpeg(), ".txt": b"x"})
                                                           for i in range(3)])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        samples = [s for shard in list_shards(str(tmp_path / name)) for s in read_shard(shard)]
    assert [key for key, _, _ in samples] == ["k0", "k1", "k2"]


def test_an_image_over_the_pixel_limit_is_skipped_with_a_message(tmp_path, monkeypatch):
    """A 70 KB PNG of 144 megapixels was decoded (1.6 GB); here the limit is lowered instead."""
    monkeypatch.setattr(captions, "MAX_PIXELS", 60 * 60)
    data = caption_folder(tmp_path / "data", 2)
    Image.new("RGB", (48, 48)).save(tmp_path / "data" / "small.png")
    (tmp_path / "data" / "small.txt").write_text("small")
    with pytest.warns(UserWarning, match="over 0.0036 megapixels"):
        with pytest.raises(UserError, match="1 usable, 2 over"):
            next(iter(CaptionStream(data, 2, buckets(64, 16))))


def test_a_batch_larger_than_the_data_is_refused_before_an_epoch_is_read(tmp_path):
    data = caption_folder(tmp_path / "data", 3)
    (tmp_path / "one.tar").write_bytes(tar_bytes([("a", {".jpg": jpeg(), ".txt": b"x"})]))
    for path in (data, str(tmp_path / "one.tar")):
        with pytest.raises(UserError, match="hold at most .* samples, .*a batch of 1000000"):
            CaptionStream(path, 1_000_000, buckets(64, 16))


def test_the_not_an_npz_message_gives_no_unsafe_advice(models, tmp_path):
    import pickle

    (tmp_path / "p.txt").write_text("a\n")
    (tmp_path / "s.npz").write_bytes(pickle.dumps({"arr_0": 1}))
    with pytest.raises(UserError, match="could not read .*s.npz") as e:
        clip_score_npz(str(tmp_path / "s.npz"), str(tmp_path / "p.txt"), models["clip"], "cpu")
    assert "allow_pickle" not in str(e.value)


def test_sample_looks_for_stage_3_only_beside_a_stage_2_tokenizer(tmp_path):
    tok = str(tmp_path / "tok" / "tokenizer.pt")  # not train_tokenizer.py's <run>/stage2/ layout
    for folder in ("tok", "stage3"):
        os.makedirs(tmp_path / folder)
    save_tokenizer(tok)
    state = torch.load(tok, weights_only=True)
    torch.save({**state, "init": tok}, tmp_path / "stage3" / "tokenizer.pt")
    assert sample.refined_tokenizer(tok) == tok


def test_a_bad_file_where_stage_3_would_be_does_not_block_sampling(tmp_path):
    tok = str(tmp_path / "run" / "stage2" / "tokenizer.pt")
    for stage in ("stage2", "stage3"):
        os.makedirs(tmp_path / "run" / stage)
    save_tokenizer(tok)
    (tmp_path / "run" / "stage3" / "tokenizer.pt").write_bytes(b"half a checkpoint")
    with pytest.warns(UserWarning, match="not a readable tokenizer checkpoint; decoding with"):
        assert sample.refined_tokenizer(tok) == tok
