"""The built-in semantic filters: ImageNet document classes, OCR text area, NSFW detection.

Each registers itself here and imports its heavy packages only when built, so `genfoundry curate`
without semantic filters needs none of them. The ONNX models are run directly with onnxruntime, numpy
and Pillow: the packages that ship them also pull in OpenCV for their own pre- and post-processing,
which is only located here, never imported, so these filters run where OpenCV is absent.
"""

from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path

import numpy as np

from genfoundry.curation.filters import ImageFilter, MissingPackage, register, require
from genfoundry.sources import package_file

INSTALL = "pip install 'genfoundry[curate]'"
# Packages read only for the model file they ship: installed without their dependencies (OpenCV and
# others, which genfoundry never imports), as setup.sh does.
MODEL_PACKAGES = "pip install --no-deps rapidocr-onnxruntime==1.4.4 nudenet==3.4.2"


def onnx_session(path: Path, device: str, threads: int, why: str):
    """An onnxruntime session on CUDA when `device` asks for it and onnxruntime has it, else on the CPU."""
    ort = require("onnxruntime", INSTALL, why)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: onnxruntime's default, one per physical core
    providers: list = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(device.partition(":")[2] or 0)}))
        else:
            warnings.warn(f"{why} runs on the CPU: this onnxruntime has no CUDAExecutionProvider "
                          f"(install onnxruntime-gpu to run it on {device})", stacklevel=3)
    return ort.InferenceSession(str(path), options, providers=providers)


@cache
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in the classifier's index order."""
    return tuple((Path(__file__).with_name("imagenet_classes.txt")).read_text().splitlines())


# ImageNet classes whose photos are pages, screens or printed matter: where a photo classifier puts its
# mass for screenshots, scans and rendered text (on rendered pages and screenshots: web site 0.34, menu
# 0.05, book jacket and crossword puzzle 0.03, envelope 0.02, packet and binder 0.01 on average). Photos
# of computers, phones and signs (laptop, notebook, cellular telephone, street sign) are left out: they
# are photos of objects, not documents.
DOCUMENT_CLASSES = (
    "web site", "menu", "crossword puzzle", "book jacket", "comic book",  # pages, grids, covers, panels
    "envelope", "binder", "packet",                                      # paper and printed labels
    "screen", "monitor", "television",                                   # a display filling the frame
)


@register("imagenet", "EfficientNet-Lite0 ImageNet mass on document and screenshot classes; embeds for dedup")
class ImageNetFilter(ImageFilter):
    """Softmax mass of DOCUMENT_CLASSES, with the L2-normalised pooled features as embeddings."""

    name = "imagenet"
    reason = "document-like"
    threshold = 0.3  # rendered text pages and screenshots score 0.45-0.8, skimage's photos at most 0.04
    side = 224
    embeds = True

    def __init__(self, device: str = "cpu", threshold: float | None = None):
        super().__init__(device, threshold)
        import torch

        from genfoundry.curation.efficientnet import load_lite0

        self._net = load_lite0(device=device)
        names = imagenet_classes()
        self._class_index = torch.tensor([names.index(c) for c in DOCUMENT_CLASSES], device=device)

    def score(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch
        import torch.nn.functional as F

        from genfoundry.curation.efficientnet import normalize
        from genfoundry.features import full_fp32

        # Plain fp32 (no TF32) on every device, so a score does not depend on where it was computed.
        with torch.inference_mode(), full_fp32():
            x = normalize(torch.as_tensor(batch, device=self.device))
            pooled, logits = self._net.features(x)
            mass = logits.softmax(dim=1)[:, self._class_index].sum(dim=1)
            embeddings = F.normalize(pooled, dim=1)
        return mass.cpu().numpy(), embeddings.cpu().numpy()


class OnnxFilter(ImageFilter):
    """A filter whose model is an ONNX file run with onnxruntime; `threads` is onnxruntime's intra-op count."""

    package = ""   # the package that ships the model file
    model = ""     # its path inside the package

    def __init__(self, device: str = "cpu", threshold: float | None = None, threads: int = 0):
        super().__init__(device, threshold)
        why = f"the '{self.name}' filter"
        try:
            path = package_file(self.package, self.model, MODEL_PACKAGES, MissingPackage)
        except MissingPackage as e:
            raise MissingPackage(f"{why}: {e}") from None
        self._session = onnx_session(path, device, threads, why)
        self._input_name = self._session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input_name: x})[0]


