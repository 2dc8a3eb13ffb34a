"""Evaluation: FID, sFID, Inception Score and precision/recall of generated samples (and rFID of
reconstructions) as ADM's evaluator computes them (guided-diffusion evaluations/), which the
paper's, LightningDiT's and VA-VAE's ImageNet 256x256 numbers come from.

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --prc --json fid.json
    torchrun --nproc_per_node=8 fid.py /data/imagenet/train --image_size 256 --save_stats t.npz

- The network: inception.py's FID Inception-v3, fed as ADM feeds the TF graph (`--preprocess
  pytorch-fid` to compare with pytorch-fid's numbers), in true float32. One forward pass gives the
  pool features (FID, precision/recall), the logits (IS) and sFID's spatial features.
- A source: a folder of images (ADM's centre crop), an ADM `.npz` (`arr_0`, uint8 NHWC, as
  sample.py writes it), or statistics (`.npz` with ADM's keys `mu`, `sigma`, `mu_s`, `sigma_s`).
- A reference batch with stored statistics (ADM's: the ImageNet training set's, and 10,000 images)
  is used as ADM uses it: FID and sFID against the statistics, precision/recall against the images.
- `--fd_dinov2`: also FD_DINOv2, on DINOv2 ViT-L/14 features as dgm-eval computes it (README).
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
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from common import (DistEnv, HelpFormatter, Logger, UserError, at_least, atomic_write,
                    check_writable, cleanup_distributed, save_json, script_main, setup_distributed)
from data import ImageFolder, count_skipped, eval_loader
from inception import FID_WEIGHTS_URL, PREPROCESSING, FIDInception, load_inception
from tokenizer import build_dinov2

PAIRS = (("mu", "sigma"), ("mu_s", "sigma_s"), ("mu_dinov2", "sigma_dinov2"))  # stored statistics


@contextlib.contextmanager
def exact_float32(device: torch.device):
    """True float32 in the body: no autocast (a caller's bf16 context would change the features)
    and no TF32 (the training scripts turn it on; its 10-bit mantissa moves FID)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ---- Gaussian statistics of the features, and the Frechet distance between them -----------------
class Moments:
    """Count, mean and scatter S = sum (x - mean)(x - mean)^T of feature rows in float64, merged a
    batch at a time by Chan et al.'s pairwise update: as exact as two passes over the data (float32
    sums of outer products lose the digits FID needs), and mergeable across ranks and resumes."""

    def __init__(self, dim: int, device="cpu"):
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.scatter = torch.zeros((dim, dim), dtype=torch.float64, device=device)

    def add(self, rows) -> "Moments":
        x = torch.as_tensor(rows).to(self.mean.device, torch.float64)  # (b, dim)
        mean = x.mean(0)
        return self.merge(x.shape[0], mean, (x - mean).T @ (x - mean))

    def merge(self, count: int, mean, scatter) -> "Moments":
        n, delta = self.count + count, mean.to(self.mean.device) - self.mean
        self.scatter += scatter.to(self.mean.device) + torch.outer(delta, delta) * (
            self.count * count / n)
        self.mean += delta * (count / n)
        self.count = n
        return self


def _moments(feats, name: str) -> Moments:
    """Moments of features (N, D), refusing what gives no meaningful covariance."""
    feats = np.asarray(feats, dtype=np.float32)
    n, d = feats.shape
    if n < 2:
        raise UserError(f"{name}: {n} image(s); a covariance needs at least 2 (FID: 50,000)")
    if not np.isfinite(feats).all():
        raise UserError(f"{name}: the features contain NaN/inf (a corrupt weights file?)")
    if n < d:
        warnings.warn(f"{name}: {n} images < {d} feature dimensions: the covariance is rank-"
                      "deficient, FID biased upwards and not comparable to published numbers (use "
                      "50,000 samples; at least 10,000)", stacklevel=3)
    moments = Moments(d)
    for i in range(0, n, 4096):  # float64 a chunk at a time
        moments.add(torch.from_numpy(feats[i: i + 4096]))
    return moments


@dataclasses.dataclass
class FIDStatistics:
    """Gaussian fits to a set's Inception features, float64: mean (2048,) and covariance
    (2048, 2048) of the pool features (FID), `mu_s`, `sigma_s` of the spatial ones (sFID), if known.
    `features` (N, 2048) when precision/recall need the points; `images`: an ADM reference batch's
    own images, which precision/recall use instead; `preprocess`: see inception.py (Inception's
    input only); `mu_dinov2`, `sigma_dinov2`: of the DINOv2 features (FD_DINOv2), if known."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    features: np.ndarray | None = None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    images: object = None  # NpzImages
    path: str | None = None  # the file it came from
    preprocess: str = "adm"
    mu_dinov2: np.ndarray | None = None
    sigma_dinov2: np.ndarray | None = None

    @classmethod
    def from_moments(cls, pool: Moments, spatial: Moments | None = None,
                     dinov2: Moments | None = None, **kw):
        fits = {k: v for keys, m in zip(PAIRS[1:], (spatial, dinov2)) if m
                for k, v in zip(keys, _fit(m))}  # mu_s, sigma_s, mu_dinov2, sigma_dinov2
        return cls(*_fit(pool), pool.count, **fits, **kw)

    @classmethod
    def from_features(cls, features, keep_features: bool = False, name: str = "features",
                      spatial=None, preprocess: str = "adm", dinov2=None):
        """Of pool `features` (N, 2048), and of `spatial` (N, 2023) and `dinov2` (N, D) if given."""
        kept = np.asarray(features, np.float32) if keep_features else None
        spatial, dinov2 = (None if f is None else _moments(f, name) for f in (spatial, dinov2))
        return cls.from_moments(_moments(features, name), spatial, dinov2, features=kept,
                                preprocess=preprocess)

    def save(self, path: str):
        """ADM's keys (so also a pytorch-fid statistics file), `num_images`, `preprocess`, and the
        features if kept, atomically."""
        arrays = {"mu": self.mu, "sigma": self.sigma, "num_images": np.int64(self.num_images),
                  "preprocess": self.preprocess}
        arrays.update({k: getattr(self, k) for pair in PAIRS[1:] for k in pair
                       if getattr(self, pair[0]) is not None})
        if self.features is not None:
            arrays["features"] = self.features.astype(np.float32)
        atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str, npz):
        got = {k: np.asarray(npz[k], np.float64) for pair in PAIRS for k in pair if k in npz.files}
        for m, s in PAIRS:
            if (m in got) != (s in got) or m in got and not (
                    got[m].ndim == 1 and got[s].shape == (got[m].size,) * 2
                    and np.isfinite(got[m]).all() and np.isfinite(got[s]).all()):
                shapes = [got[k].shape if k in got else "missing" for k in (m, s)]
                raise UserError(f"{path}: {m} {shapes[0]} and {s} {shapes[1]} are not finite "
                                "statistics (D,) and (D, D); recompute them")
        feats = npz["features"] if "features" in npz.files else None
        num_images = int(npz["num_images"]) if "num_images" in npz.files else (
            len(feats) if feats is not None else -1)  # -1: unknown (ADM's, pytorch-fid's)
        # Without the key: ADM's reference batches (mu_s, no num_images) as ADM feeds TF; else
        # pytorch-fid's files (mu, sigma) or ours from before the key (num_images): pytorch-fid's
        how = str(npz["preprocess"]) if "preprocess" in npz.files else (
            "adm" if "mu_s" in npz.files and "num_images" not in npz.files else "pytorch-fid")
        return cls(num_images=num_images, features=feats, path=path, preprocess=how, **got)

    def frechet_distance(self, other: "FIDStatistics", spatial: bool = False) -> float:
        if self.preprocess != other.preprocess:
            raise UserError(f"{self.path or 'one side'} comes from {self.preprocess} preprocessing,"
                            f" {other.path or 'the other'} from {other.preprocess}: an FID across "
                            "the two would be meaningless")
        keys = ("mu_s", "sigma_s") if spatial else ("mu", "sigma")
        return frechet_distance(*(getattr(s, k) for s in (self, other) for k in keys))

    def spatial_distance(self, other: "FIDStatistics") -> float:
        """sFID: the same Frechet distance on the spatial features' statistics."""
        return self.frechet_distance(other, spatial=True)

    def dinov2_distance(self, other: "FIDStatistics") -> float:
        """FD_DINOv2: on the DINOv2 features' statistics (always of dgm-eval's preprocessing)."""
        return frechet_distance(*(getattr(s, k) for s in (self, other) for k in PAIRS[2]))


def _fit(m: Moments):  # (mean, unbiased covariance as np.cov's), float64 numpy
    return m.mean.cpu().numpy(), (m.scatter / (m.count - 1)).cpu().numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)), the Frechet distance of two Gaussians.

    Not scipy.linalg.sqrtm(S1 @ S2) as pytorch-fid and ADM do: S1 S2 is not symmetric, its general
    square root is fragile on near-singular covariances, and one BLAS build got it wrong (FIDs of
    20-40 instead of 2). With R = sqrt(S1), tr sqrt(S1 S2) = sum_i sqrt(lambda_i(R S2 R)), from
    symmetric eigendecompositions in float64. Eigenvalues of S1, S2 at round-off level count as 0,
    and R S2 R keeps its min(rank S1, rank S2) largest (a threshold on its own, which scale like
    lambda(S)^2, would drop genuine small variances). Two identities check the linear algebra."""
    mu1, s1, mu2, s2 = (torch.as_tensor(np.asarray(a, np.float64))
                        for a in (mu1, sigma1, mu2, sigma2))
    if s1.ndim != 2 or mu1.shape != mu2.shape or s1.shape != s2.shape or len(s1) != len(mu1):
        raise UserError(f"statistics do not match: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                        f"sigma {tuple(s1.shape)} vs {tuple(s2.shape)}")
    if not all(torch.isfinite(a).all() for a in (mu1, s1, mu2, s2)):
        raise UserError("the statistics contain NaN/inf: recompute them")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2  # covariances are symmetric only up to round-off

    def above_round_off(w):  # eigenvalues (d,) of a covariance; those at round-off level -> 0
        return torch.where(w > w.numel() * torch.finfo(w.dtype).eps * w.abs().max(), w, 0.0)

    # One thread: LAPACK's eigensolvers synchronise their threads thousands of times per call, which
    # on a busy machine takes 27 s with 2 threads against 3.7 s with 1 (2048x2048, 2 loaded cores).
    threads = torch.get_num_threads()
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
        raise RuntimeError("frechet_distance: the linear algebra library returned inconsistent "
                           f"results (sum of eigenvalues {eig_m.sum().item():.6g} vs tr(S1 S2) "
                           f"{tr_s1s2:.6g}; tr sqrt(S1 S2) {tr_sqrt:.6g} vs bound {bound:.6g}): "
                           "the installation is broken and the FID would be wrong")
    diff = mu1 - mu2
    return max((diff @ diff).item() + tr1 + tr2 - 2 * tr_sqrt, 0.0)  # >= 0 but for round-off


# ---- Image sources: a folder, an ADM .npz, uint8 images in memory, or saved statistics ----------
def as_nchw_uint8(images) -> torch.Tensor:
    """Images as uint8 (B, 3, H, W): numpy arrays are NHWC (ADM's .npz), torch tensors NCHW."""
    numpy = isinstance(images, np.ndarray)
    if numpy and images.ndim == 4 and images.shape[-1] == 3:  # copy read-only memory (memmaps)
        ok = images.flags.writeable and images.flags.c_contiguous
        images = torch.from_numpy(images if ok else np.array(images)).permute(0, 3, 1, 2)
    elif not (torch.is_tensor(images) and images.ndim == 4 and images.shape[1] == 3):
        raise UserError(f"expected uint8 images, numpy NHWC (N, H, W, 3) or torch NCHW, got "
                        f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}")
    if images.dtype != torch.uint8:
        raise UserError(f"expected uint8 images in 0..255, got {images.dtype}: FID is defined on "
                        "the quantised images you would save (data.to_uint8 makes them)")
    return images


class NpzImages:
    """The `arr_0` images of an ADM .npz (uint8 NHWC), streamed: each rank reads its contiguous
    share a batch at a time, so 50K images at 256 px (9.8 GB) are never held in memory.
    `labelling`: how sample.py drew the labels (`labelling` in the .npz), if it says."""

    def __init__(self, path: str, labelling: str | None = None):
        self.path, self.labelling = path, labelling
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            self.shape, self.dtype = self._header(f)
        if self.dtype.hasobject:
            raise UserError(f"{path}: 'arr_0' holds Python objects, which is what np.savez makes "
                            "of images of different sizes: crop them to one size, or use a folder")
        if len(self.shape) == 0 or self.shape[0] == 0:
            raise UserError(f"{path}: 'arr_0' has shape {self.shape}, no images")
        as_nchw_uint8(np.zeros((1, *self.shape[1:]), self.dtype))  # the layout and dtype, now

    def _header(self, f):
        """(shape, dtype) from the .npy stream `f`, left at the start of the data."""
        fmt = np.lib.format
        read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else (
            fmt.read_array_header_2_0)
        shape, fortran_order, dtype = read(f)
        if fortran_order:
            raise UserError(f"{self.path}: arr_0 is in Fortran order; save the images with "
                            "np.savez(path, arr_0=np.ascontiguousarray(images))")
        return shape, dtype

    def __len__(self):
        return self.shape[0]

    def batches(self, batch_size: int, env: DistEnv, skip: int = 0):
        """This rank's images [N r / W, N (r + 1) / W), less its first `skip`, in (b, H, W, 3)."""
        n, item = len(self), int(np.prod(self.shape[1:])) * self.dtype.itemsize
        start, stop = n * env.rank // env.world_size + skip, n * (env.rank + 1) // env.world_size
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
            self._header(f)
            f.seek(start * item, os.SEEK_CUR)
            for i in range(start, stop, batch_size):
                b = min(batch_size, stop - i)
                yield np.frombuffer(f.read(b * item), self.dtype).reshape(b, *self.shape[1:])


def load_source(path: str, image_size: int | None = None, log=print, from_images: bool = False):
    """What a path names: a folder -> `data.ImageFolder`, centre-cropped to `image_size` (default:
    the first readable image's short side, right for samples; 256 for ImageNet); an .npz with `mu`
    -> `FIDStatistics`, with an ADM reference batch's images (`arr_0`) in `.images`; an .npz with
    only `arr_0`, or with `from_images` -> `NpzImages`."""
    if os.path.isdir(path):
        folder = ImageFolder(path, image_size or 0)
        for file, _ in [] if image_size else folder.samples:
            try:
                with Image.open(file) as img:
                    folder.image_size = min(img.size)
                    break
            except (OSError, ValueError, SyntaxError):
                continue  # unreadable: ImageFolder warns about it when it meets it
        return folder
    try:
        npz = np.load(path, allow_pickle=False)
        files = npz.files  # a plain .npy has none
    except Exception as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e}); expected a folder of "
                        "images, an ADM .npz (arr_0) or a statistics .npz (mu, sigma)") from None
    with npz:
        if "mu" in files and not (from_images and "arr_0" in files):
            stats = FIDStatistics.load(path, npz)
            stats.images = NpzImages(path) if "arr_0" in files else None
            return stats
        labelling = str(npz["labelling"]) if "labelling" in files else None
    if "arr_0" not in files:
        raise UserError(f"{path} has arrays {files}; expected 'arr_0' (images, uint8 NHWC, as ADM "
                        "and sample.py write them) or 'mu' and 'sigma' (statistics)")
    if "mu" in files:
        log(f"{path}: featurising its images (arr_0) here, not using its stored mu/sigma")
    return NpzImages(path, labelling)


