"""Evaluation: FID, sFID, Inception Score and precision/recall of generated samples (and rFID of
reconstructions) by the protocol of ADM's evaluator (guided-diffusion evaluations/), which the
paper's, LightningDiT's and VA-VAE's ImageNet 256x256 numbers come from.

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --prc --json fid.json
    torchrun --nproc_per_node=8 fid.py /data/imagenet/train --image_size 256 --save_stats t.npz
    python fid.py t2i.npz coco_val/ --clip_model openai/clip-vit-large-patch14 --prompts coco.txt

- The network is inception.py's FID Inception-v3 (pytorch-fid's weights, the same 2048-d features),
  always run in true float32; one forward pass gives the pool features (FID, precision/recall), the
  logits (IS) and the spatial features of sFID.
- A source is a folder of images (ADM's centre crop), an ADM `.npz` (`arr_0`, uint8 NHWC, as
  sample.py writes), or a statistics `.npz` (ADM's keys `mu`, `sigma`, `mu_s`, `sigma_s`, as
  `--save_stats` writes them).
- A reference batch with stored statistics (ADM's holds the whole ImageNet training set's, and
  10,000 images beside them) is used as ADM's evaluator uses it: FID and sFID against the stored
  statistics, precision/recall against its images. `--reference_from_images` featurises its images.
- The stored statistics were computed by TensorFlow from the same weights; resizing and kernels
  differ (README, "Evaluation protocol").
"""

import argparse
import contextlib
import dataclasses
import math
import os
import shutil
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from common import (DistEnv, HelpFormatter, Logger, UserError, at_least, atomic_write,
                    check_writable, cleanup_distributed, save_json, script_main, setup_distributed)
from data import (ArrayImages, ImageFolder, NpzImages, as_nchw_uint8, count_skipped, eval_loader,
                  first_image_size)
from frechet import FIDStatistics, Moments, frechet_distance  # noqa: F401 (fid.frechet_distance)
from inception import FID_WEIGHTS_URL, FIDInception, load_inception
from text import clip_score_npz, read_prompts


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


# --------------------------------------------------------------------------------------------------
# Image sources: a folder, an ADM .npz, in-memory uint8 images, or saved statistics


def load_source(path: str, image_size: int | None = None, log=print, from_images: bool = False):
    """What a path names: a folder -> `data.ImageFolder`, centre-cropped to `image_size` (default:
    the first image's short side, right for generated samples; 256 for ImageNet); an .npz with `mu`
    and `sigma` -> `FIDStatistics`, and if it also has `arr_0` (an ADM reference batch) those images
    come along in `.images` for precision/recall only, as ADM's evaluator uses them; an .npz with
    only `arr_0`, or with `from_images` -> `NpzImages`."""
    if os.path.isdir(path):
        return ImageFolder(path, image_size or first_image_size(path))
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist: expected a folder of images, an ADM .npz (arr_0) "
                        "or a statistics .npz (mu, sigma)")
    try:
        npz = np.load(path, allow_pickle=False)
        files = npz.files
    except Exception as e:
        raise UserError(f"could not read {path} as an .npz file ({type(e).__name__}: {e}); "
                        "expected a folder of images, an ADM .npz (arr_0, uint8 NHWC) or a "
                        "statistics .npz (mu, sigma)") from None
    with npz:
        if "mu" in files and "sigma" in files and not (from_images and "arr_0" in files):
            stats = FIDStatistics.load(path, npz)
            stats.images = NpzImages(path) if "arr_0" in files else None
            return stats
    if "arr_0" in files:
        if "mu" in files:
            log(f"{path}: featurising its images (arr_0) here, not using its stored mu/sigma")
        return NpzImages(path)
    raise UserError(f"{path} has arrays {files}; expected 'arr_0' (images, uint8 NHWC, as ADM and "
                    "sample.py write them) or 'mu' and 'sigma' (statistics, as fid.py --save_stats "
                    "writes them)")


# --------------------------------------------------------------------------------------------------
# Feature extraction


def gather_rows(local: torch.Tensor, dist_env: DistEnv, interleaved: bool) -> torch.Tensor:
    """Every rank's rows of a 2-D float tensor, concatenated, on every rank. Ranks may hold
    different numbers of rows (an empty rank does not know the width), so counts and widths go
    first. `interleaved`: rank r held items r, r + W, ... (data.eval_loader): rows go back in
    dataset order."""
    if not dist_env.distributed:
        return local
    world = dist_env.world_size
    shape = torch.tensor([local.shape[0], local.shape[1] if local.shape[0] else 0],
                         device=dist_env.device)
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


