"""Evaluation: FID, Inception Score and precision/recall of generated samples, and rFID of
reconstructions, computed as the ImageNet 256x256 numbers we compare against were computed.

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --prc --json fid.json
    torchrun --nproc_per_node=8 fid.py samples.npz ref_stats.npz       # features split over the ranks
    python fid.py t2i.npz coco_val/ --clip_model openai/clip-vit-large-patch14 --prompts coco.txt  # + CLIP score

- The network is inception.py's FID Inception-v3 (pytorch-fid's weights, the same 2048-d features),
  always run in true float32 (no bf16, no TF32).
- A source is a folder of images, an ADM `.npz` (`arr_0`, uint8 NHWC, as sample.py writes), or a
  statistics `.npz` (`mu`, `sigma`) that `--save_stats` writes for reuse.
- The ADM evaluator runs the same weights in TensorFlow, whose resize and kernels round differently:
  compare FIDs only when both come from the same tool. The TensorFlow `mu`/`sigma` stored in ADM's
  reference batch are ignored; its images are run through our network, so that both sides of the
  distance come from one implementation.
"""

import argparse
import contextlib
import math
import os
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from common import (DistEnv, HelpFormatter, Logger, UserError, at_least, atomic_write, check_writable,
                    cleanup_distributed, save_json, script_main, setup_distributed)
from data import ImageFolder, count_skipped, eval_loader, is_image_file
from inception import FEATURE_DIM, FID_WEIGHTS_URL, FIDInception, load_inception
from text import clip_score_npz


@contextlib.contextmanager
def exact_float32(device: torch.device):
    """True float32 in the body: no autocast (a caller's bf16 context would change the features) and no
    TF32 (the training scripts turn it on; its 10-bit mantissa moves FID)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ----------------------------------------------------------------------------------------------------
# Image sources: a folder, an ADM .npz, in-memory uint8 images, or saved statistics


def as_nchw_uint8(images) -> torch.Tensor:
    """A batch as a uint8 (B, 3, H, W) tensor: numpy arrays are NHWC (ADM's .npz layout), torch tensors
    NCHW (what data.py produces)."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            hint = " It looks like NCHW: ADM's layout is NHWC." if images.ndim == 4 and images.shape[1] == 3 else ""
            raise UserError(f"expected uint8 images of shape (N, H, W, 3), got {images.shape}.{hint}")
        if not (images.flags.writeable and images.flags.c_contiguous):
            images = np.array(images)  # memory maps are read-only; torch wants writable memory
        t = torch.from_numpy(images).permute(0, 3, 1, 2)
    elif isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"expected a uint8 tensor of shape (B, 3, H, W), got {tuple(images.shape)}")
        t = images
    else:
        raise UserError(f"expected uint8 images as a numpy array or torch tensor, got {type(images).__name__}")
    if t.dtype != torch.uint8:
        raise UserError(f"expected uint8 images in 0..255, got {t.dtype}: FID is defined on the quantised images "
                        "you would save. Convert model outputs in [-1, 1] with data.to_uint8(x).")
    return t


class ArrayImages(Dataset):
    """In-memory uint8 images as a dataset of (3, H, W) tensors (numpy NHWC or torch NCHW)."""

    def __init__(self, images):
        self.images = images
        if len(images) == 0:
            raise UserError("no images (an empty array)")
        as_nchw_uint8(images[:1])  # check the layout and dtype now, with a clear message

    @property
    def image_hw(self):
        shape = self.images.shape
        return tuple(shape[1:3]) if isinstance(self.images, np.ndarray) else tuple(shape[2:4])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return as_nchw_uint8(self.images[i: i + 1])[0]


