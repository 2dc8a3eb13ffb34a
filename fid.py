"""Evaluation: FID, Inception Score and precision/recall of generated samples, and rFID of
reconstructions, computed the way the ImageNet 256x256 numbers we compare against were computed.

Every number in the README comes from this file. It implements SPEC section 3:

- `FIDInception`: the FID variant of Inception-v3 (the 2015 TensorFlow graph ported by pytorch-fid).
  It loads pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` with `strict=True` and gives the same
  2048-d pool features as pytorch-fid, plus the 1008-way logits that the Inception Score uses.
- `compute_activations`: batched feature extraction over an image folder, an ADM `.npz` or in-memory
  uint8 images, sharded over `torchrun` ranks, always in true float32 (no bf16, no TF32).
- `FIDStatistics` / `frechet_distance`: the Gaussian fit of the features and the distance between two
  fits, with a matrix square root that survives near-singular covariances.
- `inception_score` (10 splits) and `precision_recall` (k = 3), as the ADM evaluation suite does them.
- `evaluate`: samples vs reference -> dict of metrics; the CLI (`python fid.py SAMPLES REFERENCE`) and
  the training scripts (rFID of reconstructions) call it.

Inputs are a folder of images, an ADM `.npz` (`arr_0`, uint8 NHWC, as samples are written), or a
statistics `.npz` (`mu`, `sigma`) that this file writes for reuse (`--save_stats`).

How our numbers relate to the ADM (TensorFlow) evaluator's:
- Same network weights, but the TensorFlow graph resizes the input with its own bilinear kernel, and
  TensorFlow and PyTorch kernels round differently; pytorch-fid documents that these give slightly
  different FIDs. Compare numbers only when they come from the same tool.
- The ADM reference batch `VIRTUAL_imagenet256_labeled.npz` also stores `mu`/`sigma` computed with
  TensorFlow. We ignore them and compute the reference statistics from its images with *our*
  network, so that both sides of the distance come from one implementation (mixing the two adds a
  bias that has nothing to do with the samples).
"""

import argparse
import contextlib
import json
import math
import os
import struct
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from common import DistEnv, Logger, cleanup_distributed, load_checkpoint, pretrained_file, setup_distributed
from data import ImageFolder, count_skipped, eval_loader, is_image_file

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FEATURE_DIM = 2048  # Inception pool_3 features: what FID and precision/recall are computed on
NUM_LOGITS = 1008   # the 2015 graph's classifier: 1000 ImageNet classes + 8 unused ones


# ----------------------------------------------------------------------------------------------------
# The FID Inception-v3
#
# The layout (and therefore every parameter name) is torchvision's Inception3, so pytorch-fid's weight
# file loads strictly. Four details make it the *FID* Inception rather than torchvision's:
#   - the average pools in the A, C and E blocks do not count the zero padding (TensorFlow's
#     behaviour), so border pixels are averaged over fewer values;
#   - the last block (Mixed_7c) max-pools in its pool branch (a quirk of the TF graph);
#   - 1008 output classes;
#   - inputs are resized to 299x299 and scaled to [-1, 1] inside the network.


class BasicConv2d(nn.Module):
    """Convolution (no bias: the BatchNorm's shift replaces it) -> BatchNorm (eps 0.001, TF's) -> ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                              bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool_no_pad(x):
    # TensorFlow averages only over the real pixels of a window that hangs over the border;
    # PyTorch's default would count the zero padding and darken the borders.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/c/d (35x35): 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avg-pool->1x1, concatenated."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_no_pad(x))
        return torch.cat([b1, b5, b3, bp], 1)  # (B, 224 + pool_features, 35, 35)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35x35 -> 17x17 (strided convs next to a strided max-pool)."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], 1)  # (B, 768, 17, 17)


class InceptionC(nn.Module):
    """Mixed_6b..e (17x17): 7x7 convolutions factorised into 1x7 and 7x1."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = conv(b7d)
        bp = self.branch_pool(_avg_pool_no_pad(x))
        return torch.cat([b1, b7, b7d, bp], 1)  # (B, 768, 17, 17)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17x17 -> 8x8."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)  # (B, 1280, 8, 8)


class InceptionE(nn.Module):
    """Mixed_7b/c (8x8): branches that split into parallel 1x3 and 3x1 convolutions.

    `pool` is "avg" for Mixed_7b and "max" for Mixed_7c: the TF graph max-pools in its last block
    (pytorch-fid's FIDInceptionE_2), and the pretrained weights expect that.
    """

    def __init__(self, in_channels, pool: str):
        super().__init__()
        assert pool in ("avg", "max")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        if self.pool == "avg":
            pooled = _avg_pool_no_pad(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3d, bp], 1)  # (B, 320 + 768 + 768 + 192 = 2048, 8, 8)


