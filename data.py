"""Image data for every script: `ImageFolder` (class subfolders or flat; any mode made RGB,
unreadable files skipped), the ADM centre crop, the built-in `DemoShapes` set (labelled and
captioned: no download), `Batches` (endless, resumable, sharded over ranks), `save_grid`. Images
leave the datasets as uint8 CHW (4x less to copy than float32); `to_model_range` makes [-1, 1]."""

import multiprocessing
import os
import warnings

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from common import UserError

IMAGE_EXTENSIONS = set(".jpg .jpeg .png .bmp .webp .tif .tiff .gif .ppm .pgm".split())


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB: 16-bit greyscale rescaled (not clipped), transparency over white.
    EXIF orientation is ignored, as by ADM's and pytorch-fid's loaders (the FID reference stats)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64) / 257.0  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def center_crop_arr(pil_image: Image.Image, height: int, width: int | None = None) -> np.ndarray:
    """ADM's centre crop -> HxWx3 uint8: box-filter halvings while the image is at least twice the
    target, bicubic resize to cover it, centre crop. Square unless `width` is given (t2i)."""
    width = width or height
    while pil_image.size[0] >= 2 * width and pil_image.size[1] >= 2 * height:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = max(height / pil_image.size[1], width / pil_image.size[0])
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                                 resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - height) // 2, (arr.shape[1] - width) // 2
    return arr[top: top + height, left: left + width]


