"""Fréchet distance, k-NN precision / recall / coverage, and the shipped Fashion-MNIST classifier and score."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from diffusers_scorekit import metrics
from diffusers_scorekit.metrics import (
    FashionMNISTClassifier,
    fashion_mnist_features,
    fashion_mnist_score,
    frechet_distance,
    frechet_distance_from_statistics,
    gaussian_statistics,
    load_fashion_mnist_classifier,
    precision_recall,
)


def random_covariance(dim: int, generator: torch.Generator) -> torch.Tensor:
    factor = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return factor @ factor.T + 0.1 * torch.eye(dim, dtype=torch.float64)


@pytest.fixture(scope="module")
def test_images():
    """The 10,000 test images in [-1, 1] and their labels; the tests using them skip without Debian's files."""
    if not all(Path(metrics.FASHION_MNIST_DIR, name).is_file() for name in metrics.FASHION_MNIST_FILES["test"]):
        pytest.skip("needs the Fashion-MNIST test files of Debian's dataset-fashion-mnist (apt-get install "
                    f"dataset-fashion-mnist) in {metrics.FASHION_MNIST_DIR}")
    return metrics.fashion_mnist_images("test")


# --- Fréchet distance ----------------------------------------------------------------------------------------


def test_frechet_distance_of_commuting_covariances_has_the_closed_form():
    """Diagonal covariances commute: the distance is ||Δμ||² + Σ (√a - √b)²."""
    generator = torch.Generator().manual_seed(0)
    variances_a, variances_b = torch.rand(2, 5, generator=generator, dtype=torch.float64) * 4 + 0.1
    mean_a, mean_b = torch.randn(2, 5, generator=generator, dtype=torch.float64)
    expected = (mean_a - mean_b).square().sum() + (variances_a.sqrt() - variances_b.sqrt()).square().sum()
    distance = frechet_distance_from_statistics(mean_a, torch.diag(variances_a), mean_b, torch.diag(variances_b))
    assert distance == pytest.approx(expected.item(), rel=1e-10)


def test_frechet_distance_of_non_commuting_covariances_matches_scipy_sqrtm():
    """Against the textbook formula tr(Sa + Sb - 2 sqrtm(Sa Sb)) with scipy's general matrix square root."""
    generator = torch.Generator().manual_seed(1)
    cov_a, cov_b = random_covariance(6, generator), random_covariance(6, generator)
    assert not torch.allclose(cov_a @ cov_b, cov_b @ cov_a)
    mean_a, mean_b = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    cross = scipy.linalg.sqrtm(cov_a.numpy() @ cov_b.numpy()).real
    expected = ((mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace()).item() - 2 * np.trace(cross)
    assert frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b) == pytest.approx(expected, rel=1e-8)
    # symmetric, though the formula is not written symmetrically
    assert frechet_distance_from_statistics(mean_b, cov_b, mean_a, cov_a) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_identical_statistics_is_zero():
    generator = torch.Generator().manual_seed(2)
    mean = torch.randn(8, generator=generator, dtype=torch.float64)
    full_rank = random_covariance(8, generator)
    factor = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    singular = factor @ factor.T  # rank 3, as when there are fewer points than features
    assert frechet_distance_from_statistics(mean, full_rank, mean, full_rank) == pytest.approx(0, abs=1e-9)
    # the square roots of the zero eigenvalues are those of round-off (~1e-8 each)
    assert frechet_distance_from_statistics(mean, singular, mean, singular) == pytest.approx(0, abs=1e-6)


def test_gaussian_statistics_and_frechet_distance_of_features():
    generator = torch.Generator().manual_seed(3)
    features_a = torch.randn(50, 4, generator=generator)
    features_b = torch.randn(60, 4, generator=generator) * 2 + 1
    mean, cov = gaussian_statistics(features_a)
    assert mean.dtype == cov.dtype == torch.float64
    np.testing.assert_allclose(mean.numpy(), features_a.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(features_a.double().numpy(), rowvar=False), rtol=1e-12)
    assert frechet_distance(features_a, features_b) == pytest.approx(
        frechet_distance_from_statistics(*gaussian_statistics(features_a), *gaussian_statistics(features_b)))