class FIDInception(nn.Module):
    """Inception-v3 as used for FID. forward(x): x (B, 3, H, W) float in [0, 1], any H and W
    -> pool features (B, 2048) and logits (B, 1008).

    The logits are `pool @ fc.weight.T` *without* `fc.bias`: the Inception Score has always been
    computed from the classifier's MatMul output before the bias (the original IS code, ADM's
    evaluator and torch-fidelity's `logits_unbiased` all do this), so we do too. `fc.bias` is still
    a parameter so that the weight file loads strictly.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_LOGITS)
        self.weights_name = "uninitialised"  # says where the weights came from; set by load_inception

    def forward(self, x):
        # Resize exactly as pytorch-fid does (bilinear, half-pixel centres, no antialiasing), then
        # [0, 1] -> [-1, 1], the range the TF graph was trained on.
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1                                   # (B, 3, 299, 299)
        x = self.Conv2d_1a_3x3(x)                       # (B, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)                       # (B, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)                       # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)    # (B, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)                       # (B, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)                       # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)    # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)                            # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7a(x)                            # (B, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))             # (B, 2048, 8, 8)
        # The same pooling op as pytorch-fid (not .mean), so the features match to the last bit.
        pool = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)  # (B, 2048)
        logits = pool @ self.fc.weight.t()              # (B, 1008), no bias (see the class docstring)
        return pool, logits

    @torch.no_grad()
    def randomize_(self, seed: int = 0):
        """Random weights whose activations stay O(1) through the 94 layers (He-initialised convs,
        BatchNorm statistics and affine parameters drawn near identity). For tests and the demo
        only: nothing computed with them is a meaningful FID."""
        g = torch.Generator().manual_seed(seed)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        return self


def load_inception(ckpt: str | None = None, random_weights: bool = False, device="cpu",
                   seed: int = 0) -> FIDInception:
    """The FID Inception in eval mode, float32, no gradients, on `device`.

    Weights: `ckpt` if given, else pytorch-fid's file from the torch.hub cache (downloaded there if
    possible; offline, the error says where to put it). `random_weights=True` is for tests and the
    offline demo only, and says so loudly.
    """
    model = FIDInception()
    if random_weights:
        msg = (f"FID Inception with RANDOM weights (seed {seed}): for tests/demo only; "
               "FID/IS/precision/recall computed with it are meaningless")
        warnings.warn(msg, stacklevel=2)
        model.randomize_(seed)
        model.weights_name = f"RANDOM (seed {seed}, test only)"
    else:
        path = pretrained_file(FID_WEIGHTS_URL, ckpt, "FID Inception weights", "--inception_ckpt")
        state = load_checkpoint(path, "FID Inception weights")
        try:
            model.load_state_dict(state, strict=True)
        except (RuntimeError, TypeError, AttributeError) as e:
            raise RuntimeError(f"{path} is not pytorch-fid's {os.path.basename(FID_WEIGHTS_URL)} "
                               f"(an Inception3 state dict with 1008 classes): {e}") from e
        model.weights_name = os.path.basename(path)
    return model.to(device).float().eval().requires_grad_(False)


@contextlib.contextmanager
def exact_float32(device: torch.device):
    """Run the body in true float32: no autocast (a caller's bf16 context would change the features)
    and no TF32 (common.setup_distributed turns it on for training; its 10-bit mantissa moves FID)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ----------------------------------------------------------------------------------------------------
# Image sources: a folder, an ADM .npz, in-memory uint8 images, or saved statistics


def as_nchw_uint8(images) -> torch.Tensor:
    """Check and convert a batch of images: numpy arrays are NHWC (ADM's .npz layout), torch tensors
    are NCHW (what data.py and data.to_uint8 produce). Returns a uint8 (B, 3, H, W) tensor."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            hint = (" It looks like NCHW: ADM's layout is NHWC, use arr.transpose(0, 2, 3, 1)."
                    if images.ndim == 4 and images.shape[1] == 3 else "")
            raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.shape}.{hint}")
        if not (images.flags.writeable and images.flags.c_contiguous):
            images = np.array(images)  # a writable copy (memory maps are read-only; torch wants writable)
        t = torch.from_numpy(images).permute(0, 3, 1, 2)  # NHWC -> NCHW (a view)
    elif isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a uint8 tensor of shape (B, 3, H, W), got {tuple(images.shape)}")
        t = images
    else:
        raise TypeError(f"expected uint8 images as a numpy array or torch tensor, got {type(images).__name__}")
    if t.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images in 0..255, got {t.dtype}: FID is defined on the quantised "
                         "images you would save. Convert model outputs in [-1, 1] with data.to_uint8(x).")
    return t


class ArrayImages(Dataset):
    """In-memory uint8 images as a dataset of (3, H, W) tensors (numpy NHWC or torch NCHW)."""

    def __init__(self, images):
        self._images = images
        if len(images) == 0:
            raise ValueError("no images (an empty array)")
        as_nchw_uint8(images[:1])  # validate the layout and dtype now, with a clear message

    @property
    def images(self):
        return self._images

    @property
    def image_hw(self):
        shape = self.images.shape
        return tuple(shape[1:3]) if isinstance(self.images, np.ndarray) else tuple(shape[2:4])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return as_nchw_uint8(self.images[i: i + 1])[0]


class NpzImages(ArrayImages):
    """The `arr_0` images of an ADM-style .npz, read lazily.

    50K samples at 256px are 9.8 GB, once per rank under torchrun. `np.savez` stores arrays
    uncompressed inside the zip, so we memory-map `arr_0.npy` straight out of the file and every
    rank pages in only the images it reads. Compressed files (`np.savez_compressed`) cannot be mapped
    and are read whole into memory, on every rank.
    """

    def __init__(self, path: str):
        self.path = path
        self._array = None  # opened lazily, so DataLoader workers each open their own map
        self._offset, self._shape, self._dtype, self._fortran = self._locate(path)
        if self._dtype.hasobject:
            raise ValueError(f"{path}: 'arr_0' holds Python objects, which is what np.savez makes of images of "
                             "different sizes. All images in one .npz must share one H x W: crop/resize them "
                             "first (e.g. data.center_crop_arr), or put them in a folder and pass --image_size.")
        if len(self._shape) == 0 or self._shape[0] == 0:
            raise ValueError(f"{path}: 'arr_0' has shape {self._shape}, no images")
        as_nchw_uint8(np.zeros((1, *self._shape[1:]), dtype=self._dtype))  # layout/dtype check, no read

    @staticmethod
    def _locate(path):
        """(byte offset of the array data, or None if it cannot be mapped; shape; dtype; fortran order)."""

        def read_header(f):  # the .npy header; None for a format version we do not parse
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                return np.lib.format.read_array_header_1_0(f)
            if version == (2, 0):
                return np.lib.format.read_array_header_2_0(f)
            return None

        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo("arr_0.npy")
            if info.compress_type == zipfile.ZIP_STORED:
                with open(path, "rb") as f:
                    # The member's bytes follow its 30-byte local header, file name and extra field.
                    f.seek(info.header_offset + 26)
                    name_len, extra_len = struct.unpack("<HH", f.read(4))
                    f.seek(info.header_offset + 30 + name_len + extra_len)
                    header = read_header(f)
                    if header is not None:
                        shape, fortran, dtype = header
                        return f.tell(), shape, dtype, fortran
            with zf.open("arr_0.npy") as f:  # compressed: read only the header now
                header = read_header(f)
        if header is None:  # an unusual .npy version: read the array to learn its shape
            try:
                arr = np.load(path)["arr_0"]
            except ValueError:  # object arrays (images of different sizes) refuse to load without pickle
                return None, (0,), np.dtype(object), False
            return None, arr.shape, arr.dtype, False
        shape, fortran, dtype = header
        return None, shape, dtype, fortran

    @property
    def images(self):
        if self._array is None:
            if self._offset is not None:
                self._array = np.memmap(self.path, dtype=self._dtype, mode="r", offset=self._offset,
                                        shape=self._shape, order="F" if self._fortran else "C")
            else:
                self._array = np.load(self.path)["arr_0"]
        return self._array

    @property
    def image_hw(self):
        return tuple(self._shape[1:3])

    def __len__(self):
        return self._shape[0]

    def __getstate__(self):  # DataLoader workers under spawn: send the location, not the pages
        return {**self.__dict__, "_array": None}


@dataclass
class FIDStatistics:
    """The Gaussian that FID fits to a set of features: mean (2048,) and covariance (2048, 2048), in
    float64. `features` (N, 2048) is kept only when precision/recall will need the points themselves."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    features: np.ndarray | None = None

    @classmethod
    def from_features(cls, features: np.ndarray, keep_features: bool = False, name: str = "features"):
        features = np.asarray(features, dtype=np.float32)
        n, d = features.shape
        if n < 2:
            raise ValueError(f"{name}: {n} image(s); a covariance needs at least 2 (FID is normally "
                             "computed on 50,000 samples, rFID on the 50,000 ImageNet validation images)")
        if not np.isfinite(features).all():
            raise ValueError(f"{name}: the Inception features contain NaN/inf; the weights file is probably "
                             "corrupt (re-download it) or the network ran in reduced precision")
        if n < d:
            warnings.warn(f"{name}: {n} images < {d} feature dimensions, so the covariance is rank-deficient: "
                          "FID is then strongly biased upwards and not comparable to published numbers "
                          "(use 50,000 samples; at least 10,000)", stacklevel=2)
        # Two passes in float64 over chunks: the mean first, then the centred products. Summing
        # 50K float32 outer products directly would lose digits that FID (a difference of traces) needs.
        mu = features.mean(axis=0, dtype=np.float64)
        sigma = np.zeros((d, d))
        for i in range(0, n, 4096):
            x = features[i: i + 4096].astype(np.float64) - mu
            sigma += x.T @ x
        sigma /= n - 1
        return cls(mu, sigma, n, features if keep_features else None)

    def save(self, path: str):
        """Write `mu`, `sigma`, `num_images` (and `features` if kept) to an .npz, atomically. The file is
        also a valid pytorch-fid statistics file (`mu`, `sigma`)."""
        arrays = {"mu": self.mu, "sigma": self.sigma, "num_images": np.int64(self.num_images)}
        if self.features is not None:
            arrays["features"] = self.features.astype(np.float32)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
                np.savez(f, **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str, npz=None):
        npz = npz if npz is not None else np.load(path)
        mu, sigma = np.asarray(npz["mu"], np.float64), np.asarray(npz["sigma"], np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
            raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together; expected "
                             f"({FEATURE_DIM},) and ({FEATURE_DIM}, {FEATURE_DIM}) for Inception pool features")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError(f"{path}: the statistics contain NaN/inf; recompute them with fid.py --save_stats")
        features = npz["features"] if "features" in npz.files else None
        if features is not None and (features.ndim != 2 or features.shape[1] != mu.size):
            raise ValueError(f"{path}: 'features' has shape {features.shape}, expected (N, {mu.size})")
        num_images = int(npz["num_images"]) if "num_images" in npz.files else (
            len(features) if features is not None else -1)  # -1: unknown (e.g. a pytorch-fid file)
        if "mu_s" in npz.files:
            warnings.warn(f"{path} looks like ADM/TensorFlow statistics (it has mu_s/sigma_s). FID between them "
                          "and features of this PyTorch network mixes two Inception implementations; pass the "
                          "images (arr_0) instead", stacklevel=2)
        return cls(mu, sigma, num_images, features)

    def frechet_distance(self, other: "FIDStatistics") -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)