def to_model_range(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1] on `device` (non-blocking from pinned memory)."""
    return x.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float images in [-1, 1] -> uint8, rounded as DiT/LightningDiT's cast of `127.5 x + 128`
    (ADM's sampler truncates `127.5 (x + 1)`, half a grey level darker)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


class _Images(Dataset):
    """Labels from `classes`, and a random horizontal flip that is a pure function of (seed, epoch,
    index): the same whichever worker loads the sample, and in a resumed run."""

    epoch = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch  # reaches the workers: they copy the dataset at each epoch's start

    def _tensor(self, arr: np.ndarray, index: int) -> torch.Tensor:
        if self.hflip and np.random.default_rng([self.seed, self.epoch, index]).random() < 0.5:
            arr = arr[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # HWC -> CHW uint8


class ImageFolder(_Images):
    """Images under `root`: in class subfolders (labels 0..C-1 from the sorted folder names, empty
    folders included, so labels match the full ImageNet tree) or directly in it (label -1, `classes`
    None). An undecodable file is replaced by the next readable one, warned about once."""

    def __init__(self, root: str, image_size: int, hflip: bool = False, seed: int = 0):
        if not os.path.isdir(root):
            raise UserError(f"image folder {root!r} does not exist (check --data)")
        self.root, self.image_size, self.hflip, self.seed = root, image_size, hflip, seed
        entries = sorted(os.scandir(root), key=lambda e: e.name)
        class_dirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
        flat = [e.path for e in entries if e.is_file() and is_image_file(e.name)]
        per_class = [sorted(os.path.join(d, f) for d, _, names in
                            os.walk(os.path.join(root, name), followlinks=True)
                            for f in names if is_image_file(f)) for name in class_dirs]
        nested = sum(map(len, per_class))
        if flat and nested:
            raise UserError(f"{root!r} holds {len(flat)} images directly and {nested} in "
                            "subfolders: move them to one level (flat, or a subfolder per class)")
        self.classes = class_dirs if nested else None
        self.samples = ([(f, label) for label, files in enumerate(per_class) for f in files]
                        or [(f, -1) for f in flat])
        if nested and (empty := [name for name, files in zip(class_dirs, per_class) if not files]):
            listed = ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "")
            warnings.warn(f"{len(empty)} class folder(s) in {root!r} have no images ({listed}); "
                          "they keep their labels, so the others do too")
        if not self.samples:
            raise UserError(f"no images found in {root!r} ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
                            "directly or in one subfolder per class")
        self._unreadable = multiprocessing.Array("b", len(self.samples))  # workers inherit it

    @property
    def unreadable(self) -> np.ndarray:
        """(N,) bool: the files found unreadable so far, by this process or its workers."""
        return np.frombuffer(self._unreadable.get_obj(), dtype=np.int8).astype(bool)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index: int):
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            path, label = self.samples[i]
            if self._unreadable[i]:  # known bad: do not decode it again
                continue
            try:
                with Image.open(path) as img:
                    arr = center_crop_arr(to_rgb(img), self.image_size)  # decodes: may raise
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                with self._unreadable.get_lock():
                    first = not self._unreadable[i]
                    self._unreadable[i] = 1
                if first:
                    warnings.warn(f"skipping unreadable image {path} (the next readable one stands "
                                  f"in): {e}", stacklevel=2)
                continue
            return self._tensor(arr, index), label
        raise UserError(f"none of the files in {self.root!r} could be read as an image")


class DemoShapes(_Images):
    """A built-in drawn image set (the method runs on a laptop with no download): class k is a shape
    in one of four colours, left, centre or right, on a light or dark background, as its caption
    says ("a red disc on the left, dark background"). Image i is a pure function of (seed, i)."""

    CLASSES = ("disc", "square", "triangle", "ring", "cross", "diamond", "bar", "star")
    COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
               "yellow": (240, 210, 40)}
    BACKGROUNDS = {"light": (232, 232, 224), "dark": (45, 45, 55)}
    POSITIONS = {"left": 0.32, "centre": 0.5, "right": 0.68}

    def __init__(self, num_images: int = 512, image_size: int = 64, num_classes: int = 4,
                 hflip: bool = False, seed: int = 0):
        if not 1 <= num_classes <= len(self.CLASSES):
            raise UserError(f"the demo set has 1..{len(self.CLASSES)} classes, not {num_classes}")
        self.num_images, self.image_size = num_images, image_size
        self.hflip, self.seed = hflip, seed
        self.classes = list(self.CLASSES[:num_classes])

    def __len__(self):
        return self.num_images

    def params(self, index: int) -> dict:
        """What image `index` shows, by name and in numbers."""
        rng = np.random.default_rng([self.seed, 12345, index])
        pick = lambda table: list(table)[rng.integers(len(table))]  # noqa: E731
        colour, background, position = map(pick, (self.COLOURS, self.BACKGROUNDS, self.POSITIONS))
        label = index % self.num_classes
        return dict(label=label, shape=self.classes[label], colour=colour, background=background,
                    position=position, radius=rng.uniform(0.24, 0.3),
                    cx=self.POSITIONS[position] + rng.uniform(-0.03, 0.03),
                    cy=rng.uniform(0.45, 0.55))

    def caption(self, index: int) -> str:
        p = self.params(index)
        return f"a {p['colour']} {p['shape']} on the {p['position']}, {p['background']} background"

    def render(self, index: int) -> np.ndarray:
        p, s = self.params(index), 4 * self.image_size  # drawn 4x larger, for smooth edges
        img = Image.new("RGB", (s, s), self.BACKGROUNDS[p["background"]])
        draw, fg, shape = ImageDraw.Draw(img), self.COLOURS[p["colour"]], p["shape"]
        r, cx, cy = s * p["radius"], s * p["cx"], s * p["cy"]
        if shape in ("disc", "ring"):
            ink = dict(outline=fg, width=max(1, int(0.4 * r))) if shape == "ring" else dict(fill=fg)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], **ink)
        rectangles = {"square": [(0.85 * r, 0.85 * r)], "bar": [(0.35 * r, r)],  # (half w, half h)
                      "cross": [(0.35 * r, r), (r, 0.35 * r)]}
        for w, h in rectangles.get(shape, []):
            draw.rectangle([cx - w, cy - h, cx + w, cy + h], fill=fg)
        # A star joins a diamond's corners with those of a smaller one turned 45 degrees.
        corners = [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
        diagonals = ((0.7, -0.7), (0.7, 0.7), (-0.7, 0.7), (-0.7, -0.7))
        inner = [(cx + 0.4 * r * dx, cy + 0.4 * r * dy) for dx, dy in diagonals]
        polygons = {"triangle": [(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)],
                    "diamond": corners, "star": [pt for pair in zip(corners, inner) for pt in pair]}
        if shape in polygons:
            draw.polygon(polygons[shape], fill=fg)
        return np.asarray(img.resize((self.image_size, self.image_size), resample=Image.LANCZOS))

    def __getitem__(self, index: int):
        return self._tensor(self.render(index), index), index % self.num_classes

    def save(self, folder: str):
        """PNGs in one subfolder per class, each with its caption in a .txt file beside it."""
        for i in range(len(self)):
            stem = os.path.join(folder, self.classes[i % self.num_classes], f"{i:06d}")
            os.makedirs(os.path.dirname(stem), exist_ok=True)
            Image.fromarray(self.render(i)).save(stem + ".png")
            with open(stem + ".txt", "w") as f:
                f.write(self.caption(i) + "\n")


def count_skipped(dataset, env) -> int:
    """Files of `dataset` (or a Subset's) skipped so far on any rank, each once (a collective)."""
    dataset = getattr(dataset, "dataset", dataset)
    if not isinstance(dataset, ImageFolder):  # the demo set has no files
        return 0
    if not env.distributed:
        return int(dataset.unreadable.sum())
    flags = torch.from_numpy(dataset.unreadable.astype(np.uint8)).to(env.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return int(flags.sum())


def build_dataset(path: str | None, image_size: int, hflip: bool = False, seed: int = 0,
                  demo_images: int = 512, demo_classes: int = 4) -> Dataset:
    """`ImageFolder(path)`, or the built-in demo set when no path is given."""
    if path is None or path == "demo":
        return DemoShapes(demo_images, image_size, demo_classes, hflip=hflip, seed=seed)
    return ImageFolder(path, image_size, hflip=hflip, seed=seed)


class Batches:
    """Endless iterator of (images uint8 (B, 3, H, W), labels (B,)) over epochs, each rank a
    disjoint shard of every epoch (`DistributedSampler`). `state_dict()` holds the position, so a
    resumed run sees exactly the batches an uninterrupted one would have."""

    def __init__(self, dataset, batch_size: int, env, seed: int = 0, num_workers: int = 4,
                 shuffle: bool = True):
        self.dataset, self.batch_size = dataset, batch_size
        self.num_workers, self.seed = num_workers, seed
        self.sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank,
                                          shuffle=shuffle, seed=seed, drop_last=False)
        self.steps_per_epoch = len(self.sampler) // batch_size  # incomplete last batch dropped
        if self.steps_per_epoch == 0:
            raise UserError(f"the dataset has {len(dataset)} images, fewer than one global batch "
                            f"({batch_size} per rank x {env.world_size} ranks): lower it")
        self.global_batch = batch_size * env.world_size
        self.pin_memory = env.device.type == "cuda"
        self.epoch, self.batch_in_epoch = 0, 0

    def state_dict(self):
        # Samples consumed by all ranks: the same position whatever the ranks or the batch size.
        return {"epoch": self.epoch, "samples_in_epoch": self.batch_in_epoch * self.global_batch}

    def load_state_dict(self, state):
        self.epoch = state["epoch"]
        self.batch_in_epoch = state["samples_in_epoch"] // self.global_batch
        if state["samples_in_epoch"] % self.global_batch:
            warnings.warn(f"resumed with another global batch: {state['samples_in_epoch']} samples "
                          f"into the epoch are rounded down to {self.batch_in_epoch} batches")
        # An epoch finished (on ranks whose padding made it longer than ours): on with the next.
        if self.batch_in_epoch >= self.steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def __iter__(self):
        while True:
            self.sampler.set_epoch(self.epoch)
            if hasattr(self.dataset, "set_epoch"):  # the image sets' flips
                self.dataset.set_epoch(self.epoch)
            # this rank's share of the epoch's permutation, less the batches already consumed
            sampler = list(self.sampler)[self.batch_in_epoch * self.batch_size:]
            # Its own generator: one from the global RNG would shift a resumed run's training noise.
            loader = DataLoader(self.dataset, self.batch_size, sampler=sampler, drop_last=True,
                                num_workers=self.num_workers, pin_memory=self.pin_memory,
                                prefetch_factor=4 if self.num_workers else None,
                                generator=torch.Generator().manual_seed(self.seed + self.epoch))
            for batch in loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0


def eval_loader(dataset, batch_size: int, env, num_workers: int = 4, skip: int = 0) -> DataLoader:
    """One pass over `dataset` in order, split over ranks without padding (every image once); each
    rank leaves out the first `skip` images of its share (a resumed pass)."""
    indices = list(range(env.rank, len(dataset), env.world_size))[skip:]
    return DataLoader(torch.utils.data.Subset(dataset, indices), batch_size, shuffle=False,
                      num_workers=num_workers, pin_memory=env.device.type == "cuda")


def save_grid(images: torch.Tensor, path: str, nrow: int = 8):
    """uint8 (N, 3, H, W) -> a PNG grid, `nrow` a row, 2-px white gaps; under 64 px, enlarged."""
    from torchvision.utils import make_grid

    scale = max(1, 64 // images.shape[-2])
    images = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    grid = make_grid(images.cpu(), nrow, padding=2, pad_value=255)
    if len(images) > 1:  # make_grid pads a grid of several images outside too: not ours
        grid = grid[:, 2:-2, 2:-2]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