def test_frechet_distance_estimated_from_samples_converges_to_the_exact_value():
    """Plug-in estimates from N samples of two known Gaussians: their spread over repeats is the sampling error,
    and their bias is O(d / N) (the mean term's is exactly (tr Sa + tr Sb) / N); the average of R estimates must be
    within 4 standard errors plus twice that bias of the exact distance, which is < 2 % of it here."""
    generator = torch.Generator().manual_seed(4)
    dim, num_samples, repeats = 3, 20000, 20
    cov_a, cov_b = random_covariance(dim, generator), random_covariance(dim, generator)
    mean_a = torch.zeros(dim, dtype=torch.float64)
    mean_b = torch.ones(dim, dtype=torch.float64)
    exact = frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b)
    chol_a, chol_b = torch.linalg.cholesky(cov_a), torch.linalg.cholesky(cov_b)
    estimates = torch.tensor([
        frechet_distance(torch.randn(num_samples, dim, generator=generator, dtype=torch.float64) @ chol_a.T + mean_a,
                         torch.randn(num_samples, dim, generator=generator, dtype=torch.float64) @ chol_b.T + mean_b)
        for _ in range(repeats)
    ])
    tolerance = 4 * estimates.std() / repeats ** 0.5 + 2 * (cov_a.trace() + cov_b.trace()) / num_samples
    assert tolerance < 0.02 * exact
    assert abs(estimates.mean() - exact) < tolerance


def test_frechet_distance_rejects_mismatched_statistics():
    expected = "covariances of shape (d, d) with one d, got mean_a (3,), cov_a (3, 3), mean_b (4,), cov_b (4, 4)."
    with pytest.raises(ValueError, match=re.escape(expected)):
        frechet_distance_from_statistics(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match="at least 2 points"):
        gaussian_statistics(torch.zeros(1, 3))


# --- k-NN metrics --------------------------------------------------------------------------------------------


def clusters(num_clusters: int, points_per_cluster: int, generator: torch.Generator, spacing: float = 50.0):
    """Unit-variance 2-D Gaussian clusters with centers ``spacing`` apart along a line."""
    centers = torch.zeros(num_clusters, 2)
    centers[:, 0] = torch.arange(num_clusters) * spacing
    return (centers[:, None] + torch.randn(num_clusters, points_per_cluster, 2, generator=generator)).flatten(0, 1)


def test_precision_recall_of_identical_and_disjoint_sets():
    generator = torch.Generator().manual_seed(5)
    real = torch.randn(400, 8, generator=generator)
    assert precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(real, real + 100) == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_see_dropped_modes_and_off_data_samples():
    generator = torch.Generator().manual_seed(6)
    real = clusters(10, 200, generator)
    half_the_modes = clusters(5, 400, generator)
    scores = precision_recall(real, half_the_modes)
    assert scores["precision"] > 0.95
    assert 0.45 < scores["recall"] <= 0.5  # the 5 missing clusters are far from every generated ball

    half_off = torch.cat([clusters(10, 100, generator), clusters(10, 100, generator) + torch.tensor([0.0, 1000.0])])
    scores = precision_recall(real, half_off)
    assert 0.45 < scores["precision"] <= 0.5
    assert scores["recall"] > 0.9


def test_knn_metrics_match_their_definitions_over_several_chunks():
    """Sets larger than one distance chunk give what the unchunked definitions give."""
    generator = torch.Generator().manual_seed(7)
    real = torch.randn(2 * metrics.DISTANCE_CHUNK_SIZE + 300, 3, generator=generator, dtype=torch.float64)
    generated = torch.randn(metrics.DISTANCE_CHUNK_SIZE + 200, 3, generator=generator, dtype=torch.float64) * 1.3
    k = 3

    def radius(points):
        return torch.cdist(points, points).kthvalue(k + 1, dim=1).values

    torch.testing.assert_close(metrics.kth_neighbour_radius(real, k), radius(real))
    real_balls = torch.cdist(real, generated) <= radius(real)[:, None]
    generated_balls = torch.cdist(generated, real) <= radius(generated)[:, None]
    precision = real_balls.any(0).double().mean().item()
    assert precision_recall(real, generated, k) == pytest.approx(
        {"precision": precision, "recall": generated_balls.any(0).double().mean().item()})
    assert metrics.knn_coverage(real, generated, k) == pytest.approx(
        {"coverage": real_balls.any(1).double().mean().item(), "precision": precision})


