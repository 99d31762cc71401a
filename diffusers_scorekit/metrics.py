"""Sample-quality metrics: the Fréchet distance, improved precision / recall and coverage in a feature space, and
the small Fashion-MNIST classifier whose features they are computed in for image models.

The usual FID measures the Fréchet distance in the features of an ImageNet Inception-v3, whose weights cannot be
fetched here and which sees 28x28 grayscale clothes poorly anyway. For Fashion-MNIST we ship instead a small CNN
trained on its 60,000 training images (``training/train_fashion_mnist_classifier.py``, >= 90 % test accuracy,
weights in ``assets/``) and measure in its penultimate features::

    from diffusers_scorekit.metrics import fashion_mnist_score

    images = pipe(batch_size=10000, output_type="pt").images * 2 - 1   # the pipeline's "pt" output is in [0, 1]
    fashion_mnist_score(images)  # {"frechet_distance", "precision", "recall", "num_generated", "num_reference"}

The numbers are comparable with each other (same classifier, same reference, same number of images), not with
published FIDs. For scale, 10,000 real training images,
``fashion_mnist_score(fashion_mnist_images("train")[0][:10000])``, score a Fréchet distance of 0.43, precision 0.87
and recall 0.86 (about 10 s on 2 CPU cores); precision and recall of two samples of one distribution stay below 1
since k-NN balls do not quite cover a 128-dimensional support.

The k-nearest-neighbour metrics share one construction: every point of a set gets a ball reaching to its k-th
nearest neighbour in the same set, and the metrics count points of the other set inside those balls. Distances are
computed a block of rows at a time, so 10,000 x 10,000 points need a few tens of MB.
"""

import functools
import gzip
import os
import struct
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_SIZE = 28
# diffusion models are often trained on the images zero-padded by 2 px to 32 x 32
PADDED_SIZE = 32

CLASSIFIER_WEIGHTS = Path(__file__).resolve().parent / "assets" / "fashion_mnist_classifier.safetensors"
CLASSIFIER_TRAINING_SCRIPT = "training/train_fashion_mnist_classifier.py"

# k of the k-nearest-neighbour radius in Naeem et al.'s coverage / precision (their recommended k)
NEIGHBOURHOOD_SIZE = 5
# k of Kynkäänniemi et al.'s improved precision and recall (their recommended k)
PRECISION_RECALL_NEIGHBOURHOOD_SIZE = 3
# rows of a distance matrix computed at once: 1,000 x 10,000 float64 distances are 80 MB
DISTANCE_CHUNK_SIZE = 1000

ImageBatch = Union[torch.Tensor, Sequence[Image.Image]]


# --- Fréchet distance ----------------------------------------------------------------------------------------


def _feature_matrix(features, name: str) -> torch.Tensor:
    """``features`` as a float64 ``(num_points, num_features)`` tensor (trailing dimensions are flattened)."""
    features = torch.as_tensor(features).detach().to("cpu", torch.float64)
    if features.ndim < 2:
        raise ValueError(f"{name} must have shape (num_points, num_features), got shape {tuple(features.shape)}.")
    return features.flatten(1)