# ---- FD_DINOv2's network, as dgm-eval runs it ---------------------------------------------------
def load_dinov2(ckpt: str | None = None, random_weights: bool = False, device="cpu"):
    """DINOv2 ViT-L/14 with the official weights (the file the tokenizer's stage 1 loads), loaded
    strictly; `random_weights`: a random one-block DINOv2 (384-d features), for tests, the demo."""
    with torch.random.fork_rng(devices=[]):  # random weights: the same in every run
        torch.manual_seed(0)
        net = build_dinov2("tiny" if random_weights else "dinov2_vitl14", not random_weights,
                           ckpt, ("--dinov2_ckpt", "--random_dinov2")).eval().requires_grad_(False)
    net.weights_name = "RANDOM (tiny, test only)" if random_weights else ckpt or "dinov2_vitl14"
    return net.to(device)


def dinov2_input(images) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> DINOv2's input (B, 3, 224, 224) as dgm-eval makes it: PIL's
    antialiased bicubic resize of the uint8 image straight to 224x224 (torchvision's Resize((224,
    224)) of a PIL image; torch's bicubic does not match it), /255, ImageNet's mean and std."""
    resized = [np.asarray(Image.fromarray(im.permute(1, 2, 0).numpy()).resize(
        (224, 224), Image.BICUBIC)) for im in images.cpu()]  # each (224, 224, 3) uint8
    x = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 255
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in ((0.485, 0.456, 0.406),
                                                         (0.229, 0.224, 0.225)))  # ImageNet's
    return (x - mean) / std


# ---- Feature extraction -------------------------------------------------------------------------
def gather_rows(local: torch.Tensor, env: DistEnv, interleaved: bool) -> torch.Tensor:
    """Every rank's rows of a 2-D tensor (ranks may hold different numbers), on every rank, on the
    CPU: in rank order, or with `interleaved` (rank r held items r, r + W, ...: data.eval_loader)
    back in dataset order."""
    if not env.distributed:
        return local
    parts = [None] * env.world_size
    dist.all_gather_object(parts, local.cpu())  # pickled: shapes may differ
    if not interleaved:
        return torch.cat([p for p in parts if len(p)])
    out = torch.empty(sum(map(len, parts)), max(p.shape[1] for p in parts))
    for r, p in enumerate(parts):
        if len(p):  # a rank may have had no items
            out[r::env.world_size] = p
    return out


def _forward(images, model, env: DistEnv, batch_size: int, num_workers: int, desc: str,
             progress: bool = True, skip: int = 0, dinov2=None):
    """The network's (pool, logits, spatial) features, and `dinov2`'s if given, in true float32, of
    each batch of this rank's share of a set, less its first `skip` images. A folder's images are
    decoded by workers, rank r taking items r, r + W, ... (data.eval_loader); arrays are split in
    contiguous shares."""
    if isinstance(images, ImageFolder):
        workers = min(num_workers, len(os.sched_getaffinity(0)))
        batches = eval_loader(images, batch_size, env, num_workers=workers, skip=skip)
    elif isinstance(images, NpzImages):
        batches = images.batches(batch_size, env, skip)
    else:  # in memory
        images = as_nchw_uint8(images)  # (N, 3, H, W)
        n, r, w = len(images), env.rank, env.world_size
        start, stop = n * r // w + skip, n * (r + 1) // w
        batches = (images[i: min(i + batch_size, stop)] for i in range(start, stop, batch_size))
    if len(images) == 0:  # on every rank, before any collective
        raise UserError(f"{desc}: no images (an empty folder or array?)")
    device = next(model.parameters()).device
    bar = tqdm(total=len(images), initial=skip * env.world_size, desc=desc, unit="img",
               dynamic_ncols=True, disable=not (progress and env.is_main))
    with exact_float32(device), bar:
        for batch in batches:
            batch = batch[0] if isinstance(batch, (list, tuple)) else batch  # (images, labels)
            x = as_nchw_uint8(batch)  # (B, 3, H, W) uint8
            out = model(x.to(device, non_blocking=True).float(), spatial=True)  # from 0..255
            if dinov2 is not None:  # (B, D)
                out = (*out, dinov2(dinov2_input(x).to(device), cls=True))
            yield out
            bar.update(len(x) * env.world_size)


@torch.inference_mode()
def compute_activations(images, model: FIDInception, env: DistEnv | None = None,
                        batch_size: int = 50, num_workers: int = 4, progress: bool = True,
                        desc: str = "Inception features", spatial: bool = False, dinov2=None):
    """Pool features (N, 2048) and logits (N, 1008) of a set of images, with `spatial` sFID's
    (N, 2023), and last with `dinov2` (load_dinov2) FD_DINOv2's (N, D), from the same pass: float32
    numpy, the same on every rank. `images`, the whole set (split over the ranks here): a folder
    (ImageFolder), NpzImages, or uint8 images in memory (numpy NHWC or torch NCHW)."""
    env = env or DistEnv(0, 0, 1, next(model.parameters()).device)
    columns = [[], [], [], []]  # pool, logits, spatial, DINOv2: tensors per batch
    for outputs in _forward(images, model, env, batch_size, num_workers, desc, progress,
                            dinov2=dinov2):
        for rows, out in zip(columns, outputs):
            rows.append(out.float().cpu())
    folder = isinstance(images, ImageFolder)  # its rows are interleaved over the ranks
    keep = [0, 1] + [2] * spatial + [3] * (dinov2 is not None)
    columns = [gather_rows(torch.cat(columns[i]) if columns[i] else torch.zeros((0, 0)), env,
                           folder) for i in keep]
    skipped = count_skipped(images, env)
    if skipped and env.is_main:
        warnings.warn(f"{desc}: {skipped} unreadable files were replaced by their next readable "
                      "neighbour (see the warnings above); remove or repair them for an exact FID")
    return tuple(c.numpy() for c in columns)


# ---- Inception Score and precision/recall -------------------------------------------------------
def inception_score(logits, split_size: int = 5000) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) from logits (N, 1008), as ADM computes it: softmax over all 1008
    outputs, consecutive parts of `split_size` images (10 parts for 50K; the last may be shorter),
    each with its own marginal p(y). Returns (mean, std) over the parts."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise UserError(f"inception_score needs (N, classes) logits, got {tuple(logits.shape)}")
    scores = []
    for part in F.log_softmax(logits, dim=1).split(split_size):  # log p(y|x): no log(0)
        log_marginal = torch.logsumexp(part, dim=0) - math.log(part.shape[0])  # log p(y), this part
        scores.append((part.exp() * (part - log_marginal)).sum(1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


@torch.inference_mode()
def precision_recall(real_feats, fake_feats, k: int = 3, batch_size: int = 1024,
                     device=None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k = 3, as ADM's evaluator: each
    set's manifold is the union of balls around its points reaching the k-th nearest neighbour.
    Precision: the fraction of fake points inside the real manifold; recall: real points inside the
    fake one. Distances a block of rows at a time, in float32 (ADM: float16 where it fits)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    real, fake = (torch.as_tensor(np.asarray(f), dtype=torch.float32, device=device)
                  for f in (real_feats, fake_feats))
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1] or min(
            len(real), len(fake)) <= k:
        raise UserError(f"precision_recall needs (N, D) features of equal D and more than k={k} "
                        f"points per set, got {tuple(real.shape)} and {tuple(fake.shape)}")

    def radii(x):  # distance from each point to its k-th nearest neighbour in its own set, (N,)
        return torch.cat([torch.cdist(x[i: i + batch_size], x).kthvalue(k + 1, dim=1).values
                          for i in range(0, len(x), batch_size)])  # k + 1: not the point itself

    with exact_float32(device):
        radius_real, radius_fake = radii(real), radii(fake)
        fake_in_real = torch.zeros(len(fake), dtype=torch.bool, device=device)
        real_in_fake = torch.zeros(len(real), dtype=torch.bool, device=device)
        for i in range(0, len(real), batch_size):  # one pass over real-fake distances serves both
            d = torch.cdist(real[i: i + batch_size], fake)  # (b, N_fake)
            fake_in_real |= (d <= radius_real[i: i + batch_size, None]).any(0)
            real_in_fake[i: i + batch_size] = (d <= radius_fake[None, :]).any(1)
    return fake_in_real.float().mean().item(), real_in_fake.float().mean().item()


# ---- Whole-set statistics, and samples against a reference --------------------------------------
@torch.inference_mode()
def dataset_statistics(source, model: FIDInception, env: DistEnv, out: str, batch_size: int = 50,
                       num_workers: int = 4, save_every: int = 50_000,
                       dinov2=None) -> FIDStatistics | None:
    """Pool, spatial (and `dinov2`'s) statistics of a large set (e.g. the 1.28M ImageNet training
    images) written to `out`, without holding its features: each rank folds its share into Moments,
    saved every `save_every` images to <out>.partial/ with what they are of, from where a killed run
    on the same input resumes (with as many ranks); rank 0 merges them. On rank 0, else None."""
    how, folder = getattr(model, "preprocess", "adm"), isinstance(source, ImageFolder)
    what = "{} ({} images, {}, {} preprocessing{})".format(
        os.path.abspath(source.root if folder else source.path), len(source),
        f"crop {source.image_size}" if folder else "{}x{}".format(*source.shape[1:3]), how,
        "" if dinov2 is None else ", DINOv2")
    part_dir, world = out + ".partial", env.world_size
    name = lambda r, end: os.path.join(part_dir, f"rank{r}_of_{world}{end}")  # noqa: E731
    part, done = name(env.rank, ".npz"), name(env.rank, ".done.npz")
    dims = [*model.dims] + ([] if dinov2 is None else [dinov2.embed_dim])  # pool, spatial, DINOv2
    moments = [Moments(d, next(model.parameters()).device) for d in dims]

    def load(path, into):
        with np.load(path, allow_pickle=False) as z:
            was = str(z["input"]) if "input" in z.files else "an unrecorded input"
            if was != what:
                raise UserError(f"{part_dir} holds a partial pass over {was}, not over {what}: "
                                "delete that folder, or resume with the same input and flags")
            for i, m in enumerate(into):
                m.merge(int(z[f"count{i}"]), *(torch.from_numpy(z[f"{k}{i}"])
                                               for k in ("mean", "scatter")))

    def save(path):
        arrays = {f"{k}{i}": np.asarray(torch.as_tensor(v).cpu()) for i, m in enumerate(moments)
                  for k, v in (("count", m.count), ("mean", m.mean), ("scatter", m.scatter))}
        atomic_write(path, lambda f: np.savez(f, input=what, **arrays))

    resume = done if os.path.exists(done) else part
    if os.path.exists(resume):
        load(resume, moments)
    if not os.path.exists(done):
        unsaved = 0
        for pool, _, *rest in _forward(source, model, env, batch_size, num_workers, "statistics",
                                       skip=moments[0].count, dinov2=dinov2):
            for m, rows in zip(moments, (pool, *rest)):
                m.add(rows)
            unsaved += len(pool)
            if unsaved >= save_every:
                save(part)
                unsaved = 0
        save(done)
    if not env.is_main:
        return None
    paths = [name(r, ".done.npz") for r in range(world)]
    while not all(map(os.path.exists, paths)):  # ranks may finish minutes apart: no collective
        time.sleep(1)
    total = [Moments(d) for d in dims]
    for path in paths:
        load(path, total)
    stats = FIDStatistics.from_moments(*total, preprocess=how)
    stats.save(out)
    shutil.rmtree(part_dir)
    return stats


def check_statistics(stats: FIDStatistics, what: str, model, prc: bool, sfid: bool, dinov2=None):
    """Before any feature is computed: can these statistics give what was asked?"""
    name, how = stats.path or f"the {what} statistics", getattr(model, "preprocess", "adm")
    if prc and stats.features is None and stats.images is None:
        raise UserError(f"precision/recall (--prc) need the {what}' features, but {name} has "
                        "only mu/sigma: pass the images, or write them with --prc --save_stats")
    if sfid and stats.mu_s is None:
        raise UserError(f"{name} has no spatial statistics (mu_s, sigma_s) for sFID: pass "
                        "--no_sfid, or statistics written by fid.py --save_stats")
    if dinov2 is not None and stats.mu_dinov2 is None and stats.images is None:
        raise UserError(f"{name} has no DINOv2 statistics (mu_dinov2) nor images for --fd_dinov2: "
                        "pass images, or statistics written by fid.py --save_stats --fd_dinov2")
    if stats.preprocess != how:
        raise UserError(f"{name} holds statistics of {stats.preprocess} preprocessing, this run "
                        f"uses {how}: pass --preprocess {stats.preprocess} or recompute them")
    dims = (*getattr(model, "dims", (0, 0)), getattr(dinov2, "embed_dim", 0))
    for (key, _), want, kind in zip(PAIRS, dims, ("Inception pool", "Inception spatial", "DINOv2")):
        got = getattr(stats, key)
        if want and got is not None and got.size != want:
            raise UserError(f"{name}: its {key} has {got.size} dimensions but this run's {kind} "
                            f"features have {want}: statistics of another network or layer")


def evaluate(samples, reference, *, model: FIDInception, env: DistEnv | None = None,
             batch_size: int = 50, num_workers: int = 4, prc: bool = False, sfid: bool = True,
             reference_from_images: bool = False, image_size: int | None = None,
             save_stats: str | None = None, progress: bool = True, log=None, dinov2=None) -> dict:
    """FID, sFID, IS of `samples` against `reference`, precision/recall with `prc`, FD_DINOv2 with
    `dinov2` (load_dinov2). Each side: a path, what load_source returns, or uint8 images in memory
    (numpy NHWC, torch NCHW). A reference batch with stored statistics is used as ADM's evaluator
    uses it unless `reference_from_images`. Under torchrun pass the run's `env`: extraction is split
    over the ranks, and every rank returns the same dict. `save_stats`: where to write reference
    statistics computed here (with `prc`, with its features)."""
    env = env or DistEnv(0, 0, 1, next(model.parameters()).device)
    log, how = log or Logger(env).info, getattr(model, "preprocess", "adm")
    sides = [load_source(os.fspath(s), image_size, log, reference_from_images)
             if isinstance(s, (str, os.PathLike)) else s for s in (samples, reference)]
    for what, src in zip(("samples", "reference"), sides):  # before the expensive part
        if isinstance(src, FIDStatistics):
            check_statistics(src, what, model, prc, sfid, dinov2)
    extract = dict(env=env, batch_size=batch_size, num_workers=num_workers, progress=progress)

    def statistics(src, what):  # (FIDStatistics on rank 0, else None; logits or None)
        if isinstance(src, FIDStatistics):  # its images featurised only for what it lacks
            new_prc = prc and src.features is None
            new_dino = dinov2 is not None and src.mu_dinov2 is None
            if not (new_prc or new_dino):
                return src, None
            pool, _, *dino = compute_activations(src.images, model, desc=f"{what} features",
                                                 dinov2=dinov2 if new_dino else None, **extract)
            if new_dino:
                log(f"{src.path}: no DINOv2 statistics, FD_DINOv2 against its {len(pool)} images")
                src = dataclasses.replace(src, **dict(zip(PAIRS[2], _fit(_moments(dino[0], what)))))
            return dataclasses.replace(src, features=pool if new_prc else src.features), None
        pool, logits, *rest = compute_activations(src, model, spatial=sfid, dinov2=dinov2,
                                                  desc=f"{what} features", **extract)
        stats = FIDStatistics.from_features(  # float64 moments: on one rank
            pool, prc, what, rest[0] if sfid else None, how,
            rest[-1] if dinov2 is not None else None) if env.is_main else None
        return stats, logits

    (fake, logits), (real, _) = statistics(sides[0], "samples"), statistics(sides[1], "reference")
    result = None
    if env.is_main:
        if isinstance(sides[1], FIDStatistics):
            described = f"the stored statistics of {real.path or 'the given reference'}"
        else:
            described = f"{real.num_images} reference images featurised here"
            if save_stats:
                real.save(save_stats)
                log(f"reference statistics ({real.num_images} images) -> {save_stats}")
        result = {"fid": fake.frechet_distance(real), "num_samples": fake.num_images,
                  "reference": described, "num_reference": max(real.num_images, 0) or None}
        if sfid:
            result["sfid"] = fake.spatial_distance(real)
        if dinov2 is not None:
            result.update(fd_dinov2=fake.dinov2_distance(real), dinov2_weights=dinov2.weights_name)
        if logits is not None:  # ADM: parts of 5000 samples (10 for 50K)
            result["inception_score"], result["inception_score_std"] = inception_score(logits)
            result["inception_score_splits"] = math.ceil(len(logits) / 5000)
        if prc:
            result["precision"], result["recall"] = precision_recall(
                real.features, fake.features, device=env.device)
            result["num_prc_reference"] = len(real.features)
        result.update(inception_weights=model.weights_name, preprocess=how)
        if getattr(sides[0], "labelling", None):  # as sample.py records it
            result["labelling"] = sides[0].labelling
    if env.distributed:  # every rank returns the same (small) dict
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def result_line(r: dict) -> str:
    """One line of an evaluate() result, naming the reference and the preprocessing."""
    line = f"FID {r['fid']:.4f}" + (f"  sFID {r['sfid']:.4f}" if "sfid" in r else "")
    line += f"  FD_DINOv2 {r['fd_dinov2']:.3f}" if "fd_dinov2" in r else ""
    if "inception_score" in r:
        line += f"  IS {r['inception_score']:.3f} +- {r['inception_score_std']:.3f}"
    if "precision" in r:
        line += (f"  precision {r['precision']:.4f}  recall {r['recall']:.4f} "
                 f"(vs {r['num_prc_reference']} images)")
    how = f", {r['preprocess']} preprocessing" if "preprocess" in r else ""
    how += f", {r['labelling']} labels" if "labelling" in r else ""
    return line + f"  ({r['num_samples']} samples vs {r['reference']}{how})"


# ---- Command line -------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="SAMPLES REFERENCE (a folder, ADM "
                   ".npz or statistics .npz each), or one path with --save_stats")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--save_stats", help="write the statistics of REFERENCE (or of the one PATH) "
                   "here, with the features if --prc")
    p.add_argument("--save_every", type=int, default=50_000, help="one PATH: images per rank "
                   "between saves of the running sums, from which a killed run resumes")
    p.add_argument("--reference_from_images", action="store_true", help="featurise a reference "
                   "batch's images (arr_0) here, not its stored mu/sigma (both sides: one network)")
    p.add_argument("--no_sfid", action="store_true", help="no sFID (for a reference without mu_s)")
    p.add_argument("--prc", action="store_true", help="also precision and recall (N^2 distances)")
    p.add_argument("--preprocess", choices=PREPROCESSING, default="adm", help="adm: as ADM's "
                   "evaluator (published ImageNet numbers); pytorch-fid: as pytorch-fid, "
                   "torchmetrics and clean-fid's legacy mode")
    p.add_argument("--batch_size", type=at_least(1), default=50, help="images per pass per rank")
    p.add_argument("--num_workers", type=int, default=4, help="image decoding workers")
    p.add_argument("--image_size", type=int, help="centre-crop size for folders (default: the "
                   "first image's short side; 256 for ImageNet)")
    p.add_argument("--inception_ckpt", help=f"local {os.path.basename(FID_WEIGHTS_URL)} (default: "
                   "the torch.hub cache, else download)")
    p.add_argument("--random_inception", action="store_true", help="random weights (tests, demo)")
    p.add_argument("--fd_dinov2", action="store_true", help="also FD_DINOv2 (DINOv2 ViT-L/14, as "
                   "dgm-eval), and with --save_stats its statistics")
    p.add_argument("--dinov2_ckpt", help="local dinov2_vitl14_pretrain.pth (default: as above)")
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
    sources = [load_source(p, args.image_size, log, args.reference_from_images or
                           len(args.paths) == 1) for p in args.paths]  # before any work
    if args.save_stats and isinstance(sources[-1], FIDStatistics):  # nothing to compute
        raise UserError(f"{args.paths[-1]} is already a statistics file: drop --save_stats")
    for flag, out, what in (("--json", args.json, "results file"),
                            ("--save_stats", args.save_stats, "statistics file")):
        same = [p for p in [*args.paths, args.inception_ckpt, args.dinov2_ckpt]
                if out and p and os.path.realpath(out) == os.path.realpath(p)]
        if same:
            raise UserError(f"{flag} {out} is the input {same[0]}, which it would overwrite")
        if out and env.is_main:
            check_writable(out, what)
    model = load_inception(args.inception_ckpt, args.random_inception, env.device,
                           preprocess=args.preprocess)
    dinov2 = (load_dinov2(args.dinov2_ckpt, args.random_dinov2, env.device) if args.fd_dinov2
              else None)
    extract = dict(batch_size=args.batch_size, num_workers=args.num_workers, dinov2=dinov2)
    result = None
    if len(args.paths) == 2:
        result = evaluate(*sources, model=model, env=env, prc=args.prc, sfid=not args.no_sfid,
                          save_stats=args.save_stats, log=log, **extract)
        result = {"samples": args.paths[0], "reference_path": args.paths[1], **result}
        log(result_line(result))
    elif args.prc:  # statistics only, with the features: one pass in memory
        pool, _, spatial, *dino = compute_activations(sources[0], model, env, spatial=True,
                                                      **extract)
        stats = None
        if env.is_main:
            stats = FIDStatistics.from_features(pool, True, args.paths[0], spatial, args.preprocess,
                                                dino[0] if dino else None)
            stats.save(args.save_stats)
    else:  # statistics only, from running sums
        stats = dataset_statistics(sources[0], model, env, args.save_stats,
                                   save_every=args.save_every, **extract)
    if len(args.paths) == 1 and env.is_main:
        result = {"images": args.paths[0], "num_images": stats.num_images,
                  "statistics": args.save_stats, "preprocess": args.preprocess,
                  "inception_weights": model.weights_name,
                  "dinov2_weights": getattr(dinov2, "weights_name", None)}
        log(f"statistics of {stats.num_images} images written to {args.save_stats}")
    if env.is_main and args.json:
        save_json(result, args.json)
        log(f"results written to {args.json}")
    cleanup_distributed()
    return result


if __name__ == "__main__":
    script_main(main)