def _first_image_size(root: str) -> int:
    """Short side of the first image under `root` (sorted walk), the default crop size of a folder."""
    from PIL import Image

    for dirpath, dirnames, names in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(names):
            if is_image_file(name):
                with Image.open(os.path.join(dirpath, name)) as img:
                    return min(img.size)
    raise ValueError(f"no images found in {root!r}")


def load_source(path: str, image_size: int | None = None, log=print):
    """What a path on the command line refers to:

    - a folder -> `data.ImageFolder` (centre-cropped to `image_size` with the ADM crop; default: the
      size of the first image, right for folders of generated samples; use 256 for ImageNet);
    - an .npz with `arr_0` -> `NpzImages` (ADM's layout; any `mu`/`sigma` stored beside the images
      are TensorFlow statistics and are ignored, see the module docstring);
    - an .npz with `mu` and `sigma` -> `FIDStatistics`.
    """
    if os.path.isdir(path):
        size = image_size or _first_image_size(path)
        return ImageFolder(path, size)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: expected a folder of images, an ADM .npz (arr_0) or "
                                "a statistics .npz (mu, sigma)")
    try:
        npz = np.load(path)
    except Exception as e:
        raise ValueError(f"could not read {path} as an .npz file ({type(e).__name__}: {e}); expected a folder of "
                         "images, an ADM .npz (arr_0, uint8 NHWC) or a statistics .npz (mu, sigma)") from e
    if not hasattr(npz, "files"):
        raise ValueError(f"{path} is a single .npy array, not an .npz: save images with np.savez(path, arr_0=images)")
    if "arr_0" in npz.files:
        if "mu" in npz.files:
            log(f"{path}: computing statistics from its images (arr_0); ignoring the TensorFlow mu/sigma in it")
        return NpzImages(path)
    if "mu" in npz.files and "sigma" in npz.files:
        return FIDStatistics.load(path, npz)
    raise ValueError(f"{path} has arrays {npz.files}; expected 'arr_0' (images, uint8 NHWC, as ADM and sample.py "
                     "write them) or 'mu' and 'sigma' (statistics, as fid.py --save_stats writes them)")