def rank_batches(images, dist_env: DistEnv, batch_size: int, num_workers: int, image_size=None,
                 skip: int = 0):
    """(this rank's uint8 batches, less its first `skip` images; whether rank r holds items r,
    r + W, ... (a Dataset) rather than a contiguous share). `images` as in compute_activations."""
    if isinstance(images, (str, os.PathLike)):
        images = load_source(os.fspath(images), image_size, from_images=True)
        if isinstance(images, FIDStatistics):
            raise UserError("this input is a statistics file; features need images (a folder or an "
                            "ADM .npz)")
    if isinstance(images, (np.ndarray, torch.Tensor)):
        images = ArrayImages(images)
    if isinstance(images, NpzImages):  # streamed in contiguous shares, concatenated in rank order
        return images.batches(batch_size, dist_env, skip), False
    if isinstance(images, Dataset):  # decoding files wants worker processes; arrays are only sliced
        workers = min(num_workers, len(os.sched_getaffinity(0)))
        workers = workers if isinstance(images, ImageFolder) else 0
        return eval_loader(images, batch_size, dist_env, num_workers=workers, skip=skip), True
    return images, False  # already this rank's batches


@torch.inference_mode()
def compute_activations(images, model: FIDInception, dist_env: DistEnv | None = None,
                        batch_size: int = 50, num_workers: int = 4, image_size: int | None = None,
                        progress: bool = True, desc: str = "Inception features",
                        spatial: bool = False):
    """Pool features (N, 2048) and logits (N, 1008) of a set of images, and with `spatial` sFID's
    spatial features (N, 2023) from the same forward pass: float32 numpy, the same on every rank.
    `images`: the whole set, split over the ranks here (a path, a Dataset of uint8 (3, H, W) images,
    or uint8 images in memory), or an iterable of uint8 (B, 3, H, W) batches holding this rank's
    part (the parts are concatenated in rank order)."""
    device = next(model.parameters()).device
    dist_env = dist_env or DistEnv(0, 0, 1, device)
    batches, interleaved = rank_batches(images, dist_env, batch_size, num_workers, image_size)
    total = len(batches.dataset) if interleaved else None
    columns = [[] for _ in range(3 if spatial else 2)]  # pool, logits[, spatial]: tensors per batch
    with exact_float32(device), tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True,
                                     disable=not (progress and dist_env.is_main)) as bar:
        for batch in batches:
            # (images, labels) from ImageFolder; x: (B, 3, H, W) in [0, 1]
            batch = batch[0] if isinstance(batch, (list, tuple)) else batch
            x = as_nchw_uint8(batch).to(device, non_blocking=True).float().div_(255)
            for rows, out in zip(columns, model(x, spatial=True) if spatial else model(x)):
                rows.append(out.float().cpu())
            bar.update(x.shape[0])
    columns = [gather_rows(torch.cat(rows) if rows else torch.zeros((0, 0)), dist_env, interleaved)
               for rows in columns]
    if columns[0].shape[0] == 0:
        raise UserError("no images to compute features of (an empty folder, array or loader?)")
    skipped = count_skipped(batches.dataset if interleaved else None, dist_env)
    if skipped and dist_env.is_main:
        warnings.warn(f"{desc}: {skipped} unreadable files were replaced by their next readable "
                      "neighbour (see the warnings above); remove or repair them for an exact FID")
    return tuple(c.numpy() for c in columns)


# --------------------------------------------------------------------------------------------------
# Metrics


