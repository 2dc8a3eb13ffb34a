"""Image-caption data for text-to-image: caption folders or WebDataset shards, unusable samples
skipped and counted, batches of one aspect-ratio bucket, shards dealt to ranks and workers."""

import collections
import io
import math
import os
import tarfile
import warnings

import numpy as np
import torch
from PIL import Image

from common import UserError
from data import IMAGE_EXTENSIONS, center_crop_arr, to_rgb

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # tarfile reads compressed shards as a stream too
MAX_PIXELS = 64_000_000  # larger images are skipped: decoding a 12000x12000 PNG takes 1.6 GB


def buckets(image_size: int, cell: int) -> list[tuple[int, int]]:
    """(H, W) sizes of image_size^2 pixels within 10% in whole `cell`s (a latent cell times the
    DiT's patch), aspect ratios up to 2, from tall to wide."""
    base, sizes = image_size // cell, set()
    for h in range(1, base + 1):
        w = round(base * base / h)
        if abs(h * w - base * base) <= 0.1 * base * base and w / h <= 2:
            sizes |= {(h * cell, w * cell), (w * cell, h * cell)}
    return sorted(sizes, key=lambda s: s[0] / s[1])


def parse_size(text: str | None, sizes) -> tuple[int, int]:
    """'224x288' (height x width) -> (224, 288) if a bucket; None -> the middle (square) one."""
    names = {f"{h}x{w}": (h, w) for h, w in sizes}
    if text and text.lower() not in names:
        raise UserError(f"--size {text} is not one of the buckets: {', '.join(names)}")
    return names[text.lower()] if text else list(names.values())[len(names) // 2]


def list_shards(path: str, readers: int = 1) -> list:
    """The .tar shards, or a folder's images shuffled (not by kind) and dealt into `readers`+."""
    if os.path.isfile(path):
        if path.endswith(SHARD_SUFFIXES):
            return [path]
        raise UserError(f"--captions {path} is a file but not a WebDataset shard (.tar, .tar.gz)")
    if not os.path.isdir(path):
        raise UserError(f"caption data {path!r} does not exist (--captions)")
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(path, followlinks=True)
                   for f in names if not f.startswith("."))
    if tars := [f for f in files if f.endswith(SHARD_SUFFIXES)]:
        return tars
    if not (images := [f for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]):
        raise UserError(f"no .tar shards and no images in {path!r} (images: "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}, each with a .txt caption)")
    images = [images[i] for i in np.random.default_rng(0).permutation(len(images))]
    count = min(len(images), max(readers, math.ceil(len(images) / 256)))  # pseudo-shards of 256
    return [images[i::count] for i in range(count)]


def read_shard(shard):
    """A shard's samples (key, image bytes or path or None, caption); a damaged tar's are read up to
    the damage, then (key, None, None). utf-8-sig: a Windows byte-order mark stays out."""
    if isinstance(shard, list):  # a caption folder's files
        for image in shard:
            txt, caption = os.path.splitext(image)[0] + ".txt", ""
            if os.path.isfile(txt):
                with open(txt, encoding="utf-8-sig", errors="replace") as f:
                    caption = f.read().strip()
            yield image, image, caption
        return
    key, parts, damage = None, {}, None  # the sample being read: its files by extension
    try:
        with tarfile.open(shard, mode="r|*") as tar:  # a stream: each member read as it comes
            for member in (m for m in tar if m.isfile()):
                stem, ext = os.path.splitext(member.name)
                if stem != key and key is not None:
                    yield _sample(key, parts)
                    parts = {}
                key, parts[ext.lower()] = stem, tar.extractfile(member).read()
            # A plain tar cut at (or in) a header reads as a shorter one, without its 1024-byte end.
            if tar.fileobj.comptype == "tar" and os.path.getsize(shard) < tar.offset + 1024:
                raise tarfile.ReadError("no end-of-archive marker: cut short")
    except (tarfile.TarError, EOFError, OSError) as e:
        damage = e
    if key is not None:
        yield _sample(key, parts)
    if damage is not None:
        warnings.warn(f"{shard} is damaged ({damage}); its remaining samples are skipped")
        yield (f"{shard}:damaged", None, None)


def _sample(key, parts):
    image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
    return key, image, parts.get(".txt", b"").decode("utf-8-sig", "replace").strip()


def decode(image, text, sizes):
    """A usable sample's HxWx3 uint8 pixels in the bucket nearest its shape, else why not (str)."""
    if text is None:  # the end of a damaged shard
        return "in a damaged shard"
    if image is None or not text:
        return "without an image" if image is None else "without a caption"
    try:
        with Image.open(image if isinstance(image, str) else io.BytesIO(image)) as img:
            if img.size[0] * img.size[1] > MAX_PIXELS:  # known from the header, before decoding
                return f"over {MAX_PIXELS / 1e6:g} megapixels"
            hw = min(sizes, key=lambda s: abs(math.log(s[0] / s[1] * img.size[0] / img.size[1])))
            return center_crop_arr(to_rgb(img), *hw)  # finds a truncated file
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return "undecodable"