def _image_hw(source):
    if isinstance(source, ImageFolder):
        return (source.image_size, source.image_size)
    return getattr(source, "image_hw", None)


# ----------------------------------------------------------------------------------------------------
# Feature extraction


def gather_rows(local: torch.Tensor, dist_env: DistEnv, interleaved: bool) -> torch.Tensor:
    """Concatenate every rank's rows of a 2-D float tensor, on every rank. Ranks may hold different
    numbers of rows (an empty rank does not even know the width), so counts and widths go first.

    `interleaved`: rank r held items r, r + W, r + 2W, ... of one dataset (data.eval_loader's split),
    and the rows are put back in dataset order, so results do not depend on the number of ranks.
    """
    if not dist_env.distributed:
        return local
    world = dist_env.world_size
    # NCCL only moves CUDA tensors; gloo moves CPU tensors. dist_env.device is the right one for each.
    shape = torch.tensor([local.shape[0], local.shape[1] if local.shape[0] else 0], device=dist_env.device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    counts = [int(s[0]) for s in shapes]
    width = max(int(s[1]) for s in shapes)
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
    """Pool features (N, 2048) and logits (N, 1008) of a set of images, as float32 numpy arrays,
    identical on every rank.

    `images` is one of
    - the whole set, split over the ranks here: a path (folder or ADM .npz), a Dataset of uint8
      (3, H, W) images, or uint8 images in memory (numpy NHWC, or a torch NCHW tensor);
    - an iterable of uint8 (B, 3, H, W) batches (e.g. a DataLoader over this rank's shard): taken as
      this rank's part, and the parts are concatenated in rank order.
    """
    device = next(model.parameters()).device
    dist_env = dist_env or DistEnv(0, 0, 1, device)
    if isinstance(images, (str, os.PathLike)):
        images = load_source(os.fspath(images), image_size)
        if isinstance(images, FIDStatistics):
            raise ValueError("this input is a statistics file; features need images (a folder or an ADM .npz)")
    if isinstance(images, (np.ndarray, torch.Tensor)):
        images = ArrayImages(images)
    whole_set = isinstance(images, Dataset)
    if whole_set:
        # Decoding JPEGs wants worker processes; arrays and memory maps are only sliced.
        workers = min(num_workers, len(os.sched_getaffinity(0))) if isinstance(images, ImageFolder) else 0
        loader = eval_loader(images, batch_size, dist_env, num_workers=workers)
        total = len(loader.dataset)
    else:
        loader, total = images, None
    pools, logits = [], []
    with exact_float32(device), tqdm(total=total, desc=desc, unit="img", disable=not (progress and dist_env.is_main),
                                     dynamic_ncols=True) as bar:
        for batch in loader:
            if isinstance(batch, (list, tuple)):  # (images, labels) from ImageFolder
                batch = batch[0]
            x = as_nchw_uint8(batch).to(device, non_blocking=True).float().div_(255)  # (B, 3, H, W) in [0, 1]
            pool, logit = model(x)  # (B, 2048), (B, 1008)
            pools.append(pool.float().cpu())
            logits.append(logit.float().cpu())
            bar.update(x.shape[0])
    pools, logits = [gather_rows(torch.cat(rows) if rows else torch.zeros((0, 0)), dist_env, whole_set)
                     for rows in (pools, logits)]
    if pools.shape[0] == 0:
        raise ValueError("no images to compute features of (an empty folder, array or loader?)")
    skipped = count_skipped(images, dist_env)
    if skipped and dist_env.is_main:
        warnings.warn(f"{desc}: {skipped} unreadable files were replaced by their next readable neighbour "
                      "(see the warnings above); remove or repair them for an exact FID")
    return pools.numpy(), logits.numpy()


# ----------------------------------------------------------------------------------------------------
# Metrics


@contextlib.contextmanager
def _one_thread():
    """Run the body with one CPU thread. LAPACK's symmetric eigensolvers synchronise their threads
    thousands of times per call; when another process holds a core (a DataLoader worker, the other
    torchrun ranks, a busy CI machine) every synchronisation waits for a descheduled thread. We measured
    27 s with 2 threads against 3.7 s with 1 for a 2048x2048 `eigh` on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
        |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)).

    How tr(sqrt(S1 S2)) is computed, and why not with scipy.linalg.sqrtm(S1 @ S2) as pytorch-fid and
    ADM do: S1 S2 is not symmetric, so sqrtm needs a general (complex Schur) decomposition, which is
    fragile when the covariances are near-singular (few samples, dead features) and was simply wrong
    under one NumPy/SciPy BLAS build (FIDs of 20-40 instead of 2). We only need the trace, and
        S1 S2 = R (R S2 R) R^-1   with R = sqrt(S1) (symmetric),
    so S1 S2 has the same eigenvalues as M = R S2 R, which is symmetric positive semi-definite. Hence
        tr(sqrt(S1 S2)) = sum_i sqrt(lambda_i(M)),
    computed with symmetric eigendecompositions in float64 (R from the eigenvectors of S1, then the
    eigenvalues of M). Symmetric solvers always return real eigenvalues. Round-off turns the zero
    eigenvalues of a rank-deficient matrix into +-1e-16 * lambda_max, and a square root would blow those
    up (sqrt(1e-13) = 3e-7, times 2000 of them). So: eigenvalues of S1 and S2 below the round-off level
    d * eps * lambda_max are 0 (this is how matrix-rank routines count the rank); M has rank at most
    min(rank S1, rank S2), so only that many of its largest eigenvalues are kept (negatives -> 0). Not a
    threshold on M's own eigenvalues: they scale like lambda(S)^2, so it would drop genuine small
    variances and bias the FID upwards. (For singular S1 the identity above holds by continuity.)
    We use torch's LAPACK (MKL in the x86 wheels) rather than NumPy's: it does not depend
    on how NumPy/SciPy were built, and on rank-deficient 2048x2048 covariances NumPy's OpenBLAS `eigh`
    took 21 s here against 6 s. Two exact identities then check the linear algebra itself, so a broken
    library raises instead of printing a wrong FID.
    """
    def as_float64(a):
        return torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=torch.float64)

    mu1, mu2 = as_float64(mu1).reshape(-1), as_float64(mu2).reshape(-1)
    s1, s2 = as_float64(sigma1), as_float64(sigma2)
    if s1.ndim != 2 or mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"statistics do not match: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                         f"sigma {tuple(s1.shape)} vs {tuple(s2.shape)}")
    for name, a in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not torch.isfinite(a).all():
            raise ValueError(f"{name} contains NaN/inf: recompute the statistics (were the features finite?)")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2  # exact symmetry; covariances are only symmetric to round-off

    def above_round_off(w):  # eigenvalues (d,) of a covariance; those at round-off level (or negative) -> 0
        noise = w.numel() * torch.finfo(w.dtype).eps * w.abs().max()
        return torch.where(w > noise, w, 0.0)

    with _one_thread():
        w1, v1 = torch.linalg.eigh(s1)
        w2 = torch.linalg.eigvalsh(s2)
    w1, w2 = above_round_off(w1), above_round_off(w2)
    sqrt_s1 = (v1 * w1.sqrt()) @ v1.T  # R = V diag(sqrt(w)) V^T     (d, d)
    m = sqrt_s1 @ s2 @ sqrt_s1         # M = R S2 R, symmetric PSD    (d, d)
    with _one_thread():
        eig_m = torch.linalg.eigvalsh((m + m.T) / 2)  # ascending
    rank = min(int((w1 > 0).sum()), int((w2 > 0).sum()))
    tr_sqrt = eig_m[len(eig_m) - rank:].clamp(min=0).sqrt().sum().item()  # the rank largest; the rest is round-off

    # Checks: the eigenvalues of M sum to tr(M) = tr(S1 S2) = sum(S1 * S2) (S2 symmetric); and
    # tr(sqrt(S1 S2)) = ||R sqrt(S2)||_nuclear <= ||R||_F ||sqrt(S2)||_F = sqrt(tr S1 tr S2) (Cauchy-Schwarz),
    # which is also what makes FID >= 0.
    tr1, tr2 = s1.trace().item(), s2.trace().item()
    tr_s1s2 = (s1 * s2).sum().item()
    scale = (torch.linalg.norm(s1) * torch.linalg.norm(s2)).item()
    bound = math.sqrt(max(tr1 * tr2, 0.0))
    if abs(eig_m.sum().item() - tr_s1s2) > 1e-6 * scale or tr_sqrt > bound * (1 + 1e-6) + 1e-12:
        raise RuntimeError("frechet_distance: the linear algebra library returned inconsistent results "
                           f"(sum of eigenvalues {eig_m.sum().item():.6g} vs tr(S1 S2) {tr_s1s2:.6g}; "
                           f"tr sqrt(S1 S2) {tr_sqrt:.6g} vs bound {bound:.6g}): "
                           "the installation is broken and the FID would be wrong")
    diff = mu1 - mu2
    fid = (diff @ diff).item() + tr1 + tr2 - 2 * tr_sqrt
    return max(fid, 0.0)  # the exact value is >= 0; only round-off can make it a hair negative


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) from Inception logits (N, 1008), as ADM computes
    it: softmax over all 1008 outputs (ADM keeps the 8 classes that are not ImageNet's; so do we),
    the samples cut into `splits` consecutive parts (ADM uses parts of 5000, i.e. 10 for 50K), the
    score computed per part with that part's marginal p(y). Returns (mean, std) over the parts."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if logits.ndim != 2 or logits.shape[0] < splits:
        raise ValueError(f"inception_score needs (N, classes) logits with N >= splits={splits}, "
                         f"got {tuple(logits.shape)}")
    log_p = F.log_softmax(logits, dim=1)  # log p(y|x); log-space avoids log(0) for confident samples
    scores = []
    for part in log_p.tensor_split(splits):  # near-equal consecutive parts (exactly 5000 each for 50K)
        log_marginal = torch.logsumexp(part, dim=0) - math.log(part.shape[0])  # log p(y) of this part
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def _knn_radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set, (N,)."""
    radii = []
    for i in range(0, x.shape[0], batch_size):
        d = torch.cdist(x[i: i + batch_size], x)  # (b, N); the point itself is at distance ~0
        radii.append(d.kthvalue(k + 1, dim=1).values)  # k + 1: skip the point itself, as ADM does
    return torch.cat(radii)


@torch.inference_mode()
def precision_recall(real_feats, fake_feats, k: int = 3, batch_size: int = 1024,
                     device=None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019), as in ADM's evaluator, with k = 3.

    Each set's manifold is the union of balls around its points, radius = distance to the point's k-th
    nearest neighbour. Precision = fraction of fake points inside the real manifold (are samples
    realistic?); recall = fraction of real points inside the fake manifold (is the data covered?).
    Distances are computed a block of rows at a time, so 50K x 50K never sits in memory at once.
    (ADM computes distances in float16 where they fit; we use float32, so ties can differ at 1e-4.)
    """
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float32, device=device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall needs (N, D) features of equal D, "
                         f"got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision_recall with k={k} needs more than {k} points per set, "
                         f"got {len(real)} real and {len(fake)} fake")
    with exact_float32(device):
        radius_real, radius_fake = _knn_radii(real, k, batch_size), _knn_radii(fake, k, batch_size)
        fake_in_real = torch.zeros(len(fake), dtype=torch.bool, device=device)
        real_in_fake = torch.zeros(len(real), dtype=torch.bool, device=device)
        for i in range(0, len(real), batch_size):  # one pass over all real-fake distances serves both
            d = torch.cdist(real[i: i + batch_size], fake)  # (b, N_fake)
            fake_in_real |= (d <= radius_real[i: i + batch_size, None]).any(0)
            real_in_fake[i: i + batch_size] = (d <= radius_fake[None, :]).any(1)
    return fake_in_real.float().mean().item(), real_in_fake.float().mean().item()