def inception_score(logits, split_size: int = 5000) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) from logits (N, 1008), as ADM computes it: softmax over all 1008
    outputs, consecutive parts of `split_size` images (10 parts for 50K, 2 for 10K; the last part
    may be shorter), each with its own marginal p(y). Returns (mean, std) over the parts."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise UserError(f"inception_score needs (N, classes) logits, got {tuple(logits.shape)}")
    # log p(y|x): log space avoids log(0) for confident samples
    log_p = F.log_softmax(logits, dim=1)
    scores = []
    for part in log_p.split(split_size):
        # log p(y) of this part
        log_marginal = torch.logsumexp(part, dim=0) - math.log(part.shape[0])
        scores.append((part.exp() * (part - log_marginal)).sum(1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def _knn_radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set, (N,)."""
    # k + 1: skip the point itself
    radii = [torch.cdist(x[i: i + batch_size], x).kthvalue(k + 1, dim=1).values
             for i in range(0, x.shape[0], batch_size)]
    return torch.cat(radii)


@torch.inference_mode()
def precision_recall(real_feats, fake_feats, k: int = 3, batch_size: int = 1024,
                     device=None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k = 3, as ADM's evaluator: each
    set's manifold is the union of balls around its points reaching the k-th nearest neighbour.
    Precision: the fraction of fake points inside the real manifold; recall: real points inside the
    fake one. Distances are computed a block of rows at a time (ADM uses float16 where it fits; we
    use float32)."""
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device) if device else torch.device(default_device)
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float32, device=device)
    well_formed = real.ndim == 2 and fake.ndim == 2 and real.shape[1] == fake.shape[1]
    if not well_formed or min(len(real), len(fake)) <= k:
        raise UserError(f"precision_recall needs (N, D) features of equal D and more than k={k} "
                        f"points per set, got {tuple(real.shape)} and {tuple(fake.shape)}")
    with exact_float32(device):
        radius_real, radius_fake = _knn_radii(real, k, batch_size), _knn_radii(fake, k, batch_size)
        fake_in_real = torch.zeros(len(fake), dtype=torch.bool, device=device)
        real_in_fake = torch.zeros(len(real), dtype=torch.bool, device=device)
        # one pass over all real-fake distances serves both
        for i in range(0, len(real), batch_size):
            d = torch.cdist(real[i: i + batch_size], fake)  # (b, N_fake)
            fake_in_real |= (d <= radius_real[i: i + batch_size, None]).any(0)
            real_in_fake[i: i + batch_size] = (d <= radius_fake[None, :]).any(1)
    return fake_in_real.float().mean().item(), real_in_fake.float().mean().item()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """10 log10(255^2 / MSE) in dB of uint8 images (B, 3, H, W), one value per image
    (+inf if equal)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of uint8 images (B, 3, H, W), one value per image:
    local means, variances and covariance under an 11x11 Gaussian window (sigma 1.5), constants
    (0.01 * 255)^2 and (0.03 * 255)^2, averaged over the valid positions and the channels."""
    a, b = a.double(), b.double()
    C = a.shape[1]
    offsets = torch.arange(11, dtype=torch.float64, device=a.device) - 5
    g = torch.exp(-(offsets ** 2) / (2 * 1.5 ** 2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).expand(C, 1, 11, 11)  # one window per channel

    def blur(x):  # local weighted mean at the 'valid' positions: (B, C, H - 10, W - 10)
        return F.conv2d(x, window, groups=C)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    numerator = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    denominator = (mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)
    ssim_map = numerator / denominator
    return ssim_map.flatten(1).mean(1)


# --------------------------------------------------------------------------------------------------
# Whole-set statistics and samples vs reference


@torch.inference_mode()
def dataset_statistics(source, model: FIDInception, dist_env: DistEnv, out: str,
                       batch_size: int = 50, num_workers: int = 4,
                       save_every: int = 50_000) -> FIDStatistics | None:
    """Pool and spatial statistics of a large set (e.g. the 1.28M ImageNet training images) written
    to `out`, without holding its features: each rank folds its share into Moments and saves them
    every `save_every` images to <out>.partial/, from where a killed run resumes (with as many
    ranks); rank 0 then merges the ranks' moments. Returns the statistics on rank 0, else None."""
    part_dir, world = out + ".partial", dist_env.world_size
    name = lambda r, end: os.path.join(part_dir, f"rank{r}_of_{world}{end}")  # noqa: E731
    part, done = name(dist_env.rank, ".npz"), name(dist_env.rank, ".done.npz")
    device = next(model.parameters()).device
    moments = [Moments(d, device) for d in model.dims]  # pool (2048), spatial (2023)

    def load(path, into):
        with np.load(path, allow_pickle=False) as z:
            if int(z["num_images"]) != len(source):
                raise UserError(f"{part_dir} holds a pass over {int(z['num_images'])} images, not "
                                f"these {len(source)}: delete that folder")
            for i, m in enumerate(into):
                m.merge(int(z[f"count{i}"]), torch.from_numpy(z[f"mean{i}"]),
                        torch.from_numpy(z[f"scatter{i}"]))

    def save(path):
        arrays = {f"{k}{i}": np.asarray(v.cpu() if torch.is_tensor(v) else v)
                  for i, m in enumerate(moments)
                  for k, v in (("count", m.count), ("mean", m.mean), ("scatter", m.scatter))}
        atomic_write(path, lambda f: np.savez(f, num_images=len(source), **arrays))

    for path in (done, part):
        if os.path.exists(path):
            load(path, moments)
            break
    if not os.path.exists(done):
        batches, _ = rank_batches(source, dist_env, batch_size, num_workers, skip=moments[0].count)
        unsaved = 0
        with exact_float32(device), tqdm(desc="statistics (this rank)", unit="img",
                                         initial=moments[0].count, disable=not dist_env.is_main,
                                         dynamic_ncols=True) as bar:
            for batch in batches:
                batch = batch[0] if isinstance(batch, (list, tuple)) else batch
                # (B, 3, H, W)
                x = as_nchw_uint8(batch).to(device, non_blocking=True).float().div_(255)
                pool, _, spatial = model(x, spatial=True)  # (B, 2048), (B, 1008), (B, 2023)
                moments[0].add(pool)
                moments[1].add(spatial)
                unsaved += x.shape[0]
                bar.update(x.shape[0])
                if unsaved >= save_every:
                    save(part)
                    unsaved = 0
        save(done)
    if not dist_env.is_main:
        return None
    paths = [name(r, ".done.npz") for r in range(world)]
    while not all(map(os.path.exists, paths)):  # ranks may finish minutes apart: no collective
        time.sleep(1)
    total = [Moments(d) for d in model.dims]
    for path in paths:
        load(path, total)
    stats = FIDStatistics.from_moments(*total)
    stats.save(out)
    shutil.rmtree(part_dir)
    return stats


def _check_statistics(stats: FIDStatistics, what: str, dims, prc: bool, sfid: bool):
    """Before any feature is computed: can these statistics give what was asked?"""
    name = stats.path or f"the {what} statistics"
    if prc and stats.features is None and stats.images is None:
        raise UserError(f"precision/recall (--prc) need the {what}' features, but {name} has "
                        "only mu/sigma: pass the images, or write the statistics with --prc "
                        "--save_stats")
    if sfid and stats.mu_s is None:
        raise UserError(f"{name} has no spatial statistics (mu_s, sigma_s) for sFID: pass "
                        "--no_sfid, or statistics written by fid.py --save_stats (or ADM's "
                        "reference batch)")
    for key, want, kind in zip(("mu", "mu_s"), dims or (), ("pool", "spatial")):
        got = getattr(stats, key)
        if got is not None and got.size != want:
            raise UserError(f"{name}: its {key} has {got.size} dimensions but this Inception's "
                            f"{kind} features have {want}: statistics of another network or layer")


def evaluate(samples, reference, *, model: FIDInception | None = None,
             dist_env: DistEnv | None = None, batch_size: int = 50, num_workers: int = 4,
             prc: bool = False, sfid: bool = True,
             reference_from_images: bool = False, image_size: int | None = None,
             inception_ckpt: str | None = None, random_inception: bool = False,
             save_stats: str | None = None, progress: bool = True, log=None) -> dict:
    """FID and sFID of `samples` against `reference`, the samples' Inception Score, and precision/
    recall with `prc`. Each side is a path, uint8 images in memory (numpy NHWC or torch NCHW), a
    Dataset of uint8 (3, H, W) images, an iterable of this rank's uint8 (B, 3, H, W) batches, or
    FIDStatistics. A reference batch with stored statistics is used as ADM's evaluator uses it
    (FID/sFID from the statistics, precision/recall from its images) unless
    `reference_from_images`. Under torchrun pass the run's `dist_env`: extraction is split over the
    ranks, every rank returns the same dict. `save_stats`: write the reference statistics there
    when they were computed here (with `prc`, its features too)."""
    if dist_env is None:
        dev = next(model.parameters()).device if model is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        dist_env = DistEnv(0, 0, 1, dev)
    log = log or Logger(dist_env).info
    model = model or load_inception(inception_ckpt, random_inception, dist_env.device)

    def prepare(src):
        if isinstance(src, (str, os.PathLike)):
            return load_source(os.fspath(src), image_size, log, from_images=reference_from_images)
        return ArrayImages(src) if isinstance(src, (np.ndarray, torch.Tensor)) else src

    samples, reference = prepare(samples), prepare(reference)
    for what, src in (("samples", samples), ("reference", reference)):  # before the expensive part
        if isinstance(src, FIDStatistics):
            _check_statistics(src, what, getattr(model, "dims", None), prc, sfid)
    stored = isinstance(reference, FIDStatistics)
    hw = [getattr(s, "image_hw", None)
          or ((s.image_size,) * 2 if isinstance(s, ImageFolder) else None)
          for s in (samples, reference.images if stored else reference)]
    if None not in hw and hw[0] != hw[1]:
        log(f"warning: samples are {hw[0][0]}x{hw[0][1]} but the reference images "
            f"{hw[1][0]}x{hw[1][1]}; both are resized to 299x299, but FID across resolutions is "
            "not a like-for-like comparison")
    # A reference of stored statistics is featurised only for precision/recall, from its images.
    ref_images = reference if not stored else (
        reference.images if prc and reference.features is None else None)
    extract = dict(dist_env=dist_env, batch_size=batch_size, num_workers=num_workers,
                   progress=progress)
    fake = None if isinstance(samples, FIDStatistics) else compute_activations(
        samples, model, spatial=sfid, desc="sample features", **extract)
    real = None if ref_images is None else compute_activations(
        ref_images, model, spatial=sfid and not stored, desc="reference features", **extract)
    result = None
    if dist_env.is_main:
        fake_stats = samples if fake is None else FIDStatistics.from_features(
            fake[0], prc, "samples", fake[2] if sfid else None)
        if stored:  # FID/sFID from the stored statistics; precision/recall from the images
            real_stats = reference if real is None else dataclasses.replace(reference,
                                                                            features=real[0])
            described = f"the stored statistics of {reference.path or 'the given reference'}"
        else:
            real_stats = FIDStatistics.from_features(real[0], prc, "reference",
                                                     real[2] if sfid else None)
            described = f"{real_stats.num_images} reference images featurised here"
            if save_stats:
                real_stats.save(save_stats)
                log(f"reference statistics ({real_stats.num_images} images) -> {save_stats}")
        result = {"fid": fake_stats.frechet_distance(real_stats),
                  "num_samples": fake_stats.num_images, "reference": described,
                  "num_reference": max(real_stats.num_images, 0) or None}
        if sfid:
            result["sfid"] = fake_stats.spatial_distance(real_stats)
        if fake is not None:  # ADM: parts of 5000 samples (10 for 50K)
            result["inception_score"], result["inception_score_std"] = inception_score(fake[1])
            result["inception_score_splits"] = math.ceil(len(fake[1]) / 5000)
        if prc:
            result["precision"], result["recall"] = precision_recall(
                real_stats.features, fake_stats.features, device=dist_env.device)
            result["num_prc_reference"] = len(real_stats.features)
        result["inception_weights"] = model.weights_name
    if dist_env.distributed:  # every rank returns the same (small) dict
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


# --------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="SAMPLES REFERENCE (a folder, ADM "
                   ".npz or statistics .npz each); or one path with --save_stats to only write its "
                   "statistics")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--save_stats", help="write the reference statistics (mu, sigma, mu_s, sigma_s; "
                   "+ features with --prc) here when they are computed from images")
    p.add_argument("--save_every", type=at_least(1), default=50_000, help="one path with "
                   "--save_stats: images per rank between saves of the running sums (for a resume)")
    p.add_argument("--reference_from_images", action="store_true", help="featurise a reference "
                   "batch's images (arr_0) here, not its stored mu/sigma (both sides: one network)")
    p.add_argument("--no_sfid", action="store_true", help="no sFID (for a reference without mu_s)")
    p.add_argument("--prc", action="store_true",
                   help="also precision and recall (k=3; costs N^2 distances)")
    p.add_argument("--batch_size", type=at_least(1), default=50,
                   help="images per forward pass per rank")
    p.add_argument("--num_workers", type=at_least(0), default=4,
                   help="image decoding workers for folders")
    p.add_argument("--image_size", type=at_least(1), help="centre-crop size for folders (default: "
                   "the first image's short side; 256 for ImageNet)")
    p.add_argument("--inception_ckpt", help=f"local {os.path.basename(FID_WEIGHTS_URL)} (default: "
                   "the torch.hub cache, else download)")
    p.add_argument("--random_inception", action="store_true",
                   help="random Inception weights: tests/demo only")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA if present")
    p.add_argument("--clip_model", help="also the CLIP score of SAMPLES (a text-to-image .npz) "
                   "with this transformers CLIP (hub name or folder), e.g. "
                   "openai/clip-vit-large-patch14")
    p.add_argument("--prompts", metavar="FILE",
                   help="with --clip_model: the prompt file the samples were drawn from")
    args = p.parse_args(argv)
    one_path_ok = len(args.paths) == 1 and (args.save_stats or args.clip_model)
    if not (len(args.paths) == 2 or one_path_ok):
        p.error("give SAMPLES and REFERENCE (or one path with --save_stats to only write its "
                "statistics, or with --clip_model for the CLIP score only)")
    if bool(args.clip_model) != bool(args.prompts):
        p.error("--clip_model and --prompts go together")
    return args