def test_knn_coverage():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(500, 2, generator=generator)
    good = metrics.knn_coverage(real, torch.randn(500, 2, generator=generator))
    collapsed = metrics.knn_coverage(real, torch.zeros(500, 2))
    assert good["coverage"] > 0.8 and good["precision"] > 0.8
    assert collapsed["coverage"] < 0.05 and collapsed["precision"] == 1.0


def test_knn_metrics_reject_bad_inputs():
    with pytest.raises(ValueError, match="k must be at least 1 and below the number of points \\(4\\), got k=4"):
        precision_recall(torch.zeros(4, 2), torch.zeros(10, 2), k=4)
    with pytest.raises(ValueError, match="same number of features, got 2 and 3"):
        precision_recall(torch.zeros(10, 2), torch.zeros(10, 3))
    with pytest.raises(ValueError, match=r"shape \(num_points, num_features\), got shape \(10,\)"):
        precision_recall(torch.zeros(10), torch.zeros(10, 3))


# --- the classifier ------------------------------------------------------------------------------------------


def test_shipped_classifier_loads_and_matches_its_record():
    record = json.loads(metrics.CLASSIFIER_WEIGHTS.with_suffix(".json").read_text())
    weights = metrics.CLASSIFIER_WEIGHTS.read_bytes()
    assert record["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert len(weights) < 2 * 2 ** 20 and record["test_accuracy"] >= 0.9
    classifier = load_fashion_mnist_classifier()
    assert not classifier.training
    assert record["num_parameters"] == sum(parameter.numel() for parameter in classifier.parameters())
    assert record["feature_dimension"] == FashionMNISTClassifier.feature_dim


def test_classifier_features_of_28_and_padded_32_px_images_agree():
    classifier = load_fashion_mnist_classifier()
    images = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(8)) * 2 - 1
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), value=-1.0)
    with torch.no_grad():
        features = classifier.features(images)
        assert features.shape == (6, FashionMNISTClassifier.feature_dim)
        assert classifier(images).shape == (6, len(metrics.FASHION_MNIST_CLASSES))
        torch.testing.assert_close(classifier.features(padded), features)


@pytest.mark.parametrize("shape", [(2, 3, 28, 28), (2, 28, 28), (2, 1, 30, 30)])
def test_classifier_rejects_other_shapes(shape):
    expected = f"shape (n, 1, 28, 28) or (n, 1, 32, 32) (padded by 2 px, cropped off), got shape {shape}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        FashionMNISTClassifier()(torch.zeros(shape))