class NpzImages:
    """The `arr_0` images of an ADM .npz (uint8 NHWC), streamed: each rank reads its contiguous share a
    batch at a time, so 50K images at 256 px (9.8 GB) are never held in memory, on any rank."""

    def __init__(self, path: str):
        self.path = path
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            self.shape, self.dtype = _npy_header(f)
        if self.dtype.hasobject:
            raise UserError(f"{path}: 'arr_0' holds Python objects, which is what np.savez makes of images of "
                            "different sizes: crop them to one size first, or put them in a folder")
        if len(self.shape) == 0 or self.shape[0] == 0:
            raise UserError(f"{path}: 'arr_0' has shape {self.shape}, no images")
        as_nchw_uint8(np.zeros((1, *self.shape[1:]), dtype=self.dtype))  # layout and dtype, without reading
        self.image_hw = tuple(self.shape[1:3])

    def __len__(self):
        return self.shape[0]

    def batches(self, batch_size: int, dist_env: DistEnv):
        """This rank's images [N r / W, N (r + 1) / W) in batches of (b, H, W, 3)."""
        n, item = len(self), int(np.prod(self.shape[1:])) * self.dtype.itemsize
        start, stop = n * dist_env.rank // dist_env.world_size, n * (dist_env.rank + 1) // dist_env.world_size
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
            _npy_header(f)
            f.seek(start * item, os.SEEK_CUR)
            for i in range(start, stop, batch_size):
                b = min(batch_size, stop - i)
                yield np.frombuffer(f.read(b * item), self.dtype).reshape(b, *self.shape[1:])


def _npy_header(f):
    """(shape, dtype) from the header of a .npy stream, which is left at the start of the data."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(f)
    if fortran_order:
        raise UserError("arr_0 is stored in Fortran order; save the images with np.savez(path, arr_0=images)")
    return shape, dtype


def _first_image_size(root: str) -> int:
    """Short side of the first readable image under `root` (sorted walk): a folder's default crop size."""
    from PIL import Image

    for dirpath, dirnames, names in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filter(is_image_file, names)):
            try:
                with Image.open(os.path.join(dirpath, name)) as img:
                    return min(img.size)
            except (OSError, ValueError, SyntaxError):
                continue  # unreadable: ImageFolder warns about it and skips it
    raise UserError(f"no readable images found in {root!r}")


def load_source(path: str, image_size: int | None = None, log=print):
    """What a path names: a folder -> `data.ImageFolder`, centre-cropped to `image_size` (default: the
    first image's short side, right for generated samples; 256 for ImageNet); an .npz with `arr_0` ->
    `NpzImages` (any TensorFlow `mu`/`sigma` beside them are ignored); one with `mu` and `sigma` ->
    `FIDStatistics`."""
    if os.path.isdir(path):
        return ImageFolder(path, image_size or _first_image_size(path))
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist: expected a folder of images, an ADM .npz (arr_0) or a "
                        "statistics .npz (mu, sigma)")
    try:
        npz = np.load(path)
        files = npz.files
    except Exception as e:
        raise UserError(f"could not read {path} as an .npz file ({type(e).__name__}: {e}); expected a folder of "
                        "images, an ADM .npz (arr_0, uint8 NHWC) or a statistics .npz (mu, sigma)") from None
    if "arr_0" in files:
        if "mu" in files:
            log(f"{path}: computing statistics from its images (arr_0); ignoring the TensorFlow mu/sigma in it")
        return NpzImages(path)
    if "mu" in files and "sigma" in files:
        return FIDStatistics.load(path, npz)
    raise UserError(f"{path} has arrays {files}; expected 'arr_0' (images, uint8 NHWC, as ADM and sample.py write "
                    "them) or 'mu' and 'sigma' (statistics, as fid.py --save_stats writes them)")


# ----------------------------------------------------------------------------------------------------
# Feature extraction