def check_inputs(args):
    """Before any work: every input can be read, and no output would overwrite an input."""
    for path in args.paths:
        if not os.path.exists(path):
            raise UserError(f"{path} does not exist: expected a folder of images, an ADM .npz "
                            "(arr_0) or a statistics .npz (mu, sigma)")
    if args.prompts:
        read_prompts(args.prompts)
    inputs = [*args.paths, *filter(None, (args.prompts, args.inception_ckpt))]
    for flag, out in (("--json", args.json), ("--save_stats", args.save_stats)):
        same = [p for p in inputs if out and os.path.realpath(out) == os.path.realpath(p)]
        if same:
            raise UserError(f"{flag} {out} is the input {same[0]}, which it would overwrite: "
                            "write elsewhere")


def main(argv=None):
    args = parse_args(argv)
    dist_env = setup_distributed(args.device)
    log = Logger(dist_env).info
    check_inputs(args)
    for path, what in ((args.json, "results file"), (args.save_stats, "statistics file")):
        if path and dist_env.is_main:
            check_writable(path, what)  # now, not after the work
    clip_only = len(args.paths) == 1 and not args.save_stats
    model = None if clip_only else load_inception(args.inception_ckpt, args.random_inception,
                                                  dist_env.device)
    extract = dict(batch_size=args.batch_size, num_workers=args.num_workers)
    if clip_only:
        result = {"samples": args.paths[0]}
    elif len(args.paths) == 1:  # statistics only
        source = load_source(args.paths[0], args.image_size, log=log, from_images=True)
        if isinstance(source, FIDStatistics):
            raise UserError(f"{args.paths[0]} is already a statistics file")
        if args.prc:  # the features are kept, so one pass in memory
            pool, _, spatial = compute_activations(source, model, dist_env, spatial=True, **extract)
            stats = None
            if dist_env.is_main:
                stats = FIDStatistics.from_features(pool, True, args.paths[0], spatial)
                stats.save(args.save_stats)
        else:
            stats = dataset_statistics(source, model, dist_env, args.save_stats,
                                       save_every=args.save_every, **extract)
        result = None
        if dist_env.is_main:
            result = {"images": args.paths[0], "num_images": stats.num_images,
                      "statistics": args.save_stats, "inception_weights": model.weights_name}
            log(f"statistics of {stats.num_images} images written to {args.save_stats}")
    else:
        result = evaluate(args.paths[0], args.paths[1], model=model, dist_env=dist_env,
                          prc=args.prc, sfid=not args.no_sfid, image_size=args.image_size,
                          reference_from_images=args.reference_from_images,
                          save_stats=args.save_stats, log=log, **extract)
        result = {"samples": args.paths[0], "reference_path": args.paths[1], **result}
        log(result_line(result))
    if args.clip_model and dist_env.is_main:
        result.update(clip_score_npz(args.paths[0], args.prompts, args.clip_model, dist_env.device))
        log(f"CLIP score {result['clip_score']:.3f} ({args.clip_model})")
    if dist_env.is_main and args.json:
        save_json(result, args.json)
        log(f"results written to {args.json}")
    cleanup_distributed()
    return result


def result_line(r: dict) -> str:
    """One line of an evaluate() result, naming the reference that was used."""
    line = f"FID {r['fid']:.4f}" + (f"  sFID {r['sfid']:.4f}" if "sfid" in r else "")
    if "inception_score" in r:
        line += f"  IS {r['inception_score']:.3f} +- {r['inception_score_std']:.3f}"
    if "precision" in r:
        line += (f"  precision {r['precision']:.4f}  recall {r['recall']:.4f} "
                 f"(vs {r['num_prc_reference']} images)")
    return line + f"  ({r['num_samples']} samples vs {r['reference']})"


if __name__ == "__main__":
    script_main(main)
