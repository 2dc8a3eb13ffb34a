"""Image data for every training and evaluation script.

- `ImageFolder`: ImageNet-style class-per-subfolder trees (labels = sorted folder names) or a flat
  folder of images (no labels; fine for reconstruction and FID). Real folders are messy, so every
  image mode is converted to RGB, non-image files are ignored, and a corrupt file is skipped with a
  warning instead of crashing an epoch.
- `center_crop_arr`: the ADM centre crop that ImageNet 256x256 diffusion results are reported with.
- `DemoShapes`: a built-in, procedurally drawn, class-labelled and captioned image set, so the whole
  pipeline runs on a laptop with no download.
- `Batches`: an endless, resumable stream of batches over epochs, sharded over `torchrun` ranks.
- `save_grid`: a PNG grid of images (samples, reconstructions).

Images leave the dataset as uint8 CHW tensors (4x less to copy than float32); `to_model_range`
turns them into floats in [-1, 1] on the device.
"""

import multiprocessing
import os
import warnings

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from common import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp",
                    ".tif", ".tiff", ".gif", ".ppm", ".pgm"}


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------------------------------
# Decoding and cropping


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB.

    16-bit greyscale ('I;16', 'I') would be clipped at 255 by a plain convert('RGB'), so it is
    rescaled; images with transparency are composited over white, because the colour stored under
    fully transparent pixels is arbitrary (often black). EXIF orientation tags are ignored, as ADM's
    and pytorch-fid's loaders ignore them (the FID reference statistics were made that way).
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64) / 257.0  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def center_crop_arr(pil_image: Image.Image, height: int, width: int | None = None) -> np.ndarray:
    """ADM's centre crop (guided-diffusion, used for all ImageNet 256 numbers): halve the image with
    a box filter while it is at least twice the target (cheap anti-aliasing), resize with bicubic so
    that it just covers the target (this also upsamples small images), then crop the centre. The
    target is square (height x height) unless a width is given (the text-to-image buckets).
    Returns an HxWx3 uint8 array."""
    width = width or height
    while pil_image.size[0] >= 2 * width and pil_image.size[1] >= 2 * height:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = max(height / pil_image.size[1], width / pil_image.size[0])
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                                 resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - height) // 2, (arr.shape[1] - width) // 2
    return arr[top: top + height, left: left + width]


def load_image(path: str, image_size: int) -> np.ndarray:
    """Read, convert to RGB and centre-crop one file. Raises OSError/ValueError on a bad file."""
    with Image.open(path) as img:
        img.load()  # decode now, so a truncated file fails here and not later
        return center_crop_arr(to_rgb(img), image_size)