def gaussian_statistics(features) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance, in float64, of ``features`` of shape ``(num_points, num_features)``: the
    Gaussian the Fréchet distance compares. Compute them once for a reference set that many samples are scored
    against."""
    features = _feature_matrix(features, "features")
    if len(features) < 2:
        raise ValueError(f"a covariance needs at least 2 points, got {len(features)}.")
    return features.mean(0), torch.cov(features.T).reshape(features.shape[1], features.shape[1])


def _psd_square_root(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix, by its eigendecomposition; round-off
    negative eigenvalues count as 0."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T


def frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b) -> float:
    """Fréchet (2-Wasserstein) distance squared between the Gaussians ``N(mean_a, cov_a)`` and ``N(mean_b, cov_b)``:

    ``||mean_a - mean_b||² + tr(cov_a + cov_b - 2 (cov_a^½ cov_b cov_a^½)^½)``

    in float64. ``(cov_a^½ cov_b cov_a^½)^½`` has the trace of the usual ``(cov_a cov_b)^½`` but is a square root
    of a symmetric matrix, so both roots come from symmetric eigendecompositions: no complex round-off as with
    ``scipy.linalg.sqrtm``, and singular covariances (fewer points than features) are fine. Round-off can leave
    a tiny negative number for equal Gaussians; the result is clamped at 0.
    """
    mean_a, cov_a, mean_b, cov_b = (torch.as_tensor(t).detach().to("cpu", torch.float64)
                                    for t in (mean_a, cov_a, mean_b, cov_b))
    dim = mean_a.shape[0] if mean_a.ndim == 1 else -1
    if not (mean_a.shape == mean_b.shape == (dim,) and cov_a.shape == cov_b.shape == (dim, dim)):
        raise ValueError(f"expected means of shape (d,) and covariances of shape (d, d) with one d, got mean_a "
                         f"{tuple(mean_a.shape)}, cov_a {tuple(cov_a.shape)}, mean_b {tuple(mean_b.shape)}, cov_b "
                         f"{tuple(cov_b.shape)}.")
    sqrt_cov_a = _psd_square_root(cov_a)
    cross = sqrt_cov_a @ cov_b @ sqrt_cov_a
    trace_sqrt_cross = torch.linalg.eigvalsh((cross + cross.T) / 2).clamp_min(0).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt_cross
    return max(distance.item(), 0.0)


def frechet_distance(features_a, features_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets of shape ``(num_points, num_features)``
    (FID when the features are Inception's); see :func:`frechet_distance_from_statistics`."""
    return frechet_distance_from_statistics(*gaussian_statistics(features_a), *gaussian_statistics(features_b))


# --- k-nearest-neighbour metrics -----------------------------------------------------------------------------


def kth_neighbour_radius(points: torch.Tensor, k: int, chunk_size: int = DISTANCE_CHUNK_SIZE) -> torch.Tensor:
    """Distance from each of ``points`` (``(n, d)``) to its k-th nearest other point: the radius of its ball in
    the k-NN estimate of the set's support."""
    if not 1 <= k < len(points):
        raise ValueError(f"k must be at least 1 and below the number of points ({len(points)}), got k={k}.")
    return torch.cat([
        # k + 1: the nearest point is the point itself
        torch.cdist(chunk, points).topk(k + 1, dim=1, largest=False).values[:, -1]
        for chunk in points.split(chunk_size)
    ])


def _ball_membership(centers: torch.Tensor, radii: torch.Tensor, points: torch.Tensor,
                     chunk_size: int = DISTANCE_CHUNK_SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    """For balls ``(centers, radii)`` and ``points``: which points lie in at least one ball, and which balls hold
    at least one point (boolean tensors)."""
    point_inside = torch.zeros(len(points), dtype=torch.bool)
    ball_occupied = []
    for center_chunk, radius_chunk in zip(centers.split(chunk_size), radii.split(chunk_size)):
        inside = torch.cdist(center_chunk, points) <= radius_chunk[:, None]
        point_inside |= inside.any(0)
        ball_occupied.append(inside.any(1))
    return point_inside, torch.cat(ball_occupied)


def _point_sets(real, generated) -> Tuple[torch.Tensor, torch.Tensor]:
    real, generated = _feature_matrix(real, "real"), _feature_matrix(generated, "generated")
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"real and generated points must have the same number of features, got {real.shape[1]} "
                         f"and {generated.shape[1]}.")
    return real, generated