# ----------------------------------------------------------------------------------------------------
# Reconstruction metrics (train_tokenizer.py --eval), on uint8 images as they would be saved


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of uint8 images (B, 3, H, W), one value per image:
    10 log10(255^2 / MSE). Identical images give +inf."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of uint8 images (B, 3, H, W), one value per image:
    local means, variances and covariance under an 11x11 Gaussian window (sigma 1.5), compared with
    the constants (0.01 * 255)^2 and (0.03 * 255)^2, averaged over the valid positions and channels."""
    a, b = a.double(), b.double()
    C = a.shape[1]
    g = torch.exp(-((torch.arange(11, dtype=torch.float64, device=a.device) - 5) ** 2) / (2 * 1.5 ** 2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).expand(C, 1, 11, 11)  # one window per channel

    def blur(x):  # local weighted mean, 'valid' positions only: (B, C, H - 10, W - 10)
        return F.conv2d(x, window, groups=C)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1)


# ----------------------------------------------------------------------------------------------------
# Samples vs reference


def evaluate(samples, reference, *, model: FIDInception | None = None, dist_env: DistEnv | None = None,
             batch_size: int = 50, num_workers: int = 4, prc: bool = False, image_size: int | None = None,
             inception_ckpt: str | None = None, random_inception: bool = False, device="auto",
             save_stats: str | None = None, progress: bool = True, log=None) -> dict:
    """FID of `samples` against `reference` (and the samples' Inception Score; precision/recall with
    `prc`). Each is a path (folder / ADM .npz / statistics .npz), uint8 images in memory (numpy NHWC
    or torch NCHW), a Dataset of uint8 (3, H, W) images, or an iterable of uint8 (B, 3, H, W) batches
    holding this rank's share (e.g. reconstructions made on this rank; see compute_activations).
    Under torchrun pass the run's `dist_env`: feature extraction is split over the ranks, the metrics
    are computed on rank 0 and the returned dict is the same on every rank.

    `save_stats`: write the reference's statistics there (rank 0) for reuse; with `prc` they include
    the reference features (N x 2048 float32), because precision/recall need the points themselves.
    """
    if dist_env is None:
        dev = next(model.parameters()).device if model is not None else torch.device(
            "cuda" if (device in ("auto", "cuda") and torch.cuda.is_available()) else "cpu")
        dist_env = DistEnv(0, 0, 1, dev)
    log = log or Logger(dist_env).info
    if model is None:
        model = load_inception(inception_ckpt, random_inception, dist_env.device)

    def prepare(src, what):
        if isinstance(src, (str, os.PathLike)):
            src = load_source(os.fspath(src), image_size, log=log)
        elif isinstance(src, (np.ndarray, torch.Tensor)):
            src = ArrayImages(src)
        if not isinstance(src, (Dataset, FIDStatistics)) and not hasattr(src, "__iter__"):
            raise TypeError(f"{what}: expected a path, uint8 images, a Dataset or an iterable of uint8 batches, "
                            f"got {type(src).__name__}")
        return src

    samples, reference = prepare(samples, "samples"), prepare(reference, "reference")
    if prc:  # fail before the expensive part, on every rank alike
        for what, src in (("samples", samples), ("reference", reference)):
            if isinstance(src, FIDStatistics) and src.features is None:
                raise ValueError(f"precision/recall (--prc) need the {what}' features, but that statistics file "
                                 "has only mu/sigma: pass the images, or write the statistics with --prc --save_stats")
    hw_s, hw_r = _image_hw(samples), _image_hw(reference)
    if hw_s and hw_r and hw_s != hw_r:
        log(f"warning: samples are {hw_s[0]}x{hw_s[1]} but the reference images are {hw_r[0]}x{hw_r[1]}; "
            "both are resized to 299x299, but FID across resolutions is not a like-for-like comparison")

    def activations(src, what):
        if isinstance(src, FIDStatistics):
            return None, None
        return compute_activations(src, model, dist_env, batch_size, num_workers, progress=progress,
                                   desc=f"{what} features")

    fake_feats, fake_logits = activations(samples, "sample")
    real_feats, _ = activations(reference, "reference")  # the reference's IS is not reported

    result = None
    if dist_env.is_main:
        fake_stats = samples if isinstance(samples, FIDStatistics) else FIDStatistics.from_features(
            fake_feats, keep_features=prc, name="samples")
        real_stats = reference if isinstance(reference, FIDStatistics) else FIDStatistics.from_features(
            real_feats, keep_features=prc, name="reference")
        if save_stats:
            if isinstance(reference, FIDStatistics):
                log(f"note: the reference is already a statistics file; not writing {save_stats}")
            else:
                real_stats.save(save_stats)
                log(f"reference statistics ({real_stats.num_images} images) written to {save_stats}")
        result = {"fid": fake_stats.frechet_distance(real_stats),
                  "num_samples": fake_stats.num_images, "num_reference": real_stats.num_images}
        if fake_logits is not None:
            # 10 parts as ADM (5000 each for 50K); a tiny set (a smoke test) is scored as one part.
            splits = 10 if len(fake_logits) >= 100 else 1
            result["inception_score"], result["inception_score_std"] = inception_score(fake_logits, splits)
            result["inception_score_splits"] = splits
        else:
            log("note: the samples are a statistics file, which has no logits: no Inception Score")
        if prc:
            result["precision"], result["recall"] = precision_recall(real_stats.features, fake_stats.features,
                                                                     device=dist_env.device)
        result["inception_weights"] = model.weights_name
    if dist_env.distributed:  # every rank returns the same dict (tiny, so pickling is fine)
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


# ----------------------------------------------------------------------------------------------------
# Benchmark: our feature extraction vs pytorch-fid's on the same images and device


def benchmark(num_images: int = 64, image_size: int = 256, batch_size: int = 32, device: str = "cpu",
              rounds: int = 3) -> dict:
    """Images/s of FIDInception and pytorch-fid's InceptionV3 (same random weights, same float images
    in [0, 1]); best of `rounds` timed passes each, interleaved, after a warm-up batch. Needs pytorch-fid."""
    import pytorch_fid.inception as pfi

    dev = torch.device(device)
    ours = load_inception(random_weights=True, device=dev)
    state = ours.state_dict()
    # pytorch-fid fetches its weights by URL; hand it our random state dict instead (no network).
    fetch = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        theirs = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]]).to(dev).eval()
    finally:
        pfi.load_state_dict_from_url = fetch
    images = torch.rand(num_images, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    batches = [b.to(dev) for b in images.split(batch_size)]

    def run(fn):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        outs = [fn(b) for b in batches]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cat(outs)

    extract = {"ours": lambda b: ours(b)[0], "pytorch_fid": lambda b: theirs(b)[0].flatten(1)}  # (B, 2048)
    times, feats = {name: [] for name in extract}, {}
    with torch.inference_mode(), exact_float32(dev):
        for fn in extract.values():
            fn(batches[0])  # warm-up (allocator, oneDNN/cuDNN kernel choice)
        for i in range(rounds):
            # Alternate which goes first, so that drifting machine load hits both alike.
            for name in list(extract) if i % 2 == 0 else list(extract)[::-1]:
                t, feats[name] = run(extract[name])
                times[name].append(t)
    result = {"device": str(dev), "num_images": num_images, "image_size": image_size, "batch_size": batch_size,
              "ours_img_per_s": num_images / min(times["ours"]),
              "pytorch_fid_img_per_s": num_images / min(times["pytorch_fid"]),
              "max_abs_feature_diff": (feats["ours"] - feats["pytorch_fid"]).abs().max().item(),
              "seconds_per_pass": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
              "cpu_threads": torch.get_num_threads()}
    result["ratio"] = result["ours_img_per_s"] / result["pytorch_fid_img_per_s"]
    return result


# ----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="FID / Inception Score / precision-recall of samples against a "
                                "reference (folders, ADM .npz files or statistics .npz files). Under torchrun, "
                                "feature extraction is split over the ranks.")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="SAMPLES REFERENCE (folder, ADM .npz or statistics .npz each); or one path with "
                        "--save_stats to only write its statistics")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--save_stats", help="write the reference statistics (mu, sigma; + features with --prc) here")
    p.add_argument("--prc", action="store_true", help="also precision and recall (k=3; costs N^2 distances)")
    p.add_argument("--batch_size", type=int, default=50, help="images per forward pass per rank")
    p.add_argument("--num_workers", type=int, default=4, help="image decoding workers for folders")
    p.add_argument("--image_size", type=int, default=None,
                   help="centre-crop size for folders (default: the first image's short side; 256 for ImageNet)")
    p.add_argument("--inception_ckpt", help=f"local path of {os.path.basename(FID_WEIGHTS_URL)} (default: the "
                   "torch.hub cache, downloaded if possible)")
    p.add_argument("--random_inception", action="store_true", help="random Inception weights: tests/demo only")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--bench", action="store_true", help="time our feature extraction against pytorch-fid's")
    p.add_argument("--bench_images", type=int, default=64, help="images for --bench (size: --image_size, default 256)")
    args = p.parse_args(argv)
    if not args.bench and not (len(args.paths) == 2 or (len(args.paths) == 1 and args.save_stats)):
        p.error("give SAMPLES and REFERENCE (or one path with --save_stats to only write its statistics)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.bench:
        dev = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
        r = benchmark(args.bench_images, args.image_size or 256, min(args.batch_size, args.bench_images), dev)
        print(json.dumps(r, indent=2))
        print(f"feature extraction on {r['device']}: ours {r['ours_img_per_s']:.2f} img/s, pytorch-fid "
              f"{r['pytorch_fid_img_per_s']:.2f} img/s, ratio {r['ratio']:.3f}")
        return r
    dist_env = setup_distributed(args.device)
    logger = Logger(dist_env)
    model = load_inception(args.inception_ckpt, args.random_inception, dist_env.device)
    if args.random_inception:
        logger.info("WARNING: random Inception weights (--random_inception): the numbers below are meaningless")

    if len(args.paths) == 1:  # statistics only
        source = load_source(args.paths[0], args.image_size, log=logger.info)
        if isinstance(source, FIDStatistics):
            raise ValueError(f"{args.paths[0]} is already a statistics file")
        feats, _ = compute_activations(source, model, dist_env, args.batch_size, args.num_workers)
        result = None
        if dist_env.is_main:
            stats = FIDStatistics.from_features(feats, keep_features=args.prc, name=args.paths[0])
            stats.save(args.save_stats)
            result = {"num_images": stats.num_images, "statistics": args.save_stats,
                      "inception_weights": model.weights_name}
            logger.info(f"statistics of {stats.num_images} images written to {args.save_stats}")
    else:
        result = evaluate(args.paths[0], args.paths[1], model=model, dist_env=dist_env,
                          batch_size=args.batch_size, num_workers=args.num_workers, prc=args.prc,
                          image_size=args.image_size, save_stats=args.save_stats, log=logger.info)
        line = f"FID {result['fid']:.4f}"
        if "inception_score" in result:
            line += f"  IS {result['inception_score']:.3f} +- {result['inception_score_std']:.3f}"
        if "precision" in result:
            line += f"  precision {result['precision']:.4f}  recall {result['recall']:.4f}"
        logger.info(line + f"  ({result['num_samples']} samples vs {result['num_reference']} reference images)")
    if dist_env.is_main and args.json:
        inputs = {"samples": args.paths[0], "reference": args.paths[1]} if len(args.paths) == 2 else {
            "images": args.paths[0]}
        with open(args.json, "w") as f:
            json.dump({**inputs, **result}, f, indent=2)
        logger.info(f"results written to {args.json}")
    cleanup_distributed()
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