def to_model_range(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, 3, H, W) batch -> float32 in [-1, 1] on `device`
    (non-blocking from pinned memory)."""
    return x.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float images in [-1, 1] -> uint8, rounded to nearest: what DiT/LightningDiT's uint8 cast of
    `127.5 x + 128` amounts to (ADM's sampler truncates `127.5 (x + 1)`, half a grey level
    darker)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _hflip_decision(seed: int, epoch: int, index: int) -> bool:
    """The random flip of sample `index` in `epoch`: a pure function of its arguments, so it does
    not depend on which worker loads the sample, and a resumed run flips exactly as the original
    did."""
    return bool(np.random.default_rng([seed, epoch, index]).random() < 0.5)


class _FlipMixin:
    """Random horizontal flip that is deterministic per (seed, epoch, index)."""

    hflip: bool = False
    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int):
        # Workers receive a copy of the dataset when an epoch's iterator is created (we do not use
        # persistent workers), so setting this before each epoch reaches them.
        self.epoch = epoch

    def _maybe_flip(self, arr: np.ndarray, index: int) -> np.ndarray:
        if self.hflip and _hflip_decision(self.seed, self.epoch, index):
            return arr[:, ::-1]
        return arr


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # HWC -> CHW uint8


# --------------------------------------------------------------------------------------------------
# Datasets


class ImageFolder(_FlipMixin, Dataset):
    """Images under `root`, either in class subfolders (labels 0..C-1 from sorted folder names) or
    directly in `root` (label -1 for every image, `classes` is None).

    Every class folder keeps the label of its place in the sorted list, even an empty one (with a
    warning), so labels mean the same as in the full ImageNet tree. A file that cannot be decoded is
    replaced by the next readable one, with a warning naming it, once; `unreadable` flags such files
    for all DataLoader workers and epochs, and `count_skipped` adds them up over ranks.
    """

    def __init__(self, root: str, image_size: int, hflip: bool = False, seed: int = 0):
        if not os.path.isdir(root):
            raise UserError(f"image folder {root!r} does not exist (check --data)")
        self.root, self.image_size, self.hflip, self.seed = root, image_size, hflip, seed
        entries = sorted(os.scandir(root), key=lambda e: e.name)
        class_dirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
        flat = [e.path for e in entries if e.is_file() and is_image_file(e.name)]
        per_class = [sorted(os.path.join(folder, f)
                            for folder, _, names in os.walk(os.path.join(root, name),
                                                            followlinks=True)
                            for f in names if is_image_file(f)) for name in class_dirs]
        nested = sum(map(len, per_class))
        if flat and nested:
            raise UserError(f"{root!r} holds {len(flat)} images directly and {nested} in "
                            "subfolders: is it a flat folder or one subfolder per class? Move "
                            "the images to one level")
        if nested:
            self.classes = class_dirs
            self.samples = [(f, label) for label, files in enumerate(per_class) for f in files]
        else:
            self.classes, self.samples = None, [(f, -1) for f in flat]
        empty = [name for name, files in zip(class_dirs, per_class) if not files]
        if nested and empty:
            listed = ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "")
            warnings.warn(f"{len(empty)} class folder(s) in {root!r} have no images ({listed}); "
                          "they keep their labels, so the others do too")
        if not self.samples:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise UserError(f"no images found in {root!r}: expected image files ({extensions}) "
                            "directly in it or in one subfolder per class")
        # One flag per file, shared with the DataLoader workers (they inherit it at creation): the
        # files that failed to decode, so each is warned about and counted once, whichever worker or
        # epoch meets it.
        self._unreadable = multiprocessing.Array("b", len(self.samples))

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else 0

    @property
    def unreadable(self) -> np.ndarray:
        """(N,) bool: which files were found unreadable so far (by this process and its workers)."""
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
                arr = load_image(path, self.image_size)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                with self._unreadable.get_lock():
                    first = not self._unreadable[i]
                    self._unreadable[i] = 1
                if first:
                    warnings.warn(f"skipping unreadable image {path} (the next readable one stands "
                                  f"in): {e}", stacklevel=2)
                continue
            return _to_tensor(self._maybe_flip(arr, index)), label
        raise UserError(f"none of the {len(self.samples)} files in {self.root!r} could be read as "
                        "an image")


class DemoShapes(_FlipMixin, Dataset):
    """A built-in, procedurally drawn image set with labels and captions, so that the whole method
    runs on a laptop with no download: class k is a shape in one of four colours, left, centre or
    right, on a light or dark background, each image described by its caption ("a red disc on the
    left, dark background"). Image i is a pure function of (seed, i)."""

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

    num_classes = property(lambda self: len(self.classes))

    def __len__(self):
        return self.num_images

    def params(self, index: int) -> dict:
        """What image `index` shows, by name and in numbers."""
        rng = np.random.default_rng([self.seed, 12345, index])
        pick = lambda table: list(table)[rng.integers(len(table))]  # noqa: E731
        colour, background = pick(self.COLOURS), pick(self.BACKGROUNDS)
        position = pick(self.POSITIONS)
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
        draw, fg = ImageDraw.Draw(img), self.COLOURS[p["colour"]]
        r, cx, cy = s * p["radius"], s * p["cx"], s * p["cy"]
        corners = [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]  # a diamond's
        if p["shape"] == "disc":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        elif p["shape"] == "square":
            draw.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fg)
        elif p["shape"] == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fg)
        elif p["shape"] == "ring":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=max(1, int(0.4 * r)))
        elif p["shape"] in ("cross", "bar"):
            w = 0.35 * r
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
            if p["shape"] == "cross":
                draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
        elif p["shape"] == "diamond":
            draw.polygon(corners, fill=fg)
        else:  # star: a diamond's corners joined by a smaller one's, turned 45 degrees
            diagonals = ((0.7, -0.7), (0.7, 0.7), (-0.7, 0.7), (-0.7, -0.7))
            inner = [(cx + 0.4 * r * dx, cy + 0.4 * r * dy) for dx, dy in diagonals]
            draw.polygon([pt for pair in zip(corners, inner) for pt in pair], fill=fg)
        return np.asarray(img.resize((self.image_size, self.image_size), resample=Image.LANCZOS))

    def __getitem__(self, index: int):
        return _to_tensor(self._maybe_flip(self.render(index), index)), index % self.num_classes

    def save(self, folder: str):
        """PNGs in one subfolder per class, each with its caption in a .txt file beside it."""
        for i in range(len(self)):
            stem = os.path.join(folder, self.classes[i % self.num_classes], f"{i:06d}")
            os.makedirs(os.path.dirname(stem), exist_ok=True)
            Image.fromarray(self.render(i)).save(stem + ".png")
            with open(stem + ".txt", "w") as f:
                f.write(self.caption(i) + "\n")