def precision_recall(real_features, generated_features, k: int = PRECISION_RECALL_NEIGHBOURHOOD_SIZE,
                     real_radii: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) of ``generated_features`` against
    ``real_features`` (both ``(num_points, num_features)``).

    Each set's support is estimated by the union of balls around its points reaching to their k-th nearest
    neighbour in the set. *precision*: the fraction of generated points inside the real support (are samples
    realistic?); *recall*: the fraction of real points inside the generated support (is all of the data
    produced?). Both are near 1 for two samples of one distribution, and fall to 0 for disjoint ones.
    ``real_radii``: ``kth_neighbour_radius(real_features, k)`` when already known (the costly part for a large
    reference set scored against many samplers).
    """
    real, generated = _point_sets(real_features, generated_features)
    if real_radii is None:
        real_radii = kth_neighbour_radius(real, k)
    generated_in_real, _ = _ball_membership(real, real_radii, generated)
    real_in_generated, _ = _ball_membership(generated, kth_neighbour_radius(generated, k), real)
    return {"precision": generated_in_real.double().mean().item(), "recall": real_in_generated.double().mean().item()}


def knn_coverage(real: torch.Tensor, generated: torch.Tensor, k: int = NEIGHBOURHOOD_SIZE) -> Dict[str, float]:
    """Coverage and precision of ``generated`` against held-out ``real`` points (Naeem et al., 2020).

    Each real point gets a ball whose radius is the distance to its k-th nearest real neighbour.
    *coverage* (a recall): the fraction of real points whose ball holds at least one generated point;
    *precision*: the fraction of generated points inside at least one ball. Both are 1 for a perfect sampler
    up to sampling noise; a collapsed mode lowers coverage, samples off the data lower precision. Unlike
    :func:`precision_recall`'s recall, coverage never builds balls around the generated points, so a few outliers
    among them cannot inflate it.
    """
    real, generated = _point_sets(real, generated)
    generated_inside, ball_occupied = _ball_membership(real, kth_neighbour_radius(real, k), generated)
    return {"coverage": ball_occupied.double().mean().item(), "precision": generated_inside.double().mean().item()}


# --- Fashion-MNIST data --------------------------------------------------------------------------------------


def read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zeros, dtype_code, ndim = data[0:2], data[2], data[3]
    if zeros != b"\x00\x00" or dtype_code != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes.")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_fashion_mnist(split: str, directory: str = FASHION_MNIST_DIR) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``"train"`` (60,000) or ``"test"`` (10,000) split of Fashion-MNIST from the files of Debian's
    ``dataset-fashion-mnist`` in ``directory``: uint8 images ``(n, 1, 28, 28)`` (background 0) and int64 labels
    (indices into ``FASHION_MNIST_CLASSES``)."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be one of {tuple(FASHION_MNIST_FILES)}, got {split!r}.")
    paths = [os.path.join(directory, name) for name in FASHION_MNIST_FILES[split]]
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. Install them with "
            "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass the folder holding them "
            "(--fashion_mnist_dir)."
        )
    images, labels = (torch.from_numpy(read_idx(path).copy()) for path in paths)
    return images[:, None], labels.long()


def fashion_mnist_images(split: str = "test", directory: str = FASHION_MNIST_DIR) -> Tuple[torch.Tensor, torch.Tensor]:
    """A Fashion-MNIST split as the diffusion models see it: float images ``(n, 1, 28, 28)`` in [-1, 1]
    (background -1), and int64 labels."""
    images, labels = read_fashion_mnist(split, directory)
    return images.float() / 127.5 - 1.0, labels


# --- the classifier ------------------------------------------------------------------------------------------


class FashionMNISTClassifier(nn.Module):
    """A small CNN (about 240k parameters) classifying Fashion-MNIST, whose 128 penultimate features are the
    feature space of :func:`fashion_mnist_score`.

    Input: float images ``(n, 1, 28, 28)`` in [-1, 1] (background -1), or ``(n, 1, 32, 32)``: the 28 x 28 image
    padded by 2 px of background on each side, as diffusion models are often trained. 32 x 32 inputs are
    center-cropped to 28 x 28, so whatever a model draws in that 2-px border is ignored.

    Layers: a 5 x 5 stride-2 convolution (28 -> 14 px, 32 channels), 3 x 3 convolutions to 64 channels and, after
    2 x 2 max-pooling, to 128 channels, each with batch norm and ReLU; max-pooling to 3 x 3; a linear layer to
    the 128 features (after ReLU); a linear head to the 10 classes. The cheap strided first layer lets it train
    to > 90 % test accuracy in minutes on a laptop CPU.
    """

    feature_dim = 128

    def __init__(self):
        super().__init__()

        def conv(in_channels, out_channels, kernel_size, stride=1):
            return [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
                    nn.BatchNorm2d(out_channels), nn.ReLU()]

        self.body = nn.Sequential(
            *conv(1, 32, 5, stride=2),  # 28 -> 14
            *conv(32, 64, 3), nn.MaxPool2d(2),  # -> 7
            *conv(64, 128, 3), nn.MaxPool2d(2),  # -> 3
            nn.Flatten(),
            nn.Linear(128 * 3 * 3, self.feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(self.feature_dim, len(FASHION_MNIST_CLASSES))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The penultimate features ``(n, 128)`` of images ``(n, 1, 28, 28)`` or ``(n, 1, 32, 32)`` in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] != 1 or images.shape[2:] not in (
                (FASHION_MNIST_SIZE,) * 2, (PADDED_SIZE,) * 2):
            raise ValueError(
                f"FashionMNISTClassifier takes grayscale images of shape (n, 1, {FASHION_MNIST_SIZE}, "
                f"{FASHION_MNIST_SIZE}) or (n, 1, {PADDED_SIZE}, {PADDED_SIZE}) (padded by 2 px, cropped off), "
                f"got shape {tuple(images.shape)}."
            )
        border = (images.shape[-1] - FASHION_MNIST_SIZE) // 2
        images = images[..., border:border + FASHION_MNIST_SIZE, border:border + FASHION_MNIST_SIZE]
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``(n, 10)``, in the order of ``FASHION_MNIST_CLASSES``."""
        return self.head(self.features(images))


