"""Gaussian statistics of Inception features and the Frechet distance between them: what FID and
sFID are (fid.py computes the features). `Moments` accumulates a mean and covariance over any number
of batches, ranks and resumed runs; `FIDStatistics` holds them and reads and writes ADM's .npz."""

import contextlib
import dataclasses
import math
import warnings

import numpy as np
import torch

from common import UserError, atomic_write


class Moments:
    """Count, mean and scatter matrix S = sum (x - mean)(x - mean)^T of a stream of feature rows in
    float64, merged a batch at a time by Chan et al.'s pairwise update: as exact as two passes over
    the data (float32 sums of raw outer products would lose the digits FID needs), without holding
    the data, and mergeable across ranks and across a resumed run."""

    def __init__(self, dim: int, device="cpu"):
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.scatter = torch.zeros((dim, dim), dtype=torch.float64, device=device)

    def add(self, rows) -> "Moments":
        x = torch.as_tensor(rows).to(self.mean.device, torch.float64)  # (b, dim)
        mean = x.mean(0)
        return self.merge(x.shape[0], mean, (x - mean).T @ (x - mean))

    def merge(self, count: int, mean, scatter) -> "Moments":
        n = self.count + count
        delta = torch.as_tensor(mean, device=self.mean.device) - self.mean
        self.scatter += torch.as_tensor(scatter, device=self.mean.device) + torch.outer(
            delta, delta) * (self.count * count / n)
        self.mean += delta * (count / n)
        self.count = n
        return self


@dataclasses.dataclass
class FIDStatistics:
    """The Gaussian fits to a set's Inception features, float64: pool-feature mean (2048,) and
    covariance (2048, 2048) for FID; `mu_s`, `sigma_s` of the spatial features (2023,),
    (2023, 2023) for sFID, when known. `features` (N, 2048) only when precision/recall need the
    points; `images`: an ADM reference batch's own images, which precision/recall use instead;
    `path`: the file it came from, if any."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    features: np.ndarray | None = None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    images: object = None  # fid.NpzImages
    path: str | None = None

    @classmethod
    def from_moments(cls, pool: Moments, spatial: Moments | None = None, features=None):
        fit = [(m.mean.cpu().numpy(), (m.scatter / (m.count - 1)).cpu().numpy())
               for m in (pool, spatial) if m]
        return cls(*fit[0], pool.count, features, *(fit[1] if spatial else (None, None)))

    @classmethod
    def from_features(cls, features, keep_features: bool = False, name: str = "features",
                      spatial=None):
        """Mean and covariance (unbiased, as np.cov) of pool `features` (N, 2048), and of
        `spatial` (N, 2023) if given."""
        moments = []
        for feats in (features, spatial) if spatial is not None else (features,):
            feats = np.asarray(feats, dtype=np.float32)
            n, d = feats.shape
            if n < 2:
                raise UserError(f"{name}: {n} image(s); a covariance needs at least 2 (FID is "
                                "normally computed on 50,000 samples, rFID on the 50,000 ImageNet "
                                "validation images)")
            if not np.isfinite(feats).all():
                raise UserError(f"{name}: the Inception features contain NaN/inf; the weights "
                                "file is probably corrupt (re-download it) or the network ran in "
                                "reduced precision")
            if n < d:
                warnings.warn(f"{name}: {n} images < {d} feature dimensions, so the covariance is "
                              "rank-deficient: FID is then strongly biased upwards and not "
                              "comparable to published numbers (use 50,000 samples; at least "
                              "10,000)", stacklevel=2)
            moments.append(Moments(d))
            for i in range(0, n, 4096):
                moments[-1].add(torch.from_numpy(feats[i: i + 4096]))
        kept = np.asarray(features, np.float32) if keep_features else None
        return cls.from_moments(*moments, features=kept)

    def save(self, path: str):
        """ADM's keys `mu`, `sigma` (+ `mu_s`, `sigma_s`), `num_images` (and `features` if kept),
        atomically; also a pytorch-fid statistics file."""
        arrays = {"mu": self.mu, "sigma": self.sigma, "num_images": np.int64(self.num_images)}
        if self.mu_s is not None:
            arrays.update(mu_s=self.mu_s, sigma_s=self.sigma_s)
        if self.features is not None:
            arrays["features"] = self.features.astype(np.float32)
        atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str, npz):
        got = {}
        for m, s in (("mu", "sigma"), ("mu_s", "sigma_s")):
            if (m in npz.files) != (s in npz.files):
                has, lacks = (m, s) if m in npz.files else (s, m)
                raise UserError(f"{path} has {has} without {lacks}")
            if m in npz.files:
                mu, sigma = np.asarray(npz[m], np.float64), np.asarray(npz[s], np.float64)
                if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
                    raise UserError(f"{path}: {m} {mu.shape} and {s} {sigma.shape} do not fit "
                                    "together; expected (D,) and (D, D)")
                if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
                    raise UserError(f"{path}: {m}/{s} contain NaN/inf; recompute them with "
                                    "fid.py --save_stats")
                got[m], got[s] = mu, sigma
        features = npz["features"] if "features" in npz.files else None
        if features is not None and (features.ndim != 2 or features.shape[1] != got["mu"].size):
            raise UserError(f"{path}: 'features' has shape {features.shape}, expected "
                            f"(N, {got['mu'].size})")
        num_images = int(npz["num_images"]) if "num_images" in npz.files else (
            len(features) if features is not None else -1)  # -1: unknown (ADM's, pytorch-fid's)
        return cls(num_images=num_images, features=features, path=path, **got)

    def frechet_distance(self, other: "FIDStatistics") -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)

    def spatial_distance(self, other: "FIDStatistics") -> float:
        """sFID: the same Frechet distance on the spatial features' statistics."""
        return frechet_distance(self.mu_s, self.sigma_s, other.mu_s, other.sigma_s)


