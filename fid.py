"""FID, sFID, Inception Score, precision/recall by ADM's evaluation protocol, FD_DINOv2 (dgm-eval),
of image folders (ADM's centre crop), ADM .npz files (`arr_0`, uint8 NHWC) or statistics (`mu`...).

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --prc --json fid.json
    torchrun --nproc_per_node=8 fid.py /data/imagenet/train --image_size 256 --save_stats t.npz
"""

import argparse
import contextlib
import dataclasses
import math
import os
import shutil
import time
import warnings
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from common import (DistEnv, HelpFormatter, Logger, UserError, at_least, atomic_write,
                    check_writable, cleanup_distributed, save_checkpoint, save_json, script_main,
                    setup_distributed)
from data import ImageFolder, count_skipped
from inception import (FID_WEIGHTS_URL, PREPROCESSING, FIDInception, dinov2_input, exact_float32,
                       inception_score, load_dinov2, load_inception)

PAIRS = (("mu", "sigma"), ("mu_s", "sigma_s"), ("mu_dinov2", "sigma_dinov2"))  # stored statistics


class Moments:
    """Count, mean and scatter sum (x - mean)(x - mean)^T of feature rows in float64, merged a batch
    at a time (Chan et al.): as exact as two passes, and mergeable across ranks and resumes."""

    def __init__(self, dim: int, device="cpu"):
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.scatter = torch.zeros((dim, dim), dtype=torch.float64, device=device)

    def add(self, rows):
        x = torch.as_tensor(rows).to(self.mean.device, torch.float64)  # (b, dim)
        mean = x.mean(0)
        self.merge(x.shape[0], mean, (x - mean).T @ (x - mean))

    def merge(self, count: int, mean, scatter):  # another's, on the same device
        n, delta = self.count + count, mean - self.mean
        self.scatter += scatter + torch.outer(delta, delta) * (self.count * count / n)
        self.mean += delta * (count / n)
        self.count = n

    def fit(self):  # (mean, unbiased covariance as np.cov's), float64 numpy
        return self.mean.cpu().numpy(), (self.scatter / (self.count - 1)).cpu().numpy()


def _moments(feats, name: str) -> Moments:
    """Moments of features (N, D), refusing what gives no meaningful covariance."""
    feats = np.asarray(feats, dtype=np.float32)
    n, d = feats.shape
    if n < 2:
        raise UserError(f"{name}: {n} image(s); a covariance needs at least 2 (FID: 50,000)")
    if not np.isfinite(feats).all():
        raise UserError(f"{name}: the features contain NaN/inf (a corrupt weights file?)")
    if n < d:
        warnings.warn(f"{name}: {n} images < {d} feature dimensions: a rank-deficient covariance, "
                      "FID biased upwards (use 50,000 samples)", stacklevel=4)
    moments = Moments(d)
    for i in range(0, n, 4096):  # float64 a chunk at a time
        moments.add(torch.from_numpy(feats[i: i + 4096]))
    return moments