def count_skipped(dataset, env) -> int:
    """How many files of `dataset` were skipped as unreadable so far, on any rank (a file met on two
    ranks counts once). A collective under DDP: every rank must call it."""
    dataset = getattr(dataset, "dataset", dataset)  # a Subset's underlying set
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


# --------------------------------------------------------------------------------------------------
# Batching over ranks and epochs


class Batches:
    """Endless iterator of (images uint8 (B,3,H,W), labels (B,)) over epochs, for training.

    Each rank gets a disjoint shard of every epoch through a `DistributedSampler` (epoch set each
    epoch, so the shuffle changes). `state_dict()` records how many batches the loop has consumed,
    so a resumed run sees exactly the batches an uninterrupted one would have.
    """

    def __init__(self, dataset, batch_size: int, env, seed: int = 0, num_workers: int = 4,
                 shuffle: bool = True):
        self.dataset, self.batch_size = dataset, batch_size
        self.num_workers, self.seed = num_workers, seed
        self.sampler = DistributedSampler(dataset, num_replicas=env.world_size,
                                          rank=env.rank, shuffle=shuffle, seed=seed,
                                          drop_last=False)
        self.steps_per_epoch = len(self.sampler) // batch_size  # incomplete last batch dropped
        if self.steps_per_epoch == 0:
            raise UserError(f"the dataset has {len(dataset)} images, fewer than one global batch "
                            f"({batch_size} per rank x {env.world_size} ranks); lower the "
                            "batch size")
        self.global_batch = batch_size * env.world_size
        self.pin_memory = env.device.type == "cuda"
        self.epoch = 0
        self.batch_in_epoch = 0

    def state_dict(self):
        # Samples consumed by all ranks together: the same position whatever the number of ranks or
        # the batch size (rank r reads positions r, r + W, ... of the epoch's shared permutation).
        return {"epoch": self.epoch, "samples_in_epoch": self.batch_in_epoch * self.global_batch}

    def load_state_dict(self, state):
        self.epoch = state["epoch"]
        self.batch_in_epoch = state["samples_in_epoch"] // self.global_batch
        if state["samples_in_epoch"] % self.global_batch:
            warnings.warn("resuming with another global batch size: the position in the epoch is "
                          f"rounded down to a whole batch ({state['samples_in_epoch']} samples -> "
                          f"{self.batch_in_epoch} batches)")
        # A finished epoch (perhaps on other ranks, whose padding can make it longer than ours
        # here): go on with the next one, as the uninterrupted run does.
        if self.batch_in_epoch >= self.steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def __iter__(self):
        while True:
            self.sampler.set_epoch(self.epoch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            # this rank's share of the epoch's permutation, less the batches already consumed
            sampler = list(self.sampler)[self.batch_in_epoch * self.batch_size:]
            # A generator of its own: otherwise creating the iterator draws from the global RNG, and
            # a resumed run (which creates it at a different point) would see other training noise.
            loader = DataLoader(self.dataset, self.batch_size, sampler=sampler, drop_last=True,
                                num_workers=self.num_workers, pin_memory=self.pin_memory,
                                prefetch_factor=4 if self.num_workers else None,
                                generator=torch.Generator().manual_seed(self.seed + self.epoch))
            for batch in loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0


def eval_loader(dataset, batch_size: int, env, num_workers: int = 4,
                skip: int = 0) -> DataLoader:
    """One pass over `dataset` in order, split over ranks without padding (every image once); each
    rank leaves out the first `skip` images of its share (a resumed pass)."""
    indices = list(range(env.rank, len(dataset), env.world_size))[skip:]
    return DataLoader(torch.utils.data.Subset(dataset, indices), batch_size, shuffle=False,
                      num_workers=num_workers, pin_memory=env.device.type == "cuda")


def save_grid(images: torch.Tensor, path: str, nrow: int = 8):
    """Write uint8 images (N, 3, H, W) as one PNG grid, `nrow` images per row, 2-px white gaps;
    images smaller than 64 px are enlarged (nearest neighbour) so that the grid can be looked at."""
    scale = max(1, 64 // images.shape[-2])
    images = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    n, _, h, w = images.shape
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    canvas = np.full((rows * (h + 2) - 2, ncol * (w + 2) - 2, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images.cpu().numpy()):
        r, c = divmod(i, ncol)
        canvas[r * (h + 2): r * (h + 2) + h, c * (w + 2): c * (w + 2) + w] = img.transpose(1, 2, 0)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(canvas).save(path)