def gather_rows(local: torch.Tensor, dist_env: DistEnv, interleaved: bool) -> torch.Tensor:
    """Every rank's rows of a 2-D float tensor, concatenated, on every rank. Ranks may hold different
    numbers of rows (an empty rank does not know the width), so counts and widths go first.
    `interleaved`: rank r held items r, r + W, ... (data.eval_loader): rows go back in dataset order."""
    if not dist_env.distributed:
        return local
    world = dist_env.world_size
    shape = torch.tensor([local.shape[0], local.shape[1] if local.shape[0] else 0], device=dist_env.device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    counts, width = [int(s[0]) for s in shapes], max(int(s[1]) for s in shapes)
    padded = torch.zeros((max(counts), width), dtype=torch.float32, device=dist_env.device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    parts = [p[:c].cpu() for p, c in zip(parts, counts)]
    if not interleaved:
        return torch.cat(parts)
    out = torch.empty((sum(counts), width))
    for r, p in enumerate(parts):
        out[r::world] = p
    return out


@torch.inference_mode()
def compute_activations(images, model: FIDInception, dist_env: DistEnv | None = None, batch_size: int = 50,
                        num_workers: int = 4, image_size: int | None = None, progress: bool = True,
                        desc: str = "Inception features"):
    """Pool features (N, 2048) and logits (N, 1008) of a set of images, float32 numpy, the same on every
    rank. `images`: the whole set, split over the ranks here (a path, a Dataset of uint8 (3, H, W)
    images, or uint8 images in memory), or an iterable of uint8 (B, 3, H, W) batches holding this
    rank's part (the parts are concatenated in rank order)."""
    device = next(model.parameters()).device
    dist_env = dist_env or DistEnv(0, 0, 1, device)
    if isinstance(images, (str, os.PathLike)):
        images = load_source(os.fspath(images), image_size)
        if isinstance(images, FIDStatistics):
            raise UserError("this input is a statistics file; features need images (a folder or an ADM .npz)")
    if isinstance(images, (np.ndarray, torch.Tensor)):
        images = ArrayImages(images)
    if isinstance(images, NpzImages):  # streamed in contiguous shares, concatenated in rank order
        images = images.batches(batch_size, dist_env)
    whole_set = isinstance(images, Dataset)
    if whole_set:  # decoding files wants worker processes; arrays and memory maps are only sliced
        workers = min(num_workers, len(os.sched_getaffinity(0))) if isinstance(images, ImageFolder) else 0
        loader = eval_loader(images, batch_size, dist_env, num_workers=workers)
    pools, logits = [], []
    with exact_float32(device), tqdm(total=len(loader.dataset) if whole_set else None, desc=desc, unit="img",
                                     disable=not (progress and dist_env.is_main), dynamic_ncols=True) as bar:
        for batch in loader if whole_set else images:
            batch = batch[0] if isinstance(batch, (list, tuple)) else batch  # (images, labels) from ImageFolder
            x = as_nchw_uint8(batch).to(device, non_blocking=True).float().div_(255)  # (B, 3, H, W) in [0, 1]
            pool, logit = model(x)  # (B, 2048), (B, 1008)
            pools.append(pool.float().cpu())
            logits.append(logit.float().cpu())
            bar.update(x.shape[0])
    pools, logits = [gather_rows(torch.cat(rows) if rows else torch.zeros((0, 0)), dist_env, whole_set)
                     for rows in (pools, logits)]
    if pools.shape[0] == 0:
        raise UserError("no images to compute features of (an empty folder, array or loader?)")
    skipped = count_skipped(images, dist_env)
    if skipped and dist_env.is_main:
        warnings.warn(f"{desc}: {skipped} unreadable files were replaced by their next readable neighbour (see "
                      "the warnings above); remove or repair them for an exact FID")
    return pools.numpy(), logits.numpy()


# ----------------------------------------------------------------------------------------------------
# Metrics


@dataclass
class FIDStatistics:
    """The Gaussian FID fits to a set of features: mean (2048,) and covariance (2048, 2048) in float64;
    `features` (N, 2048) only when precision/recall need the points themselves."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    features: np.ndarray | None = None

    @classmethod
    def from_features(cls, features, keep_features: bool = False, name: str = "features"):
        features = np.asarray(features, dtype=np.float32)
        n, d = features.shape
        if n < 2:
            raise UserError(f"{name}: {n} image(s); a covariance needs at least 2 (FID is normally computed on "
                            "50,000 samples, rFID on the 50,000 ImageNet validation images)")
        if not np.isfinite(features).all():
            raise UserError(f"{name}: the Inception features contain NaN/inf; the weights file is probably corrupt "
                            "(re-download it) or the network ran in reduced precision")
        if n < d:
            warnings.warn(f"{name}: {n} images < {d} feature dimensions, so the covariance is rank-deficient: FID "
                          "is then strongly biased upwards and not comparable to published numbers (use 50,000 "
                          "samples; at least 10,000)", stacklevel=2)
        # Two passes in float64 over chunks: summing 50K float32 outer products directly would lose the
        # digits that FID, a difference of traces, needs.
        mu = features.mean(axis=0, dtype=np.float64)
        sigma = np.zeros((d, d))
        for i in range(0, n, 4096):
            x = features[i: i + 4096].astype(np.float64) - mu
            sigma += x.T @ x
        return cls(mu, sigma / (n - 1), n, features if keep_features else None)

    def save(self, path: str):
        """`mu`, `sigma`, `num_images` (and `features` if kept), atomically; also a pytorch-fid stats file."""
        arrays = {"mu": self.mu, "sigma": self.sigma, "num_images": np.int64(self.num_images)}
        if self.features is not None:
            arrays["features"] = self.features.astype(np.float32)
        atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str, npz=None):
        npz = npz if npz is not None else np.load(path)
        mu, sigma = np.asarray(npz["mu"], np.float64), np.asarray(npz["sigma"], np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
            raise UserError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together; expected "
                            f"({FEATURE_DIM},) and ({FEATURE_DIM}, {FEATURE_DIM})")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise UserError(f"{path}: the statistics contain NaN/inf; recompute them with fid.py --save_stats")
        features = npz["features"] if "features" in npz.files else None
        if features is not None and (features.ndim != 2 or features.shape[1] != mu.size):
            raise UserError(f"{path}: 'features' has shape {features.shape}, expected (N, {mu.size})")
        num_images = int(npz["num_images"]) if "num_images" in npz.files else (
            len(features) if features is not None else -1)  # -1: unknown (e.g. a pytorch-fid file)
        if "mu_s" in npz.files:
            warnings.warn(f"{path} looks like ADM/TensorFlow statistics (mu_s/sigma_s): FID between them and this "
                          "PyTorch network's features mixes two implementations; pass the images instead", stacklevel=2)
        return cls(mu, sigma, num_images, features)

    def frechet_distance(self, other: "FIDStatistics") -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)


@contextlib.contextmanager
def _one_thread():
    """One CPU thread in the body: LAPACK's symmetric eigensolvers synchronise their threads thousands
    of times per call, and on a busy machine every synchronisation waits for a descheduled thread
    (27 s with 2 threads against 3.7 s with 1, for a 2048x2048 eigh on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)), the Frechet distance of two Gaussians.

    Not scipy.linalg.sqrtm(S1 @ S2) as pytorch-fid and ADM do: S1 S2 is not symmetric, its general
    (complex Schur) square root is fragile on near-singular covariances, and one NumPy/SciPy BLAS build
    got it wrong (FIDs of 20-40 instead of 2). Only the trace is needed, and S1 S2 = R (R S2 R) R^-1
    with R = sqrt(S1), so tr sqrt(S1 S2) = sum_i sqrt(lambda_i(M)) for the symmetric PSD M = R S2 R:
    two symmetric eigendecompositions in float64. Eigenvalues of S1 and S2 at round-off level count as 0
    (as matrix-rank routines count), and M keeps its min(rank S1, rank S2) largest (a threshold on M's
    own eigenvalues, which scale like lambda(S)^2, would drop genuine small variances). Two exact
    identities then check the linear algebra, so a broken library raises instead of printing a wrong FID.
    """
    def as_float64(a):
        return torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=torch.float64)

    mu1, mu2 = as_float64(mu1).reshape(-1), as_float64(mu2).reshape(-1)
    s1, s2 = as_float64(sigma1), as_float64(sigma2)
    if s1.ndim != 2 or mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise UserError(f"statistics do not match: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                        f"sigma {tuple(s1.shape)} vs {tuple(s2.shape)}")
    for name, a in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not torch.isfinite(a).all():
            raise UserError(f"{name} contains NaN/inf: recompute the statistics (were the features finite?)")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2  # covariances are symmetric only up to round-off

    def above_round_off(w):  # eigenvalues (d,) of a covariance; those at round-off level (or negative) -> 0
        return torch.where(w > w.numel() * torch.finfo(w.dtype).eps * w.abs().max(), w, 0.0)

    with _one_thread():
        w1, v1 = torch.linalg.eigh(s1)
        w2 = torch.linalg.eigvalsh(s2)
    w1, w2 = above_round_off(w1), above_round_off(w2)
    sqrt_s1 = (v1 * w1.sqrt()) @ v1.T  # R = V diag(sqrt(w)) V^T
    m = sqrt_s1 @ s2 @ sqrt_s1  # M = R S2 R, symmetric PSD
    with _one_thread():
        eig_m = torch.linalg.eigvalsh((m + m.T) / 2)  # ascending
    rank = min(int((w1 > 0).sum()), int((w2 > 0).sum()))
    tr_sqrt = eig_m[len(eig_m) - rank:].clamp(min=0).sqrt().sum().item()  # the rank largest; the rest is round-off
    # Checks: sum lambda(M) = tr(S1 S2) = sum(S1 * S2); tr sqrt(S1 S2) <= sqrt(tr S1 tr S2) (Cauchy-Schwarz).
    tr1, tr2, tr_s1s2 = s1.trace().item(), s2.trace().item(), (s1 * s2).sum().item()
    scale, bound = (torch.linalg.norm(s1) * torch.linalg.norm(s2)).item(), math.sqrt(max(tr1 * tr2, 0.0))
    if abs(eig_m.sum().item() - tr_s1s2) > 1e-6 * scale or tr_sqrt > bound * (1 + 1e-6) + 1e-12:
        raise RuntimeError("frechet_distance: the linear algebra library returned inconsistent results (sum of "
                           f"eigenvalues {eig_m.sum().item():.6g} vs tr(S1 S2) {tr_s1s2:.6g}; tr sqrt(S1 S2) "
                           f"{tr_sqrt:.6g} vs bound {bound:.6g}): the installation is broken and the FID would be wrong")
    diff = mu1 - mu2
    return max((diff @ diff).item() + tr1 + tr2 - 2 * tr_sqrt, 0.0)  # >= 0 exactly; round-off can dip below


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) from logits (N, 1008), as ADM computes it: softmax over all 1008
    outputs, `splits` consecutive parts (5000 each for 50K), each with its own marginal p(y).
    Returns (mean, std) over the parts."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if logits.ndim != 2 or logits.shape[0] < splits:
        raise UserError(f"inception_score needs (N, classes) logits with N >= splits={splits}, "
                        f"got {tuple(logits.shape)}")
    log_p = F.log_softmax(logits, dim=1)  # log p(y|x): log space avoids log(0) for confident samples
    scores = []
    for part in log_p.tensor_split(splits):
        log_marginal = torch.logsumexp(part, dim=0) - math.log(part.shape[0])  # log p(y) of this part
        scores.append((part.exp() * (part - log_marginal)).sum(1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def _knn_radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set, (N,)."""
    radii = [torch.cdist(x[i: i + batch_size], x).kthvalue(k + 1, dim=1).values  # k + 1: skip the point itself
             for i in range(0, x.shape[0], batch_size)]
    return torch.cat(radii)


@torch.inference_mode()
def precision_recall(real_feats, fake_feats, k: int = 3, batch_size: int = 1024, device=None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k = 3, as ADM's evaluator: each set's
    manifold is the union of balls around its points reaching the k-th nearest neighbour. Precision:
    the fraction of fake points inside the real manifold; recall: real points inside the fake one.
    Distances are computed a block of rows at a time (ADM uses float16 where it fits; we use float32)."""
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float32, device=device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1] or min(len(real), len(fake)) <= k:
        raise UserError(f"precision_recall needs (N, D) features of equal D and more than k={k} points per set, "
                        f"got {tuple(real.shape)} and {tuple(fake.shape)}")
    with exact_float32(device):
        radius_real, radius_fake = _knn_radii(real, k, batch_size), _knn_radii(fake, k, batch_size)
        fake_in_real = torch.zeros(len(fake), dtype=torch.bool, device=device)
        real_in_fake = torch.zeros(len(real), dtype=torch.bool, device=device)
        for i in range(0, len(real), batch_size):  # one pass over all real-fake distances serves both
            d = torch.cdist(real[i: i + batch_size], fake)  # (b, N_fake)
            fake_in_real |= (d <= radius_real[i: i + batch_size, None]).any(0)
            real_in_fake[i: i + batch_size] = (d <= radius_fake[None, :]).any(1)
    return fake_in_real.float().mean().item(), real_in_fake.float().mean().item()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """10 log10(255^2 / MSE) in dB of uint8 images (B, 3, H, W), one value per image (+inf if equal)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of uint8 images (B, 3, H, W), one value per image: local
    means, variances and covariance under an 11x11 Gaussian window (sigma 1.5), constants (0.01 * 255)^2
    and (0.03 * 255)^2, averaged over the valid positions and the channels."""
    a, b = a.double(), b.double()
    C = a.shape[1]
    g = torch.exp(-((torch.arange(11, dtype=torch.float64, device=a.device) - 5) ** 2) / (2 * 1.5 ** 2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).expand(C, 1, 11, 11)  # one window per channel

    def blur(x):  # local weighted mean at the 'valid' positions: (B, C, H - 10, W - 10)
        return F.conv2d(x, window, groups=C)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1)


# ----------------------------------------------------------------------------------------------------
# Samples vs reference


def evaluate(samples, reference, *, model: FIDInception | None = None, dist_env: DistEnv | None = None,
             batch_size: int = 50, num_workers: int = 4, prc: bool = False, image_size: int | None = None,
             inception_ckpt: str | None = None, random_inception: bool = False, save_stats: str | None = None,
             progress: bool = True, log=None) -> dict:
    """FID of `samples` against `reference`, the samples' Inception Score, and precision/recall with
    `prc`. Each side is a path, uint8 images in memory (numpy NHWC or torch NCHW), a Dataset of uint8
    (3, H, W) images, or an iterable of this rank's uint8 (B, 3, H, W) batches. Under torchrun pass the
    run's `dist_env`: extraction is split over the ranks, every rank returns the same dict.
    `save_stats`: write the reference statistics there (with `prc`, its features too)."""
    if dist_env is None:
        dev = next(model.parameters()).device if model is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        dist_env = DistEnv(0, 0, 1, dev)
    log = log or Logger(dist_env).info
    model = model or load_inception(inception_ckpt, random_inception, dist_env.device)

    def prepare(src):
        if isinstance(src, (str, os.PathLike)):
            return load_source(os.fspath(src), image_size, log=log)
        return ArrayImages(src) if isinstance(src, (np.ndarray, torch.Tensor)) else src

    samples, reference = prepare(samples), prepare(reference)
    for what, src in (("samples", samples), ("reference", reference)):
        if prc and isinstance(src, FIDStatistics) and src.features is None:  # fail before the expensive part
            raise UserError(f"precision/recall (--prc) need the {what}' features, but that statistics file has "
                            "only mu/sigma: pass the images, or write the statistics with --prc --save_stats")
    hw = [getattr(s, "image_hw", None) or ((s.image_size,) * 2 if isinstance(s, ImageFolder) else None)
          for s in (samples, reference)]
    if None not in hw and hw[0] != hw[1]:
        log(f"warning: samples are {hw[0][0]}x{hw[0][1]} but the reference images {hw[1][0]}x{hw[1][1]}; both are "
            "resized to 299x299, but FID across resolutions is not a like-for-like comparison")
    fake = None if isinstance(samples, FIDStatistics) else compute_activations(
        samples, model, dist_env, batch_size, num_workers, progress=progress, desc="sample features")
    real = None if isinstance(reference, FIDStatistics) else compute_activations(
        reference, model, dist_env, batch_size, num_workers, progress=progress, desc="reference features")
    result = None
    if dist_env.is_main:
        fake_stats = samples if fake is None else FIDStatistics.from_features(fake[0], prc, "samples")
        real_stats = reference if real is None else FIDStatistics.from_features(real[0], prc, "reference")
        if save_stats and real is not None:
            real_stats.save(save_stats)
            log(f"reference statistics ({real_stats.num_images} images) written to {save_stats}")
        result = {"fid": fake_stats.frechet_distance(real_stats), "num_samples": fake_stats.num_images,
                  "num_reference": real_stats.num_images}
        if fake is not None:  # 10 parts as ADM (5000 each for 50K); a tiny smoke-test set is one part
            splits = 10 if len(fake[1]) >= 100 else 1
            result["inception_score"], result["inception_score_std"] = inception_score(fake[1], splits)
            result["inception_score_splits"] = splits
        if prc:
            result["precision"], result["recall"] = precision_recall(real_stats.features, fake_stats.features,
                                                                     device=dist_env.device)
        result["inception_weights"] = model.weights_name
    if dist_env.distributed:  # every rank returns the same (small) dict
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


# ----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="SAMPLES REFERENCE (a folder, ADM .npz or statistics "
                   ".npz each); or one path with --save_stats to only write its statistics")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--save_stats", help="write the reference statistics (mu, sigma; + features with --prc) here")
    p.add_argument("--prc", action="store_true", help="also precision and recall (k=3; costs N^2 distances)")
    p.add_argument("--batch_size", type=at_least(1), default=50, help="images per forward pass per rank")
    p.add_argument("--num_workers", type=at_least(0), default=4, help="image decoding workers for folders")
    p.add_argument("--image_size", type=at_least(1), help="centre-crop size for folders (default: the first "
                   "image's short side; 256 for ImageNet)")
    p.add_argument("--inception_ckpt", help=f"local {os.path.basename(FID_WEIGHTS_URL)} (default: the torch.hub "
                   "cache, else download)")
    p.add_argument("--random_inception", action="store_true", help="random Inception weights: tests/demo only")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA if present")
    p.add_argument("--clip_model", help="also the CLIP score of SAMPLES (a text-to-image .npz) with this transformers "
                   "CLIP (hub name or folder), e.g. openai/clip-vit-large-patch14")
    p.add_argument("--prompts", metavar="FILE", help="with --clip_model: the prompt file the samples were drawn from")
    args = p.parse_args(argv)
    if not (len(args.paths) == 2 or (len(args.paths) == 1 and (args.save_stats or args.clip_model))):
        p.error("give SAMPLES and REFERENCE (or one path with --save_stats to only write its statistics, or with "
                "--clip_model for the CLIP score only)")
    if bool(args.clip_model) != bool(args.prompts):
        p.error("--clip_model and --prompts go together")
    return args


def main(argv=None):
    args = parse_args(argv)
    dist_env = setup_distributed(args.device)
    log = Logger(dist_env).info
    for path, what in ((args.json, "results file"), (args.save_stats, "statistics file")):
        if path and dist_env.is_main:
            check_writable(path, what)  # now, not after the work
    clip_only = len(args.paths) == 1 and not args.save_stats
    model = None if clip_only else load_inception(args.inception_ckpt, args.random_inception, dist_env.device)
    if clip_only:
        result = {"samples": args.paths[0]}
    elif len(args.paths) == 1:  # statistics only
        source = load_source(args.paths[0], args.image_size, log=log)
        if isinstance(source, FIDStatistics):
            raise UserError(f"{args.paths[0]} is already a statistics file")
        feats, _ = compute_activations(source, model, dist_env, args.batch_size, args.num_workers)
        result = None
        if dist_env.is_main:
            stats = FIDStatistics.from_features(feats, keep_features=args.prc, name=args.paths[0])
            stats.save(args.save_stats)
            result = {"images": args.paths[0], "num_images": stats.num_images, "statistics": args.save_stats,
                      "inception_weights": model.weights_name}
            log(f"statistics of {stats.num_images} images written to {args.save_stats}")
    else:
        result = evaluate(args.paths[0], args.paths[1], model=model, dist_env=dist_env, batch_size=args.batch_size,
                          num_workers=args.num_workers, prc=args.prc, image_size=args.image_size,
                          save_stats=args.save_stats, log=log)
        result = {"samples": args.paths[0], "reference": args.paths[1], **result}
        line = f"FID {result['fid']:.4f}"
        if "inception_score" in result:
            line += f"  IS {result['inception_score']:.3f} +- {result['inception_score_std']:.3f}"
        if "precision" in result:
            line += f"  precision {result['precision']:.4f}  recall {result['recall']:.4f}"
        log(line + f"  ({result['num_samples']} samples vs {result['num_reference']} reference images)")
    if args.clip_model and dist_env.is_main:
        result.update(clip_score_npz(args.paths[0], args.prompts, args.clip_model, dist_env.device))
        log(f"CLIP score {result['clip_score']:.3f} ({args.clip_model})")
    if dist_env.is_main and args.json:
        save_json(result, args.json)
        log(f"results written to {args.json}")
    cleanup_distributed()
    return result


if __name__ == "__main__":
    script_main(main)