class CaptionStream(torch.utils.data.IterableDataset):
    """This rank's shards as endless batches of one bucket each: {"images": uint8 (B, 3, H, W),
    "captions", "worker", "epoch", "index", "skipped" (unusable samples of its first epoch)}."""

    def __init__(self, path: str, batch_size: int, sizes, rank: int = 0, world: int = 1,
                 seed: int = 0, num_workers: int = 0):
        self.rank, self.world, self.seed = rank, world, seed
        self.batch_size, self.sizes = batch_size, sizes
        readers = max(1, num_workers) * world
        self.shards = list_shards(path, readers)
        # Known before reading: a folder's images, a plain tar's blocks / 4 (2 headers, 2 data)
        most = sum(len(s) if isinstance(s, list) else os.path.getsize(s) // (4 * tarfile.BLOCKSIZE)
                   if s.endswith(".tar") else math.inf for s in self.shards)
        if len(self.shards) < readers or most < readers * batch_size:
            raise UserError(f"{path} has {len(self.shards)} shard(s), which hold at most {most} "
                            f"samples, for {world} rank(s) x {max(1, num_workers)} loader "
                            f"worker(s): each needs a shard and a batch of {batch_size}")
        self.start = {}  # worker -> (epoch, batches of that epoch already consumed)
        self.first_worker = 0  # the loader's worker 0 plays this worker (CaptionBatches)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info else 1
        worker = ((info.id if info else 0) + self.first_worker) % workers
        reader, readers = self.rank * workers + worker, self.world * workers
        epoch, skip = self.start.get(worker, (0, 0))
        first = counts = collections.Counter()  # what became of the first epoch's samples
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
            mine = [self.shards[i] for i in order[reader::readers]]
            buffers, index = {}, 0
            for key, image, caption in (sample for s in mine for sample in read_shard(s)):
                pixels = decode(image, caption, self.sizes)
                counts[pixels if isinstance(pixels, str) else "usable"] += 1
                if isinstance(pixels, str):  # the first 5 of the first epoch named
                    if counts is first and first.total() - first["usable"] <= 5:
                        warnings.warn(f"skipped the sample {key}: {pixels} (at most 5 are named)")
                    continue
                buffers.setdefault(pixels.shape[:2], []).append((pixels, caption))
                if len(buffers[pixels.shape[:2]]) < self.batch_size:
                    continue
                batch, captions = zip(*buffers.pop(pixels.shape[:2]))  # B (H, W, 3) arrays, B str
                if index >= skip:  # the batches before a resume point are made again, not yielded
                    yield {"images": torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2),
                           "captions": list(captions), "worker": worker, "epoch": epoch,
                           "index": index, "skipped": first.total() - first["usable"]}
                index += 1
            if index == 0:  # else an endless loop, and under DDP the other ranks would wait forever
                found = ", ".join(f"{n} {why}" for why, n in {"usable": 0, **counts}.items())
                raise UserError(f"rank {self.rank} worker {worker} made no batch of "
                                f"{self.batch_size} from a whole epoch of {len(mine)} shard(s) "
                                f"that hold {counts.total()} samples: {found} (a batch is of one "
                                "bucket): fix the data, lower --batch_size or --num_workers")
            epoch, skip, counts = epoch + 1, 0, collections.Counter()


class CaptionBatches:
    """A CaptionStream's batches, endless; state_dict() holds every rank's worker positions."""

    def __init__(self, stream: CaptionStream, num_workers: int, pin_memory: bool = False):
        self.stream, self.num_workers, self.pin_memory = stream, num_workers, pin_memory
        self.position, self.skipped, self.next_worker = {}, {}, 0  # per worker; whose turn it is

    def state_dict(self):
        """A collective under DDP: the ranks' positions differ, and rank 0 saves them."""
        ranks = [{"position": dict(self.position), "next_worker": self.next_worker}]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            mine, ranks = ranks[0], [None] * self.stream.world
            torch.distributed.all_gather_object(ranks, mine)
        return {"ranks": ranks, "num_workers": self.num_workers}

    def load_state_dict(self, state):
        if (len(state["ranks"]), state["num_workers"]) == (self.stream.world, self.num_workers):
            mine = state["ranks"][self.stream.rank]
            self.position = {int(w): tuple(p) for w, p in mine["position"].items()}
            self.next_worker = mine["next_worker"]
            return
        warnings.warn(f"resuming on {self.stream.world} rank(s) x {self.num_workers} workers, not "
                      f"{len(state['ranks'])} x {state['num_workers']}: the latest epoch restarts")
        epoch = max((p[0] for r in state["ranks"] for p in r["position"].values()), default=0)
        self.position = {w: (epoch, 0) for w in range(max(1, self.num_workers))}

    def __iter__(self):
        # Loader worker 0 plays the one whose turn it is; its own generator keeps the global RNG.
        self.stream.start, self.stream.first_worker = dict(self.position), self.next_worker
        for batch in torch.utils.data.DataLoader(self.stream, None, num_workers=self.num_workers,
                                                 pin_memory=self.pin_memory,
                                                 generator=torch.Generator()):
            self.next_worker = (batch["worker"] + 1) % max(1, self.num_workers)
            self.position[batch["worker"]] = (batch["epoch"], batch["index"] + 1)
            self.skipped[batch["worker"]] = batch["skipped"]
            yield batch["images"], batch["captions"]

    def count_skipped(self, env) -> int:
        """Samples skipped on all ranks since the run (re)started; a collective under DDP."""
        total = torch.tensor(sum(self.skipped.values()), device=env.device)
        if env.distributed:
            torch.distributed.all_reduce(total)
        return int(total)