@contextlib.contextmanager
def _one_thread():
    """One CPU thread in the body: LAPACK's symmetric eigensolvers synchronise their threads
    thousands of times per call, and on a busy machine every synchronisation waits for a descheduled
    thread (27 s with 2 threads against 3.7 s with 1, for a 2048x2048 eigh on a loaded 2-core
    machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)), the Frechet distance of two Gaussians.

    Not scipy.linalg.sqrtm(S1 @ S2) as pytorch-fid and ADM do: S1 S2 is not symmetric, its general
    (complex Schur) square root is fragile on near-singular covariances, and one NumPy/SciPy BLAS
    build got it wrong (FIDs of 20-40 instead of 2). Only the trace is needed, and
    S1 S2 = R (R S2 R) R^-1 with R = sqrt(S1), so tr sqrt(S1 S2) = sum_i sqrt(lambda_i(M)) for the
    symmetric PSD M = R S2 R: two symmetric eigendecompositions in float64. Eigenvalues of S1 and S2
    at round-off level count as 0 (as matrix-rank routines count), and M keeps its
    min(rank S1, rank S2) largest (a threshold on M's own eigenvalues, which scale like lambda(S)^2,
    would drop genuine small variances). Two exact identities then check the linear algebra, so a
    broken library raises instead of printing a wrong FID.
    """
    def as_float64(a):
        return torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=torch.float64)

    mu1, mu2 = as_float64(mu1).reshape(-1), as_float64(mu2).reshape(-1)
    s1, s2 = as_float64(sigma1), as_float64(sigma2)
    if (s1.ndim != 2 or mu1.shape != mu2.shape or s1.shape != s2.shape
            or s1.shape != (mu1.numel(), mu1.numel())):
        raise UserError(f"statistics do not match: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                        f"sigma {tuple(s1.shape)} vs {tuple(s2.shape)}")
    for name, a in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not torch.isfinite(a).all():
            raise UserError(f"{name} contains NaN/inf: recompute the statistics (were the "
                            "features finite?)")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2  # covariances are symmetric only up to round-off

    # eigenvalues (d,) of a covariance; those at round-off level (or negative) -> 0
    def above_round_off(w):
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
    # the rank largest; the rest is round-off
    tr_sqrt = eig_m[len(eig_m) - rank:].clamp(min=0).sqrt().sum().item()
    # Checks: sum lambda(M) = tr(S1 S2) = sum(S1 * S2);
    # tr sqrt(S1 S2) <= sqrt(tr S1 tr S2) (Cauchy-Schwarz).
    tr1, tr2, tr_s1s2 = s1.trace().item(), s2.trace().item(), (s1 * s2).sum().item()
    scale = (torch.linalg.norm(s1) * torch.linalg.norm(s2)).item()
    bound = math.sqrt(max(tr1 * tr2, 0.0))
    if abs(eig_m.sum().item() - tr_s1s2) > 1e-6 * scale or tr_sqrt > bound * (1 + 1e-6) + 1e-12:
        raise RuntimeError("frechet_distance: the linear algebra library returned inconsistent "
                           f"results (sum of eigenvalues {eig_m.sum().item():.6g} vs tr(S1 S2) "
                           f"{tr_s1s2:.6g}; tr sqrt(S1 S2) {tr_sqrt:.6g} vs bound {bound:.6g}): "
                           "the installation is broken and the FID would be wrong")
    diff = mu1 - mu2
    # >= 0 exactly; round-off can dip below
    return max((diff @ diff).item() + tr1 + tr2 - 2 * tr_sqrt, 0.0)
