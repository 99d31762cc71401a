"""The training data: the 2-D toys, Fashion-MNIST, an image folder and a Hub dataset, each loaded into memory as
a ``TrainingData`` (``load_data`` picks the loader of the run's arguments)."""

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..metrics import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, read_fashion_mnist
from ..mixture import GaussianMixture

TOY_DATASETS = ("two_moons", "circles", "gmm")
DATASETS = TOY_DATASETS + ("fashion_mnist",)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class TrainingData:
    """A dataset held in memory: standardised points (float32, ``(n, 2)``) or images (uint8, ``(n, c, h, w)``),
    with optional labels and held-out examples for the metrics."""

    examples: torch.Tensor
    labels: Optional[torch.Tensor]
    held_out: torch.Tensor
    description: str
    hub_dataset: Optional[str] = None
    class_names: Optional[List[str]] = None
    # toys: the mean and std the points were standardised with (model space = (x - mean) / std)
    normalization: Optional[Dict[str, List[float]]] = None

    @property
    def is_image(self) -> bool:
        return self.examples.ndim == 4

    @property
    def num_classes(self) -> Optional[int]:
        return None if self.labels is None else int(self.labels.max()) + 1

    def to_model_space(self, examples: torch.Tensor) -> torch.Tensor:
        """uint8 images to [-1, 1]; points are stored standardised already."""
        return examples.float() / 127.5 - 1.0 if self.is_image else examples


def toy_points(name: str, num_samples: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` points of a 2-D toy and their labels (moon, circle or mixture component)."""
    if name == "gmm":
        mixture = GaussianMixture.ring()
        points = mixture.sample(num_samples, torch.Generator().manual_seed(seed))
        return points.float(), mixture.log_prob_components(points).argmax(1)
    from sklearn.datasets import make_circles, make_moons

    if name == "two_moons":
        points, labels = make_moons(num_samples, noise=0.05, random_state=seed)
    else:
        points, labels = make_circles(num_samples, noise=0.05, factor=0.5, random_state=seed)
    return torch.from_numpy(points).float(), torch.from_numpy(labels).long()


def load_toy(args) -> TrainingData:
    points, labels = toy_points(args.dataset, args.num_toy_samples, args.seed)
    # held-out points come from a different seed, never from the training set
    held_out, _ = toy_points(args.dataset, 2000, args.seed + 1)
    mean, std = points.mean(0), points.std(0)
    return TrainingData(
        examples=(points - mean) / std,
        labels=labels,
        held_out=(held_out - mean) / std,
        description={"two_moons": "two moons", "circles": "two circles", "gmm": "an 8-mode Gaussian-mixture ring"}[
            args.dataset] + f" ({args.num_toy_samples} points, standardised)",
        normalization={"mean": mean.tolist(), "std": std.tolist()},
    )


def load_fashion_mnist(args) -> TrainingData:
    splits = {}
    for split in FASHION_MNIST_FILES:
        images, labels = read_fashion_mnist(split, args.fashion_mnist_dir)
        if args.resolution == 32:
            # background is 0 (black): pad with it, as for the usual 32-px LeNet/DDPM setups
            images = torch.nn.functional.pad(images, (2, 2, 2, 2))
        splits[split] = (images, labels)
    return TrainingData(
        examples=splits["train"][0],
        labels=splits["train"][1],
        held_out=splits["test"][0],
        description=f"Fashion-MNIST (60,000 training images, {args.resolution} px)",
        hub_dataset="zalando-datasets/fashion_mnist",
        class_names=list(FASHION_MNIST_CLASSES),
    )


def fit_image(image: Image.Image, resolution: int, center_crop: bool) -> Image.Image:
    """Resize (and crop) to a ``resolution`` square, as diffusers' training scripts do."""
    if not center_crop:
        return image.resize((resolution, resolution), Image.BILINEAR)
    scale = resolution / min(image.size)
    width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((width, height), Image.BILINEAR)
    left, top = (width - resolution) // 2, (height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def images_to_tensor(images, resolution: int, center_crop: bool, names) -> torch.Tensor:
    """PIL images to uint8 ``(n, c, h, w)``; grayscale stays one channel unless some image has colour."""
    images = list(images)
    mode = "L" if all(image.mode in ("L", "1", "I", "I;16") for image in images) else "RGB"
    arrays = []
    for image, name in zip(images, names):
        try:
            arrays.append(np.asarray(fit_image(image.convert(mode), resolution, center_crop)))
        except OSError as error:
            raise ValueError(f"cannot read image {name}: {error}") from error
    stacked = np.stack(arrays)
    stacked = stacked[:, None] if mode == "L" else stacked.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(stacked))


def load_image_folder(args) -> TrainingData:
    root = Path(args.train_data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--train_data_dir {root} does not exist or is not a folder.")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise ValueError(f"--train_data_dir {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                images.append(image)
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"cannot read image {path}: {error}") from error
    examples = images_to_tensor(images, args.resolution, args.center_crop, paths)
    # one subfolder per class, as datasets' imagefolder does; labels only when there are several
    class_names = sorted({path.parent.relative_to(root).as_posix() for path in paths})
    labels = None
    if len(class_names) > 1:
        labels = torch.tensor([class_names.index(path.parent.relative_to(root).as_posix()) for path in paths])
    return TrainingData(
        examples=examples,
        labels=labels,
        # no held-out split in a plain folder: metrics are measured on (a part of) the training images
        held_out=examples,
        description=f"the image folder `{root.name}` ({len(paths)} images, {args.resolution} px)",
        class_names=class_names if labels is not None else None,
    )


def load_hub_dataset(args) -> TrainingData:
    if importlib.util.find_spec("datasets") is None:
        raise ValueError("--dataset_name needs the `datasets` package: pip install datasets.")
    from datasets import load_dataset

    try:
        dataset = load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir, split="train")
    except Exception as error:  # datasets raises many types for offline / missing / private datasets
        raise ValueError(f"could not load the Hub dataset {args.dataset_name!r} "
                         f"({type(error).__name__}: {error}); it needs the network or a cached copy.") from error
    if args.image_column not in dataset.column_names:
        raise ValueError(f"{args.dataset_name} has no column {args.image_column!r} (columns: {dataset.column_names}); "
                         "pass --image_column.")
    images = dataset[args.image_column]
    examples = images_to_tensor(images, args.resolution, args.center_crop,
                                (f"{args.dataset_name}[{i}]" for i in range(len(images))))
    labels = torch.tensor(dataset["label"]).long() if "label" in dataset.column_names and args.num_classes else None
    return TrainingData(
        examples=examples, labels=labels, held_out=examples,
        description=f"`{args.dataset_name}` ({len(examples)} images, {args.resolution} px)",
        hub_dataset=args.dataset_name,
    )


def load_data(args) -> TrainingData:
    if args.dataset in TOY_DATASETS:
        data = load_toy(args)
    elif args.dataset == "fashion_mnist":
        data = load_fashion_mnist(args)
    elif args.train_data_dir:
        data = load_image_folder(args)
    else:
        data = load_hub_dataset(args)
    if args.num_classes is not None:
        if data.labels is None:
            raise ValueError(f"--num_classes {args.num_classes}: {data.description} has no labels.")
        if data.num_classes > args.num_classes:
            raise ValueError(f"--num_classes {args.num_classes} is too small: the data has {data.num_classes} labels.")
    return data