# PP-OCRv4's detector was trained on OpenCV-decoded BGR images scaled to (x / 255 - 0.5) / 0.5
# (rapidocr's config.yaml Det.mean/std and its DetPreProcess); 0.3 is DBNet's binarisation threshold
# there (Det.thresh).
OCR_MEAN, OCR_STD, OCR_BINARY = 0.5, 0.5, 0.3


@register("ocr", "PP-OCRv4 text detector: fraction of the image area marked as text")
class OcrFilter(OnnxFilter):
    """Text-heavy score: the share of pixels whose DBNet text probability exceeds 0.3.

    `prepare` stretches the whole image to 480 x 480 instead of cropping or padding: an area fraction
    is unchanged by scaling each axis, nothing at the edges is lost, and every batch has one shape.
    At 480 the 12-px text of a 1000-px page is still found; at 320, which runs twice as fast, it is not.
    The probability map marks the shrunk core of each text line, about half its box, so a page full of
    text scores 0.2-0.3 and a screenshot or scanned page 0.1-0.15, while photos score below 0.05.
    """

    name = "ocr"
    reason = "text-heavy"
    threshold = 0.08
    side = 480
    square = False  # its own fit: the whole image stretched
    package = "rapidocr_onnxruntime"
    model = "models/ch_PP-OCRv4_det_infer.onnx"

    def prepare(self, image) -> np.ndarray:
        from PIL import Image

        return np.asarray(image.resize((self.side, self.side), Image.Resampling.BILINEAR))

    def score(self, batch: np.ndarray) -> np.ndarray:
        bgr = batch[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32)
        probability = self.run((bgr / 255.0 - OCR_MEAN) / OCR_STD)  # [N, 1, H, W]
        return (probability > OCR_BINARY).mean(axis=(1, 2, 3))


# NudeNet 3.4's labels, in the order of its YOLOv8 head (nudenet/nudenet.py).
NUDENET_LABELS = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
    "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
)
# The exposed classes that make an image explicit. Exposed feet, armpits, belly and male chest are
# ordinary in beach, sport and street photos, so they do not count.
NSFW_CLASSES = ("FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED",
                "BUTTOCKS_EXPOSED", "ANUS_EXPOSED")


@register("nsfw", "NudeNet 320n detector: highest confidence of an explicit exposed-body class")
class NsfwFilter(OnnxFilter):
    """The highest NSFW_CLASSES confidence over all of the detector's boxes.

    Preprocessing is NudeNet's: pad right and bottom with black to a square, resize to 320, RGB / 255.
    Pillow's bilinear resize averages over the whole footprint when it shrinks, where OpenCV's samples
    four pixels, so on large images scores differ from NudeNet's by a few hundredths. (NudeNet's own
    `detect` on a file path feeds BGR by a double channel swap, notAI-tech/NudeNet#203; the YOLOv8
    model was trained on RGB, as its `detect` on an RGB array feeds it.)
    """

    name = "nsfw"
    reason = "nsfw"
    threshold = 0.5  # NudeNet reports every box from 0.2 up; above 0.5 a detection is more likely right than not
    side = 320
    square = False  # its own fit: padded to a square, as NudeNet was trained
    package = "nudenet"
    model = "320n.onnx"

    def prepare(self, image) -> np.ndarray:
        from PIL import Image

        w, h = image.size
        padded = Image.new("RGB", (max(w, h), max(w, h)))
        padded.paste(image, (0, 0))
        return np.asarray(padded.resize((self.side, self.side), Image.Resampling.BILINEAR))

    def class_scores(self, batch: np.ndarray) -> np.ndarray:
        """[N, 18] the highest confidence of each NudeNet label over all boxes, in NUDENET_LABELS order."""
        x = batch.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        return self.run(x)[:, 4:, :].max(axis=2)  # output rows: cx, cy, w, h, then one score per label

    def score(self, batch: np.ndarray) -> np.ndarray:
        columns = [NUDENET_LABELS.index(c) for c in NSFW_CLASSES]
        return self.class_scores(batch)[:, columns].max(axis=1)