@dataclasses.dataclass
class FIDStatistics:
    """Gaussian fits (float64) to a set's Inception pool, spatial (sFID) and DINOv2 features; the
    pool `features` (N, 2048) or a reference batch's `images` for precision/recall."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int  # -1: unknown (ADM's, pytorch-fid's files)
    features: np.ndarray | None = None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    images: object = None  # NpzImages
    path: str | None = None  # the file it came from
    preprocess: str = "adm"  # of the Inception's input (inception.py)
    mu_dinov2: np.ndarray | None = None
    sigma_dinov2: np.ndarray | None = None

    @classmethod
    def from_moments(cls, *moments: Moments | None, **kw):  # pool, spatial, DINOv2 (or None)
        fits = {k: v for keys, m in zip(PAIRS, moments) if m for k, v in zip(keys, m.fit())}
        return cls(num_images=moments[0].count, **fits, **kw)

    @classmethod
    def from_features(cls, *features, keep: bool = False, name: str = "features", **kw):
        """Of pool features (N, 2048), then spatial (N, 2023) and DINOv2 (N, D) ones, or None."""
        kept = np.asarray(features[0], np.float32) if keep else None
        moments = (None if f is None else _moments(f, name) for f in features)
        return cls.from_moments(*moments, features=kept, **kw)

    def save(self, path: str):  # ADM's keys (so also pytorch-fid's), atomically
        arrays = {k: v for k, v in vars(self).items() if v is not None
                  and k not in ("images", "path")}
        atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str, npz):
        got = {k: np.asarray(npz[k], np.float64) for pair in PAIRS for k in pair if k in npz}
        for m, s in PAIRS:
            if (m in got) != (s in got) or m in got and not (
                    got[m].ndim == 1 and got[s].shape == (got[m].size,) * 2
                    and np.isfinite(got[m]).all() and np.isfinite(got[s]).all()):
                shapes = [got[k].shape if k in got else "missing" for k in (m, s)]
                raise UserError(f"{path}: {m} {shapes[0]} and {s} {shapes[1]} are not finite "
                                "statistics (D,) and (D, D); recompute them")
        how = str(npz["preprocess"]) if "preprocess" in npz else (  # unsaid: ADM's batch or not
            "adm" if "mu_s" in npz and "num_images" not in npz else "pytorch-fid")
        return cls(num_images=int(npz.get("num_images", -1)), features=npz.get("features"), **got,
                   path=path, preprocess=how, images=NpzImages(path) if "arr_0" in npz else None)

    def frechet_distance(self, other: "FIDStatistics", key: str = "mu") -> float:
        """FID; sFID with key "mu_s"; FD_DINOv2 with "mu_dinov2" (whose input is dgm-eval's)."""
        if key != "mu_dinov2" and self.preprocess != other.preprocess:
            raise UserError(f"statistics of {self.preprocess} and {other.preprocess} "
                            "preprocessing: an FID across the two would be meaningless")
        keys = (key, key.replace("mu", "sigma"))
        return frechet_distance(*(getattr(s, k) for s in (self, other) for k in keys))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) by float64 eigh, not scipy's fragile sqrtm: tr
    sqrt(S1 S2) = sum sqrt(eig(R S2 R)), R = sqrt(S1), the min(rank S1, rank S2) largest."""
    mu1, s1, mu2, s2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, sigma1, mu2, sigma2))
    if not all(torch.isfinite(a).all() for a in (mu1, s1, mu2, s2)):  # else NaN, or garbage
        raise UserError("the statistics contain NaN/inf: recompute them")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2  # covariances are symmetric only up to round-off

    def above_round_off(w):  # eigenvalues (d,) of a covariance; those at round-off level -> 0
        return torch.where(w > w.numel() * torch.finfo(w.dtype).eps * w.abs().max(), w, 0.0)

    threads = torch.get_num_threads()  # 1: LAPACK's thread syncs made it 7x slower on busy cores
    torch.set_num_threads(1)
    try:
        w1, v1 = torch.linalg.eigh(s1)
        w1, w2 = above_round_off(w1), above_round_off(torch.linalg.eigvalsh(s2))
        sqrt_s1 = (v1 * w1.sqrt()) @ v1.T  # R = V diag(sqrt(w)) V^T
        m = sqrt_s1 @ s2 @ sqrt_s1
        eig_m = torch.linalg.eigvalsh((m + m.T) / 2)  # ascending
    finally:
        torch.set_num_threads(threads)
    rank = min(int((w1 > 0).sum()), int((w2 > 0).sum()))
    tr_sqrt = eig_m[len(eig_m) - rank:].clamp(min=0).sqrt().sum().item()  # the rest is round-off
    # Checks: sum lambda(M) = tr(S1 S2) = sum(S1 * S2); tr sqrt(S1 S2) <= sqrt(tr S1 tr S2).
    tr1, tr2, tr_s1s2 = s1.trace().item(), s2.trace().item(), (s1 * s2).sum().item()
    scale, bound = (s1.norm() * s2.norm()).item(), math.sqrt(max(tr1 * tr2, 0.0))
    if abs(eig_m.sum().item() - tr_s1s2) > 1e-6 * scale or tr_sqrt > bound * (1 + 1e-6) + 1e-12:
        raise RuntimeError(f"frechet_distance: broken linear algebra (sum lambda {eig_m.sum():.6g} "
                           f"vs tr(S1 S2) {tr_s1s2:.6g}; tr sqrt {tr_sqrt:.6g} vs {bound:.6g})")
    return max((mu1 - mu2).square().sum().item() + tr1 + tr2 - 2 * tr_sqrt, 0.0)  # >= 0


def as_nchw_uint8(images) -> torch.Tensor:
    """uint8 images (B, 3, H, W) of numpy NHWC (ADM's .npz) or torch NCHW ones."""
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[-1] == 3:
        images = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)  # a writable copy
    if not (torch.is_tensor(images) and images.ndim == 4 and images.shape[1] == 3
            and images.dtype == torch.uint8):
        raise UserError("expected uint8 images (data.to_uint8), numpy NHWC or torch NCHW, got "
                        f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}")
    return images