def load_fashion_mnist_classifier(device=None, path=None) -> FashionMNISTClassifier:
    """The classifier with the weights shipped in the package (or the safetensors file ``path``), in eval mode on
    ``device`` (default CPU)."""
    path = Path(path) if path is not None else CLASSIFIER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"Fashion-MNIST classifier weights {path} not found; train them with "
                                f"`python {CLASSIFIER_TRAINING_SCRIPT} --output {path}`.")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors weights are loaded (pickled files are never unpickled).")
    model = FashionMNISTClassifier()
    try:
        model.load_state_dict(load_file(path))
    except (SafetensorError, RuntimeError) as error:
        raise ValueError(f"{path} does not hold readable FashionMNISTClassifier weights "
                         f"(retrain them with `python {CLASSIFIER_TRAINING_SCRIPT} --output {path}`): {error}"
                         ) from error
    return model.to(device).eval()


@functools.lru_cache(maxsize=None)
def _shipped_classifier(device: str) -> FashionMNISTClassifier:
    return load_fashion_mnist_classifier(device)


def _in_batches(function, images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """``function`` applied to ``images`` ``batch_size`` at a time on ``device``, without gradients, gathered on
    the CPU."""
    with torch.no_grad():
        return torch.cat([function(batch.to(device)).cpu() for batch in images.split(batch_size)])


def classifier_accuracy(classifier: FashionMNISTClassifier, images: torch.Tensor, labels: torch.Tensor,
                        batch_size: int = 1000) -> float:
    """Fraction of ``images`` (in [-1, 1]) that ``classifier`` (in eval mode) labels correctly."""
    device = next(classifier.parameters()).device
    predictions = _in_batches(lambda batch: classifier(batch).argmax(1), images, batch_size, device)
    return (predictions == labels.cpu()).double().mean().item()


# --- Fashion-MNIST scores ------------------------------------------------------------------------------------


def _images_tensor(images: ImageBatch) -> torch.Tensor:
    """Images as a float tensor ``(n, 1, h, w)`` in [-1, 1]: a tensor in [-1, 1] is checked, PIL images are
    converted from their 0..255 grayscale."""
    if len(images) == 0:
        raise ValueError("no images were given.")
    if not isinstance(images, torch.Tensor):
        images = list(images)
        if not all(isinstance(image, Image.Image) for image in images):
            raise TypeError("images must be a tensor (n, 1, h, w) in [-1, 1] or a list of PIL images, got a list "
                            f"of {sorted({type(image).__name__ for image in images})}.")
        arrays = [np.asarray(image.convert("L")) for image in images]
        sizes = {array.shape for array in arrays}
        if len(sizes) != 1:
            raise ValueError(f"all images must have one size, got sizes {sorted(sizes)}.")
        return torch.from_numpy(np.stack(arrays))[:, None].float() / 127.5 - 1.0
    if not images.is_floating_point():
        raise TypeError(f"an image tensor must be float in [-1, 1], got dtype {images.dtype}.")
    low, high = images.min().item(), images.max().item()
    if low < -1.001 or high > 1.001:
        raise ValueError(f"image values must lie in [-1, 1], got values in [{low:.3g}, {high:.3g}]; clamp them, "
                         "or rescale images in [0, 255] by images / 127.5 - 1.")
    if low >= 0:
        raise ValueError(f"the images look like they are in [0, 1] (values in [{low:.3g}, {high:.3g}], while the "
                         "background of Fashion-MNIST is -1 in [-1, 1]); pass 2 * images - 1.")
    return images


def fashion_mnist_features(images: ImageBatch, batch_size: int = 500, device=None) -> torch.Tensor:
    """The shipped classifier's penultimate features ``(n, 128)``, on the CPU, of images: a float tensor
    ``(n, 1, 28 | 32, 28 | 32)`` in [-1, 1] or a list of grayscale PIL images of 28 or 32 px; the classifier runs
    on ``device`` (default CPU)."""
    classifier = _shipped_classifier(str(torch.device(device or "cpu")))
    return _in_batches(classifier.features, _images_tensor(images), batch_size, next(classifier.parameters()).device)


@functools.lru_cache(maxsize=None)
def _split_features(split: str, directory: str, device: str) -> torch.Tensor:
    """Features of a Fashion-MNIST split with the shipped classifier, computed once per process."""
    return fashion_mnist_features(fashion_mnist_images(split, directory)[0], device=device)


@functools.lru_cache(maxsize=None)
def _split_statistics(split: str, directory: str, device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return gaussian_statistics(_split_features(split, directory, device))


@functools.lru_cache(maxsize=None)
def _split_radii(split: str, directory: str, device: str, k: int) -> torch.Tensor:
    return kth_neighbour_radius(_feature_matrix(_split_features(split, directory, device), "real"), k)


def fashion_mnist_score(generated_images: ImageBatch, reference: Union[str, ImageBatch] = "test",
                        k: int = PRECISION_RECALL_NEIGHBOURHOOD_SIZE, batch_size: int = 500,
                        directory: str = FASHION_MNIST_DIR, device=None) -> Dict[str, float]:
    """Fréchet distance and improved precision / recall of ``generated_images`` against Fashion-MNIST, in the
    shipped classifier's penultimate features.

    ``generated_images``: a float tensor ``(n, 1, 28 | 32, 28 | 32)`` in [-1, 1] (a ``ScoreSDEPipeline``'s
    ``output_type="pt"`` images are in [0, 1]: pass ``2 * images - 1``) or a list of grayscale PIL images.
    ``reference``: ``"test"`` (the 10,000 test images, the usual choice), ``"train"`` (60,000), read from
    ``directory`` and featurised once per process, or images of your own in the same forms. The classifier runs
    on ``device`` (default CPU).
    Use as many generated images as reference images (10,000 for "test"): the Fréchet distance is biased upward
    for small samples, so only scores with the same numbers of images compare.

    Returns ``{"frechet_distance", "precision", "recall", "num_generated", "num_reference"}``.
    """
    device = str(torch.device(device or "cpu"))
    generated = fashion_mnist_features(generated_images, batch_size, device)
    if isinstance(reference, str):
        if reference not in FASHION_MNIST_FILES:
            raise ValueError(f"reference must be one of {tuple(FASHION_MNIST_FILES)} or images, got {reference!r}.")
        real = _split_features(reference, directory, device)
        real_statistics = _split_statistics(reference, directory, device)
        real_radii = _split_radii(reference, directory, device, k)
    else:
        real = fashion_mnist_features(reference, batch_size, device)
        real_statistics, real_radii = gaussian_statistics(real), None
    return {
        "frechet_distance": frechet_distance_from_statistics(*gaussian_statistics(generated), *real_statistics),
        **precision_recall(real, generated, k, real_radii),
        "num_generated": len(generated),
        "num_reference": len(real),
    }
