"""The image pipeline: ADM crop, odd image modes, bad files, demo set, resumable batches, DDP
shards."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from common import DistEnv, UserError
from conftest import run_torchrun
from data import (Batches, DemoShapes, ImageFolder, build_dataset, center_crop_arr, count_skipped,
                  save_grid, to_rgb)

CPU1 = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def reference_adm_crop(img: Image.Image, size: int) -> np.ndarray:
    """The ADM crop written differently: count the halvings first, then crop with PIL."""
    w, h = img.size
    halvings = 0
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
        halvings += 1
    for _ in range(halvings):
        img = img.resize((img.size[0] // 2, img.size[1] // 2), Image.BOX)
    s = size / min(w, h)
    nw, nh = round(w * s), round(h * s)
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize("wh,size", [((500, 375), 256), ((1024, 4096), 256), ((97, 61), 64),
                                     ((64, 64), 64), ((640, 480), 32), ((33, 200), 32)])
def test_center_crop_matches_reference(wh, size):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(wh[1], wh[0], 3), dtype=np.uint8))
    out = center_crop_arr(img, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, reference_adm_crop(img, size))


def _write_odd_images(folder):
    """One file per awkward case; returns {file name: expected RGB of pixel (0, 0)}."""
    os.makedirs(folder, exist_ok=True)
    expected = {}
    Image.new("L", (40, 30), 77).save(os.path.join(folder, "gray.png"))
    expected["gray.png"] = (77, 77, 77)
    Image.new("CMYK", (40, 30), (0, 0, 0, 0)).save(os.path.join(folder, "cmyk.jpg"))
    expected["cmyk.jpg"] = (255, 255, 255)
    Image.new("RGBA", (40, 30), (10, 20, 30, 0)).save(os.path.join(folder, "rgba_transparent.png"))
    expected["rgba_transparent.png"] = (255, 255, 255)  # composited over white
    Image.new("RGBA", (40, 30), (10, 20, 30, 255)).save(os.path.join(folder, "rgba_opaque.png"))
    expected["rgba_opaque.png"] = (10, 20, 30)
    pal = Image.new("P", (40, 30), 3)
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    pal.save(os.path.join(folder, "palette.png"))
    expected["palette.png"] = (0, 0, 255)
    gray16 = Image.fromarray(np.full((30, 40), 65535, dtype=np.uint16))
    gray16.save(os.path.join(folder, "gray16.png"))
    expected["gray16.png"] = (255, 255, 255)
    Image.new("1", (40, 30), 1).save(os.path.join(folder, "bilevel.png"))
    expected["bilevel.png"] = (255, 255, 255)
    Image.new("RGB", (5, 3), (200, 100, 50)).save(os.path.join(folder, "tiny.bmp"))  # upsampled
    expected["tiny.bmp"] = (200, 100, 50)
    return expected


def test_odd_modes_become_rgb(tmp_path):
    expected = _write_odd_images(tmp_path)
    with open(tmp_path / "notes.txt", "w") as f:  # not an image: ignored
        f.write("hello")
    ds = ImageFolder(str(tmp_path), image_size=16)
    assert ds.classes is None and len(ds) == len(expected)
    for i, (path, label) in enumerate(ds.samples):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and y == -1
        assert tuple(x[:, 8, 8].tolist()) == expected[os.path.basename(path)], path


def test_16bit_gray_is_rescaled_not_clipped():
    img = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(img))[0, :, 0].tolist() == [0, 128, 255]


def test_truncated_jpeg_is_skipped_with_warning(tmp_path):
    for cls in ("a", "b"):
        os.makedirs(tmp_path / cls)
        for i in range(2):
            Image.new("RGB", (64, 64), (i * 50, 0, 0)).save(tmp_path / cls / f"{i}.jpg", quality=95)
    with open(tmp_path / "a" / "0.jpg", "rb") as f:
        data = f.read()
    with open(tmp_path / "a" / "0.jpg", "wb") as f:
        f.write(data[: len(data) // 2])  # truncated
    ds = ImageFolder(str(tmp_path), image_size=32)
    assert ds.classes == ["a", "b"] and [s[1] for s in ds.samples] == [0, 0, 1, 1]
    with pytest.warns(UserWarning, match=r"a/0\.jpg"):
        x, y = ds[0]
    assert x.shape == (3, 32, 32) and y == 0  # the next readable image stands in
    for i in range(len(ds)):  # a whole epoch runs through
        ds[i]
    assert ds.unreadable.tolist() == [True, False, False, False]
    # Worker processes over two epochs (fresh workers each time): still one warning and one count.
    loader = DataLoader(ds, batch_size=2, num_workers=2)
    for _ in range(2):
        assert sum(len(y) for _, y in loader) == 4
    assert count_skipped(ds, CPU1) == 1


def test_empty_class_folder_keeps_the_labels(tmp_path):
    for cls in ("a", "b", "c"):
        os.makedirs(tmp_path / cls)
    for cls in ("a", "c"):
        Image.new("RGB", (8, 8)).save(tmp_path / cls / "0.png")
    with pytest.warns(UserWarning, match=r"1 class folder\(s\) .* have no images \(b\)"):
        ds = ImageFolder(str(tmp_path), image_size=8)
    assert ds.classes == ["a", "b", "c"] and [s[1] for s in ds.samples] == [0, 2]


def test_empty_and_missing_folders_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="no images found"):
        ImageFolder(str(tmp_path), 32)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no images found"):
        ImageFolder(str(tmp_path), 32)
    with pytest.raises(UserError, match="does not exist"):
        ImageFolder(str(tmp_path / "nope"), 32)


def test_demo_shapes_deterministic_and_labelled(tmp_path):
    a, b = DemoShapes(16, 32, num_classes=4), DemoShapes(16, 32, num_classes=4)
    for i in range(16):
        xa, ya = a[i]
        assert torch.equal(xa, b[i][0]) and ya == i % 4
    assert not torch.equal(a[0][0], a[4][0])  # same class, different image
    a.save(str(tmp_path))
    folder = ImageFolder(str(tmp_path), 32)
    assert folder.classes == sorted(a.classes) and len(folder) == 16
    assert isinstance(build_dataset(None, 32), DemoShapes)


def test_flip_is_deterministic_per_epoch():
    ds = DemoShapes(64, 16, hflip=True)
    ds.set_epoch(0)
    first = [ds[i][0] for i in range(64)]
    flipped = sum(not torch.equal(f, DemoShapes(64, 16)[i][0]) for i, f in enumerate(first))
    assert 16 < flipped < 48  # about half
    assert all(torch.equal(first[i], ds[i][0]) for i in range(64))  # same epoch: same flips
    ds.set_epoch(1)
    assert any(not torch.equal(first[i], ds[i][0]) for i in range(64))  # new epoch: new flips


def test_batches_resume_mid_epoch():
    ds = DemoShapes(40, 8, hflip=True)
    ref = Batches(ds, 4, CPU1, seed=3, num_workers=0)
    it = iter(ref)
    want = [next(it) for _ in range(25)]  # crosses two epoch boundaries (10 batches/epoch)
    run = Batches(ds, 4, CPU1, seed=3, num_workers=0)
    it = iter(run)
    for _ in range(13):
        next(it)
    state = run.state_dict()
    assert state == {"epoch": 1, "samples_in_epoch": 12}
    resumed = Batches(ds, 4, CPU1, seed=3, num_workers=0)
    resumed.load_state_dict(state)
    it = iter(resumed)
    for i in range(13, 25):
        x, y = next(it)
        assert torch.equal(x, want[i][0]) and torch.equal(y, want[i][1])
    # Resumed with batch 2 (e.g. on twice the ranks): the same samples come next, in the same order.
    half = Batches(ds, 2, CPU1, seed=3, num_workers=0)
    half.load_state_dict(state)
    it = iter(half)
    nxt = torch.cat([next(it)[0] for _ in range(2)])
    assert torch.equal(nxt, want[13][0])


def test_batches_resume_on_fewer_ranks_after_a_padded_epoch():
    """101 images on 2 ranks: the sampler pads the epoch to 102, and a checkpoint after its last
    batch records 102 samples, more than one rank has; that rank goes on with the next epoch."""
    ds = DemoShapes(101, 8)
    rank0 = DistEnv(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"))
    run = Batches(ds, 17, rank0, num_workers=0)
    it = iter(run)
    for _ in range(run.steps_per_epoch):
        next(it)
    state = run.state_dict()
    assert state == {"epoch": 0, "samples_in_epoch": 102}
    one = Batches(ds, 34, CPU1, num_workers=0)
    one.load_state_dict(state)
    fresh = Batches(ds, 34, CPU1, num_workers=0)
    fresh.load_state_dict({"epoch": 1, "samples_in_epoch": 0})
    assert torch.equal(next(iter(one))[1], next(iter(fresh))[1])


def test_batches_too_small_dataset_is_clear():
    with pytest.raises(UserError, match="fewer than one global batch"):
        Batches(DemoShapes(3, 8), 4, CPU1)


def test_torchrun_two_ranks_see_disjoint_samples(tmp_path):
    out, folder = tmp_path / "shards.json", tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    (folder / "2.png").write_bytes(b"not a png")
    run_torchrun(["tests/ddp_plumbing.py", str(out), str(folder)])
    ranks = json.loads(out.read_text())
    assert len(ranks) == 2
    shards = [r["seen"] for r in ranks]
    a, b = set(shards[0]), set(shards[1])
    assert len(a) == len(shards[0]) and a.isdisjoint(b) and len(a | b) == 32
    assert [r["skipped"] for r in ranks] == [1, 1]  # met by one rank, counted on both


def test_images_both_flat_and_in_subfolders_are_refused(tmp_path):
    for i in range(5):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "thumbs").mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "thumbs" / f"{i}.png")
    with pytest.raises(UserError, match="holds 5 images directly and 2 in subfolders"):
        ImageFolder(str(tmp_path), 8)


def test_save_grid_layout(tmp_path):
    """64-px images, 2 a row, 2-px white gaps between them and none outside; one image whole."""
    images = torch.stack([torch.full((3, 64, 64), v, dtype=torch.uint8) for v in (10, 20, 30)])
    save_grid(images, str(tmp_path / "grid.png"), nrow=2)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (130, 130, 3)
    assert (grid[:64, :64] == 10).all() and (grid[:64, 66:] == 20).all()
    assert (grid[66:, :64] == 30).all() and (grid[64:66] == 255).all()
    assert (grid[66:, 66:] == 255).all()  # the empty cell
    save_grid(images[:1], str(tmp_path / "one.png"))
    assert (np.asarray(Image.open(tmp_path / "one.png")) == 10).all()
    assert Image.open(tmp_path / "one.png").size == (64, 64)