class NpzImages:
    """The `arr_0` images (uint8 NHWC) of an ADM .npz, streamed a batch at a time: never the whole
    set in memory (50K at 256 px: 9.8 GB). `labelling`: how sample.py drew the labels, if known."""

    def __init__(self, path: str, labelling: str | None = None):
        self.path, self.labelling = path, labelling
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            v, _ = np.lib.format.read_magic(f)  # the .npy format's version
            self.shape, fortran, self.dtype = getattr(np.lib.format, f"read_array_header_{v}_0")(f)
            self.offset = f.tell()  # of the data
        if fortran or self.dtype.hasobject:
            raise UserError(f"{path}: 'arr_0' is in Fortran order or holds Python objects "
                            "(np.savez of images of different sizes): save one C-order array")
        as_nchw_uint8(np.zeros((1, *self.shape[1:]), self.dtype))  # the layout and dtype, now

    def __len__(self):
        return self.shape[0]

    def batches(self, batch_size: int, start: int, stop: int):
        """Images [start, stop) in (b, H, W, 3) batches."""
        item = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
            f.seek(self.offset + start * item)
            for i in range(start, stop, batch_size):
                b = min(batch_size, stop - i)
                yield np.frombuffer(f.read(b * item), self.dtype).reshape(b, *self.shape[1:])


def load_source(path: str, image_size: int | None = None, log=print, from_images: bool = False):
    """A folder -> ImageFolder (crop: `image_size`, else the first readable image's short side); an
    .npz with `mu` -> FIDStatistics (`arr_0` in `.images`) unless `from_images`; else NpzImages."""
    if os.path.isdir(path):
        folder = ImageFolder(path, image_size or 0)
        for file, _ in [] if image_size else folder.samples:  # ImageFolder warns of unreadable ones
            with contextlib.suppress(OSError, ValueError, SyntaxError), Image.open(file) as img:
                folder.image_size = min(img.size)
                break
        return folder
    try:
        npz = np.load(path, allow_pickle=False)
        files = npz.files  # a plain .npy has none
    except Exception as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e})") from None
    with npz:
        if "mu" in files and not (from_images and "arr_0" in files):
            return FIDStatistics.load(path, npz)
        if "arr_0" not in files:
            raise UserError(f"{path} holds {files}; expected 'arr_0' (images) or 'mu', 'sigma'")
        if "mu" in files:
            log(f"{path}: featurising its images (arr_0) here, not using its stored mu/sigma")
        return NpzImages(path, str(npz["labelling"]) if "labelling" in files else None)