def test_missing_corrupt_or_pickled_weights_raise_errors_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent.safetensors"))):
        load_fashion_mnist_classifier(path=tmp_path / "absent.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(metrics.CLASSIFIER_WEIGHTS.read_bytes()[:5000])
    with pytest.raises(ValueError, match=re.escape(f"{corrupt} does not hold readable FashionMNISTClassifier")):
        load_fashion_mnist_classifier(path=corrupt)
    pickled = tmp_path / "classifier.pt"
    torch.save(FashionMNISTClassifier().state_dict(), pickled)
    with pytest.raises(ValueError, match=re.escape(f"{pickled}: only .safetensors weights are loaded")):
        load_fashion_mnist_classifier(path=pickled)


def test_shipped_classifier_test_accuracy_is_at_least_90_percent(test_images):
    images, labels = test_images
    assert metrics.classifier_accuracy(load_fashion_mnist_classifier(), images, labels) >= 0.90


# --- Fashion-MNIST score -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def halves(test_images):
    """Two halves of 4,000 test images, the first half's labels, and the score of the first against the second."""
    images, labels = test_images[0][:4000], test_images[1][:2000]
    first_half, second_half = images[:2000], images[2000:]
    return first_half, second_half, labels, fashion_mnist_score(first_half, reference=second_half)


def test_score_of_real_images_is_good_and_of_damaged_images_bad(halves):
    """Two halves of the test images score a small distance and precision / recall near 1; noise, shuffled
    pixels or upside-down clothes a far larger distance and (almost) no recall. Noisy and shuffled images keep a
    high precision: their features collapse into a small region, covered by the large balls of a few outlying real
    images (the weakness of k-NN precision that Naeem et al. 2020 point out), so the test asks that of upside-down
    clothes only."""
    first_half, second_half, _, real = halves
    assert real["num_generated"] == real["num_reference"] == 2000
    assert real["frechet_distance"] < 5 and real["precision"] > 0.8 and real["recall"] > 0.8
    noisy = (first_half + torch.randn(first_half.shape, generator=torch.Generator().manual_seed(9))).clamp(-1, 1)
    permutation = torch.randperm(28 * 28, generator=torch.Generator().manual_seed(10))
    shuffled = first_half.flatten(1)[:, permutation].view_as(first_half)
    upside_down = first_half.flip(2)
    for damaged_images in (noisy, shuffled, upside_down):
        damaged = fashion_mnist_score(damaged_images, reference=second_half)
        assert damaged["frechet_distance"] > 50 * real["frechet_distance"]
        assert damaged["recall"] < 0.2
    assert damaged["precision"] < 0.5


def test_score_of_half_the_classes_halves_the_recall(halves):
    """A sampler that only draws the first 5 of the 10 classes: recall about 1/2, precision as for real images."""
    first_half, second_half, labels, real = halves
    first_classes = fashion_mnist_score(first_half[labels < 5], reference=second_half)
    assert 0.4 < first_classes["recall"] < 0.6
    assert first_classes["precision"] == pytest.approx(real["precision"], abs=0.05)
    assert first_classes["frechet_distance"] > 20 * real["frechet_distance"]


def test_score_against_the_test_split_and_pil_input(test_images):
    """Test images scored against the test split lie each in its own ball: precision exactly 1."""
    generated = test_images[0][:100]
    pil_images = [Image.fromarray(((image[0] + 1) * 127.5).round().byte().numpy()) for image in generated]
    torch.testing.assert_close(fashion_mnist_features(pil_images), fashion_mnist_features(generated))
    score = fashion_mnist_score(pil_images)
    assert score["num_generated"] == 100 and score["num_reference"] == 10000 and score["precision"] == 1.0
    assert 0 < score["frechet_distance"] < 100


def test_score_rejects_images_out_of_range():
    images = torch.rand(4, 1, 28, 28)
    with pytest.raises(ValueError, match=re.escape("look like they are in [0, 1]") + ".*pass 2 \\* images - 1"):
        fashion_mnist_features(images)
    images_in_0_255 = torch.zeros(4, 1, 28, 28)
    images_in_0_255[0, 0, 0, 0] = 255
    with pytest.raises(ValueError, match=re.escape("must lie in [-1, 1], got values in [0, 255]")):
        fashion_mnist_features(images_in_0_255)
    with pytest.raises(ValueError, match="reference must be one of \\('train', 'test'\\) or images, got 'val'"):
        fashion_mnist_score(images * 2 - 1, reference="val")


def test_frechet_distance_of_float32_statistics_is_computed_in_float64():
    """float32 inputs, an answer that float32 arithmetic cannot reach: equal diagonal covariances, so the trace
    terms cancel exactly in float64 (to ~1e-4 in float32 at this scale) and the distance is the mean term."""
    variances = torch.linspace(1e3, 4e3, 16, dtype=torch.float32)
    mean_a = torch.zeros(16, dtype=torch.float32)
    mean_b = torch.full((16,), 1e-3, dtype=torch.float32)
    expected = float((mean_b.double() - mean_a.double()).square().sum())
    distance = frechet_distance_from_statistics(mean_a, torch.diag(variances), mean_b, torch.diag(variances))
    assert distance == pytest.approx(expected, rel=1e-6)