def gather_rows(local: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Every rank's rows (ranks may hold different numbers) in rank order, on every rank, on CPU."""
    if not env.distributed:
        return local
    parts = [None] * env.world_size
    dist.all_gather_object(parts, local.cpu())  # pickled: shapes may differ
    return torch.cat([p for p in parts if len(p)])


def _forward(images, model, env: DistEnv, batch_size: int, num_workers: int, desc: str,
             progress: bool = True, skip: int = 0, dinov2=None):
    """Float32 (pool, logits, spatial[, DINOv2]) features of this rank's share, past `skip`."""
    n = len(images)
    if n == 0:  # on every rank, before any collective
        raise UserError(f"{desc}: no images (an empty folder or array?)")
    start, stop = n * env.rank // env.world_size + skip, n * (env.rank + 1) // env.world_size
    if isinstance(images, ImageFolder):  # decoded by workers
        workers = min(num_workers, len(os.sched_getaffinity(0)))
        batches = DataLoader(Subset(images, range(start, stop)), batch_size,
                             num_workers=workers, pin_memory=env.device.type == "cuda")
    elif isinstance(images, NpzImages):
        batches = images.batches(batch_size, start, stop)
    else:  # in memory
        batches = as_nchw_uint8(images[start: stop]).split(batch_size) if stop > start else ()
    bar = tqdm(total=n, initial=skip * env.world_size, desc=desc, unit="img", dynamic_ncols=True,
               disable=not (progress and env.is_main))
    with exact_float32(env.device), bar:
        for batch in batches:
            x = as_nchw_uint8(batch[0] if isinstance(batch, list) else batch)  # (B, 3, H, W) uint8
            out = model(x.to(env.device, non_blocking=True).float(), spatial=True)  # from 0..255
            if dinov2 is not None:  # (B, D)
                out = (*out, dinov2(dinov2_input(x).to(env.device), cls=True))
            yield out
            bar.update(len(x) * env.world_size)


@torch.inference_mode()
def compute_activations(images, model: FIDInception, env: DistEnv | None = None,
                        batch_size: int = 50, num_workers: int = 4, progress: bool = True,
                        desc: str = "Inception features", spatial: bool = False, dinov2=None):
    """Pool features (N, 2048), logits (N, 1008), sFID's (N, 2023) with `spatial`, DINOv2's (N, D),
    on every rank, of a whole set: an ImageFolder, NpzImages, uint8 numpy NHWC or torch NCHW."""
    env = env or DistEnv(0, 0, 1, next(model.parameters()).device)
    batches = [[out.float().cpu() for out in outputs] for outputs in _forward(
        images, model, env, batch_size, num_workers, desc, progress, dinov2=dinov2)]
    keep = [0, 1] + [2] * spatial + [3] * (dinov2 is not None)  # pool, logits, spatial, DINOv2
    columns = [gather_rows(torch.cat([b[i] for b in batches]) if batches else torch.zeros(0, 0),
                           env) for i in keep]
    if (skipped := count_skipped(images, env)) and env.is_main:  # a collective: on every rank
        warnings.warn(f"{desc}: {skipped} unreadable files were replaced by readable neighbours: "
                      "remove or repair them for an exact FID")
    return tuple(c.numpy() for c in columns)


@torch.inference_mode()
def precision_recall(real_feats, fake_feats, device, k: int = 3, batch_size: int = 1024):
    """Improved precision and recall (Kynkaanniemi et al. 2019) as ADM's evaluator: the fraction of
    fake points within the k-th nearest neighbour radius of a real point, and vice versa."""
    real, fake = (torch.as_tensor(np.asarray(f), dtype=torch.float32, device=device)
                  for f in (real_feats, fake_feats))
    if min(len(real), len(fake)) <= k:
        raise UserError(f"precision/recall need more than k={k} points per set, got {len(real)} "
                        f"and {len(fake)}")

    def radii(x):  # distance from each point to its k-th nearest neighbour in its own set, (N,)
        return torch.cat([torch.cdist(rows, x).kthvalue(k + 1, dim=1).values  # k + 1: not itself
                          for rows in x.split(batch_size)])

    def covered(x, y, radius):  # the fraction of x's points within radius[j] of a point y[j]
        return torch.cat([(torch.cdist(rows, y) <= radius).any(1) for rows in x.split(batch_size)]
                         ).float().mean().item()

    with exact_float32(torch.device(device)):  # row blocks at a time (ADM: float16 where it fits)
        return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


@torch.inference_mode()
def dataset_statistics(source, model: FIDInception, env: DistEnv, out: str, batch_size: int = 50,
                       num_workers: int = 4, save_every: int = 50_000, dinov2=None):
    """Statistics of a large set, to `out`: rank shares folded into Moments, saved with what they
    are of to <out>.partial/ every `save_every` images (a killed run resumes), merged on rank 0."""
    how, folder = getattr(model, "preprocess", "adm"), isinstance(source, ImageFolder)
    size = f"crop {source.image_size}" if folder else "{}x{}".format(*source.shape[1:3])
    what = (f"{os.path.abspath(source.root if folder else source.path)} ({len(source)} images, "
            f"{size}, {how} preprocessing{'' if dinov2 is None else ', DINOv2'})")
    part_dir = out + ".partial"
    name = lambda r, end: os.path.join(part_dir, f"rank{r}_of_{env.world_size}{end}")  # noqa: E731
    part, done = name(env.rank, ".pt"), name(env.rank, ".done.pt")
    dims = [*model.dims] + ([] if dinov2 is None else [dinov2.embed_dim])  # pool, spatial, DINOv2
    moments = [Moments(d, env.device) for d in dims]

    def load(path, into):
        state = torch.load(path, map_location=into[0].mean.device, weights_only=True)
        if state["input"] != what:
            raise UserError(f"{part_dir} holds a partial pass over {state['input']}, not over "
                            f"{what}: delete it, or resume with the same input and flags")
        for m, s in zip(into, state["moments"]):
            m.merge(s["count"], s["mean"], s["scatter"])

    if os.path.exists(done) or os.path.exists(part):
        load(done if os.path.exists(done) else part, moments)
    if not os.path.exists(done):
        for pool, _, *rest in _forward(source, model, env, batch_size, num_workers, "statistics",
                                       skip=moments[0].count, dinov2=dinov2):
            for m, rows in zip(moments, (pool, *rest)):
                m.add(rows)
            if moments[0].count // save_every > (moments[0].count - len(pool)) // save_every:
                save_checkpoint({"input": what, "moments": [vars(m) for m in moments]}, part)
        save_checkpoint({"input": what, "moments": [vars(m) for m in moments]}, done)
    if not env.is_main:
        return None
    paths = [name(r, ".done.pt") for r in range(env.world_size)]
    while not all(map(os.path.exists, paths)):  # ranks may finish minutes apart: no collective
        time.sleep(1)
    total = [Moments(d) for d in dims]
    for path in paths:
        load(path, total)
    stats = FIDStatistics.from_moments(*total, preprocess=how)
    stats.save(out)
    shutil.rmtree(part_dir)
    return stats


def check_statistics(stats, what: str, model, prc: bool, sfid: bool, dinov2=None):
    """Before any feature is computed: can `stats`, if statistics, give what was asked?"""
    if not isinstance(stats, FIDStatistics):
        return
    name, how = stats.path or f"the {what} statistics", getattr(model, "preprocess", "adm")
    if prc and stats.features is None and stats.images is None:
        raise UserError(f"{name} has only mu/sigma, no features for --prc: see --prc --save_stats")
    if sfid and stats.mu_s is None:
        raise UserError(f"{name} has no spatial statistics (mu_s, sigma_s) for sFID (--no_sfid)")
    if dinov2 is not None and stats.mu_dinov2 is None and stats.images is None:
        raise UserError(f"{name} has no DINOv2 statistics nor images: see --save_stats --fd_dinov2")
    if stats.preprocess != how:
        raise UserError(f"{name} holds statistics of {stats.preprocess} preprocessing, this run "
                        f"uses {how}: pass --preprocess {stats.preprocess} or recompute them")
    dims = (*model.dims, getattr(dinov2, "embed_dim", 0))
    for (key, _), want, kind in zip(PAIRS, dims, ("Inception pool", "Inception spatial", "DINOv2")):
        got = getattr(stats, key)
        if want and got is not None and got.size != want:
            raise UserError(f"{name}: its {key} has {got.size} dimensions but this run's {kind} "
                            f"features have {want}: statistics of another network or layer")


def _statistics(src, what: str, model, env: DistEnv, prc: bool, sfid: bool, dinov2, **extract):
    """(rank 0's FIDStatistics, logits or None) of one side; stored statistics' images fill gaps."""
    if isinstance(src, FIDStatistics):
        dino = dinov2 if src.mu_dinov2 is None else None
        if prc and src.features is None or dino is not None:
            pool, _, *rest = compute_activations(src.images, model, env, desc=f"{what} features",
                                                 dinov2=dino, **extract)
            fits = _moments(rest[0], what).fit() if rest else (src.mu_dinov2, src.sigma_dinov2)
            src = dataclasses.replace(src, **dict(zip(PAIRS[2], fits)), features=pool
                                      if src.features is None else src.features)
        return src, None
    pool, logits, *rest = compute_activations(src, model, env, spatial=sfid, dinov2=dinov2,
                                              desc=f"{what} features", **extract)
    stats = FIDStatistics.from_features(  # float64 moments: on one rank
        pool, rest[0] if sfid else None, rest[-1] if dinov2 is not None else None, keep=prc,
        name=what, preprocess=getattr(model, "preprocess", "adm")) if env.is_main else None
    return stats, logits


def evaluate(samples, reference, *, model: FIDInception, env: DistEnv | None = None,
             batch_size: int = 50, num_workers: int = 4, prc: bool = False, sfid: bool = True,
             reference_from_images=False, save_stats=None, progress=True, log=None, dinov2=None):
    """FID, sFID, IS, precision/recall (`prc`), FD_DINOv2 (`dinov2`) of `samples` against
    `reference` (paths, load_source's objects, uint8 images), on every rank."""
    env = env or DistEnv(0, 0, 1, next(model.parameters()).device)
    log = log or Logger(env).info  # rank 0's
    sides = [load_source(os.fspath(s), None, log, reference_from_images)
             if isinstance(s, (str, os.PathLike)) else s for s in (samples, reference)]
    for what, src in zip(("samples", "reference"), sides):  # before the expensive part
        check_statistics(src, what, model, prc, sfid, dinov2)
    extract = dict(batch_size=batch_size, num_workers=num_workers, progress=progress)
    (fake, logits), (real, _) = (_statistics(src, what, model, env, prc, sfid, dinov2, **extract)
                                 for src, what in zip(sides, ("samples", "reference")))
    result = None
    if env.is_main:
        stored = isinstance(sides[1], FIDStatistics)
        if save_stats and not stored:
            real.save(save_stats)
            log(f"reference statistics ({real.num_images} images) -> {save_stats}")
        result = {"fid": fake.frechet_distance(real), "num_samples": fake.num_images,
                  "reference": f"the stored statistics of {real.path or 'the given reference'}"
                  if stored else f"{real.num_images} reference images featurised here",
                  "num_reference": max(real.num_images, 0) or None}
        if sfid:
            result["sfid"] = fake.frechet_distance(real, "mu_s")
        if dinov2 is not None:
            result.update(fd_dinov2=fake.frechet_distance(real, "mu_dinov2"),
                          dinov2_weights=dinov2.weights_name)
        if logits is not None:  # ADM: parts of 5000 samples (10 for 50K)
            result["inception_score"], result["inception_score_std"] = inception_score(logits)
            result["inception_score_splits"] = math.ceil(len(logits) / 5000)
        if prc:
            result["precision"], result["recall"] = precision_recall(
                real.features, fake.features, device=env.device)
            result["num_prc_reference"] = len(real.features)
        result.update(inception_weights=model.weights_name, preprocess=real.preprocess,
                      labelling=getattr(sides[0], "labelling", None))  # as sample.py records it
    box = [result]
    if env.distributed:  # every rank returns the same (small) dict
        dist.broadcast_object_list(box, src=0)
    return box[0]


def result_line(r: dict) -> str:
    """One line of an evaluate() result, naming the reference and the preprocessing."""
    names = {"fid": "FID", "sfid": "sFID", "fd_dinov2": "FD_DINOv2", "inception_score": "IS",
             "inception_score_std": "+-", "precision": "precision", "recall": "recall"}
    line = "  ".join(f"{name} {r[key]:.4f}" for key, name in names.items() if key in r)
    how = "".join(f", {r[k]} {s}" for k, s in (("preprocess", "preprocessing"),
                                                ("labelling", "labels")) if r.get(k))
    return line + f"  ({r['num_samples']} samples vs {r['reference']}{how})"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="SAMPLES REFERENCE (folders or .npz), or one PATH with --save_stats")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--save_stats", help="write REFERENCE's (the one PATH's) statistics here")
    p.add_argument("--save_every", type=int, default=50_000, help="one PATH: images/rank per save")
    p.add_argument("--reference_from_images", action="store_true",
                   help="featurise a reference batch's images, not use its mu/sigma")
    p.add_argument("--no_sfid", action="store_true", help="no sFID (for a reference without mu_s)")
    p.add_argument("--prc", action="store_true", help="also precision and recall (N^2 distances)")
    p.add_argument("--preprocess", choices=PREPROCESSING, default="adm",
                   help="adm: as ADM's evaluator; pytorch-fid: as pytorch-fid and torchmetrics")
    p.add_argument("--batch_size", type=at_least(1), default=50, help="images per pass per rank")
    p.add_argument("--num_workers", type=int, default=4, help="image decoding workers")
    p.add_argument("--image_size", type=int, help="folders' crop (default: first image's side)")
    p.add_argument("--inception_ckpt", help=f"local {os.path.basename(FID_WEIGHTS_URL)}")
    p.add_argument("--random_inception", action="store_true", help="random weights (tests, demo)")
    p.add_argument("--fd_dinov2", action="store_true", help="also FD_DINOv2 (DINOv2 ViT-L/14)")
    p.add_argument("--dinov2_ckpt", help="local dinov2_vitl14_pretrain.pth")
    p.add_argument("--random_dinov2", action="store_true", help="random weights (tests, demo)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    if not (len(args.paths) == 2 or len(args.paths) == 1 and args.save_stats):
        p.error("give SAMPLES and REFERENCE, or one path with --save_stats")
    return args


def main(argv=None):
    args = parse_args(argv)
    env = setup_distributed(args.device)
    log = Logger(env).info
    one = len(args.paths) == 1  # statistics only
    sources = [load_source(p, args.image_size, log, args.reference_from_images or one)
               for p in args.paths]  # before any work
    if args.save_stats and isinstance(sources[-1], FIDStatistics):  # nothing to compute
        raise UserError(f"{args.paths[-1]} is already a statistics file: drop --save_stats")
    inputs = {os.path.realpath(p): p for p in (*args.paths, args.inception_ckpt, args.dinov2_ckpt)
              if p}
    for flag, out, what in (("--json", args.json, "results file"),
                            ("--save_stats", args.save_stats, "statistics file")):
        if out and os.path.realpath(out) in inputs:
            raise UserError(f"{flag} {out} is the input {inputs[os.path.realpath(out)]}")
        if out and env.is_main:
            check_writable(out, what)
    model = load_inception(args.inception_ckpt, args.random_inception, env.device,
                           preprocess=args.preprocess)
    dinov2 = (load_dinov2(args.dinov2_ckpt, args.random_dinov2, env.device) if args.fd_dinov2
              else None)
    extract = dict(batch_size=args.batch_size, num_workers=args.num_workers, dinov2=dinov2)
    result = None
    if not one:
        result = evaluate(*sources, model=model, env=env, prc=args.prc, sfid=not args.no_sfid,
                          save_stats=args.save_stats, log=log, **extract)
        result = {"samples": args.paths[0], "reference_path": args.paths[1], **result}
        log(result_line(result))
    elif args.prc:  # with the features: one pass in memory
        stats = _statistics(sources[0], args.paths[0], model, env, True, True, **extract)[0]
    else:  # from running sums, resumable
        stats = dataset_statistics(sources[0], model, env, args.save_stats,
                                   save_every=args.save_every, **extract)
    if one and env.is_main:
        if args.prc:
            stats.save(args.save_stats)
        result = dict(images=args.paths[0], num_images=stats.num_images, statistics=args.save_stats,
                      preprocess=args.preprocess, inception_weights=model.weights_name,
                      dinov2_weights=getattr(dinov2, "weights_name", None))
        log(f"statistics of {stats.num_images} images written to {args.save_stats}")
    if env.is_main and args.json:
        save_json(result, args.json)
        log(f"results written to {args.json}")
    cleanup_distributed()
    return result


if __name__ == "__main__":
    script_main(main)
