"""The training data. The 2-D toys and Fashion-MNIST are small and held in memory as tensors. Image datasets (an
image folder, a Hub dataset, a ``save_to_disk`` folder) are read through ``datasets``: memory-mapped Arrow (only
the paths or encoded bytes, never decoded images, stay on the host) or, with ``--streaming``, a stream. ``load_data``
picks the loader of the run's arguments; ``training_batches`` gives a run's micro-batches from any step on,
decoded and transformed (torchvision transforms v2) batch by batch, in DataLoader workers for map-style data.

Every example order and random draw is a function of (seed, epoch or micro-batch, process), so that a resumed run
reproduces an uninterrupted one bit for bit, with any number of workers; a stream's position is saved with each
checkpoint as JSON (``write_data_state`` / ``read_data_state``)."""

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from ..metrics import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, read_fashion_mnist
from ..mixture import GaussianMixture

TOY_DATASETS = ("two_moons", "circles", "gmm")
# "imagefolder" is datasets' loader of --train_data_dir, accepted as diffusers' scripts accept it
DATASETS = TOY_DATASETS + ("fashion_mnist", "imagefolder")
GRAYSCALE_MODES = ("L", "1", "I", "I;16", "LA")
# one JSON file per process in each checkpoint: where that process's stream stands (map-style data needs none)
DATA_STATE_NAME = "data_state_{process_index}.json"


def seed_of(*keys: int) -> int:
    """A 63-bit seed derived from integers, well mixed (neighbouring keys give unrelated streams)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def batch_generator(seed: int, process_index: int, micro_batch: int) -> torch.Generator:
    """The generator of a micro-batch's data augmentation (crops, flips): one per (seed, process, micro-batch)."""
    return torch.Generator().manual_seed(seed_of(seed, 3, process_index, micro_batch))


class BatchOrder:
    """Which examples go into each micro-batch: epoch ``e`` is a permutation seeded by ``(seed, e)``; a global
    batch (all processes) is a slice of it and each process takes its part. Incomplete global batches at the end
    of an epoch are skipped, so every micro-batch has the same size."""

    def __init__(self, num_examples: int, batch_size: int, num_processes: int, process_index: int, seed: int):
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.batches_per_epoch = num_examples // (batch_size * num_processes)
        if self.batches_per_epoch == 0:
            raise ValueError(f"the dataset has {num_examples} examples, fewer than one batch of "
                             f"{batch_size} x {num_processes} processes: lower --train_batch_size.")
        self._epoch, self._permutation = None, None

    def indices(self, micro_batch: int) -> torch.Tensor:
        epoch, position = divmod(micro_batch, self.batches_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(seed_of(self.seed, 1, epoch))
            self._epoch, self._permutation = epoch, torch.randperm(self.num_examples, generator=generator)
        start = (position * self.num_processes + self.process_index) * self.batch_size
        return self._permutation[start:start + self.batch_size]


@dataclass
class ImageSource:
    """An image dataset read through ``datasets``: map-style (``datasets.Dataset``, random access to memory-mapped
    Arrow) or a stream (``datasets.IterableDataset``). Its image column is read undecoded (path or bytes) and
    decoded by ``transform_images``; ``channels`` is that of its first image (grayscale: 1, anything else: 3)."""

    dataset: object
    image_column: str
    label_column: Optional[str]
    channels: int
    resolution: int
    crop: str  # "resize" (to a square, as before), "center" or "random" (after resizing the short side)
    random_flip: bool

    @property
    def streaming(self) -> bool:
        from datasets import IterableDataset

        return isinstance(self.dataset, IterableDataset)

    def transform(self, rows: Dict[str, list], generator: Optional[torch.Generator]):
        """A batch of rows (column -> values) to uint8 images ``(n, c, r, r)`` and labels (or None); without a
        generator, the deterministic transform (centre crop for ``random``, no flip) of the held-out images."""
        images = transform_images(rows[self.image_column], self.channels, self.resolution, self.crop,
                                  self.random_flip, generator)
        labels = None if self.label_column is None else torch.tensor(rows[self.label_column]).long()
        return images, labels


def decode_image(encoded: dict) -> Image.Image:
    """datasets' undecoded image (``{"bytes", "path"}``) as a PIL image; a clear error naming it if it is broken."""
    name = encoded.get("path") or "an image given as bytes"
    try:
        image = Image.open(io.BytesIO(encoded["bytes"]) if encoded.get("bytes") else encoded["path"])
        image.load()
    except OSError as error:
        raise ValueError(f"cannot read image {name}: {error}") from error
    return image


def transform_images(encoded: List[dict], channels: int, resolution: int, crop: str, random_flip: bool,
                     generator: Optional[torch.Generator]) -> torch.Tensor:
    """Decode and fit images to a ``resolution`` square with torchvision's transforms v2 (functional, so that
    every random draw comes from ``generator``, image by image: crop offsets, then the flip)."""
    from torchvision.transforms.v2 import functional as F

    fitted = []
    for item in encoded:
        image = F.pil_to_tensor(decode_image(item).convert("L" if channels == 1 else "RGB"))
        if crop == "resize":
            image = F.resize(image, [resolution, resolution], antialias=True)
        else:
            image = F.resize(image, resolution, antialias=True)  # the short side
            height, width = image.shape[-2:]
            if crop == "random" and generator is not None:
                top = int(torch.randint(height - resolution + 1, (), generator=generator))
                left = int(torch.randint(width - resolution + 1, (), generator=generator))
                image = F.crop(image, top, left, resolution, resolution)
            else:
                image = F.center_crop(image, [resolution, resolution])
        if random_flip and generator is not None and torch.rand((), generator=generator) < 0.5:
            image = F.horizontal_flip(image)
        fitted.append(image)
    return torch.stack(fitted)


class HeadImages:
    """The first images of a source, decoded on demand (``held_out[:n]``): an image dataset has no held-out
    split, so the likelihood is measured on training images."""

    def __init__(self, source: ImageSource):
        self.source = source

    def __getitem__(self, head: slice) -> torch.Tensor:
        if head.start not in (None, 0) or head.step not in (None, 1) or head.stop is None:
            raise IndexError("only the first images of an image dataset can be taken: held_out[:n].")
        source = self.source
        if source.streaming:
            rows = source.dataset.take(head.stop)
        else:
            rows = source.dataset.select(range(min(head.stop, len(source.dataset))))
        encoded = [row[source.image_column] for row in rows]
        if not encoded:
            return torch.zeros(0, source.channels, source.resolution, source.resolution, dtype=torch.uint8)
        return transform_images(encoded, source.channels, source.resolution, source.crop, False, None)


@dataclass
class TrainingData:
    """A run's data: standardised points (float32, ``(n, 2)``) or images (uint8, ``(n, c, h, w)``) in memory, with
    optional labels, or an image dataset read batch by batch (``source``); held-out examples for the metrics."""

    examples: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    held_out: object  # a tensor, or ``HeadImages`` of the training images for a ``source``
    description: str
    hub_dataset: Optional[str] = None
    class_names: Optional[List[str]] = None
    # toys: the mean and std the points were standardised with (model space = (x - mean) / std)
    normalization: Optional[Dict[str, List[float]]] = None
    source: Optional[ImageSource] = None

    @property
    def example_shape(self) -> Tuple[int, ...]:
        if self.source is not None:
            return (self.source.channels, self.source.resolution, self.source.resolution)
        return tuple(self.examples.shape[1:])

    @property
    def is_image(self) -> bool:
        return len(self.example_shape) == 3

    @property
    def held_out_is_training(self) -> bool:
        return self.source is not None

    @property
    def has_labels(self) -> bool:
        return self.labels is not None or (self.source is not None and self.source.label_column is not None)

    @property
    def num_classes(self) -> Optional[int]:
        if self.source is not None:
            return None if self.class_names is None else len(self.class_names)
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


def open_image_dataset(args):
    """The run's image dataset through ``datasets`` (a stream with ``--streaming``) and how to name it."""
    import datasets

    if args.train_data_dir:
        root = Path(args.train_data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"--train_data_dir {root} does not exist or is not a folder.")
        try:
            dataset = datasets.load_dataset("imagefolder", data_dir=str(root), split="train",
                                            cache_dir=args.cache_dir, streaming=args.streaming)
        except (FileNotFoundError, ValueError) as error:
            raise ValueError(f"--train_data_dir {root} holds no images datasets' imagefolder reads: {error}") from error
        return dataset, f"the image folder `{root.name}`", None
    path = Path(args.dataset_name)
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if "train" not in dataset:
                raise ValueError(f"--dataset_name {path} is a saved DatasetDict without a 'train' split "
                                 f"(splits: {list(dataset)}).")
            dataset = dataset["train"]
        return (dataset.to_iterable_dataset() if args.streaming else dataset), f"the saved dataset `{path.name}`", None
    try:
        dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir,
                                        split="train", streaming=args.streaming)
    except Exception as error:  # datasets raises many types for offline / missing / private datasets
        raise ValueError(f"could not load the Hub dataset {args.dataset_name!r} "
                         f"({type(error).__name__}: {error}); it needs the network or a cached copy.") from error
    return dataset, f"`{args.dataset_name}`", None if path.exists() else args.dataset_name


def load_image_source(args) -> TrainingData:
    """An image folder, a Hub dataset or a ``save_to_disk`` folder, read batch by batch (see ``ImageSource``)."""
    from datasets import ClassLabel, IterableDataset
    from datasets import Image as ImageFeature

    dataset, name, hub_dataset = open_image_dataset(args)
    column = args.image_column
    features = dataset.features
    if features is None or column not in features:
        raise ValueError(f"{name} has no column {column!r} (columns: {list(features or [])}); pass --image_column.")
    if not isinstance(features[column], ImageFeature):
        raise ValueError(f"--image_column {column!r} of {name} holds {features[column]}, not images.")
    label = features.get("label")
    class_names = label.names if isinstance(label, ClassLabel) and len(label.names) > 1 else None
    # labels: a class per subfolder of an image folder (several of them), or any integer label column
    integer_labels = not isinstance(label, ClassLabel) and str(getattr(label, "dtype", "")).startswith("int")
    label_column = "label" if class_names or integer_labels else None
    dataset = dataset.select_columns([column] + ([label_column] if label_column else []))
    dataset = dataset.cast_column(column, ImageFeature(decode=False))  # decoded by transform_images, in workers
    if isinstance(dataset, IterableDataset):
        first = next(iter(dataset.take(1)), None)
    else:
        first = dataset[0] if len(dataset) else None
    if first is None:
        raise ValueError(f"{name} holds no images.")
    crop = "center" if args.center_crop else "random" if args.random_crop else "resize"
    source = ImageSource(dataset, column, label_column, 1 if decode_image(first[column]).mode in GRAYSCALE_MODES
                         else 3, args.resolution, crop, args.random_flip)
    size = "streamed" if source.streaming else f"{len(dataset)} images"
    return TrainingData(examples=None, labels=None, held_out=HeadImages(source),
                        description=f"{name} ({size}, {args.resolution} px)", hub_dataset=hub_dataset,
                        class_names=class_names, source=source)


def load_data(args) -> TrainingData:
    if args.dataset in TOY_DATASETS:
        data = load_toy(args)
    elif args.dataset == "fashion_mnist":
        data = load_fashion_mnist(args)
    else:
        data = load_image_source(args)
    if args.num_classes is not None:
        if not data.has_labels:
            raise ValueError(f"--num_classes {args.num_classes}: {data.description} has no labels.")
        if data.num_classes is not None and data.num_classes > args.num_classes:
            raise ValueError(f"--num_classes {args.num_classes} is too small: the data has {data.num_classes} labels.")
    return data


# --- the micro-batches of a run ---


class MemoryBatches:
    """Micro-batches of data held in memory, from micro-batch ``start`` on, drawn in this process."""

    def __init__(self, data: TrainingData, order: BatchOrder, args, start: int):
        self.data, self.order, self.start = data, order, start
        self.random_flip, self.seed = args.random_flip and data.is_image, args.seed

    def __iter__(self):
        micro_batch = self.start
        while True:
            indices = self.order.indices(micro_batch)
            examples = self.data.examples[indices]
            if self.random_flip:
                generator = batch_generator(self.seed, self.order.process_index, micro_batch)
                flip = torch.rand(len(indices), generator=generator) < 0.5
                examples = torch.where(flip[:, None, None, None], examples.flip(-1), examples)
            yield examples, None if self.data.labels is None else self.data.labels[indices]
            micro_batch += 1


class ArrowBatches(torch.utils.data.Dataset):
    """Micro-batch ``i`` of map-style data, read from Arrow and transformed where the DataLoader asks for it (in a
    worker): item ``i`` depends on ``i`` only, so the number of workers changes nothing."""

    def __init__(self, source: ImageSource, order: BatchOrder, seed: int):
        self.source, self.order, self.seed = source, order, seed

    def __getitem__(self, micro_batch: int):
        rows = self.source.dataset[self.order.indices(micro_batch).tolist()]
        return self.source.transform(rows, batch_generator(self.seed, self.order.process_index, micro_batch))


class StreamBatches:
    """Micro-batches of this process's part of a stream, read and transformed in this process. The stream is read
    in its order, epoch after epoch (a partial batch at an epoch's end is dropped); ``state_dict`` is where it
    stands, as JSON-ready datasets state, so that a resumed run reads on from the same example."""

    def __init__(self, source: ImageSource, batch_size: int, seed: int, num_processes: int, process_index: int,
                 start: int, state: Optional[dict]):
        from datasets.distributed import split_dataset_by_node

        self.source, self.batch_size, self.seed, self.process_index = source, batch_size, seed, process_index
        self.stream = split_dataset_by_node(source.dataset, rank=process_index, world_size=num_processes)
        self.epoch_start = self.stream.state_dict()
        self.epoch, self.micro_batch, self._resumed = 0, start, state is not None
        if state is not None:
            if state["micro_batch"] != start:
                raise ValueError(f"the stream state of the checkpoint is at micro-batch {state['micro_batch']}, "
                                 f"the run resumes at {start}.")
            self.epoch = state["epoch"]
            self.stream.load_state_dict(state["stream"])
        elif start:
            raise ValueError("resuming a streamed run needs the stream state of its checkpoint "
                             f"({DATA_STATE_NAME.format(process_index=process_index)}).")
        self._batches = self._read()

    def _read(self):
        while True:
            rows, batches_this_epoch = [], 0
            for row in self.stream:
                rows.append(row)
                if len(rows) == self.batch_size:
                    columns = {name: [r[name] for r in rows] for name in rows[0]}
                    batch = self.source.transform(columns, batch_generator(self.seed, self.process_index,
                                                                           self.micro_batch))
                    rows, batches_this_epoch, self.micro_batch = [], batches_this_epoch + 1, self.micro_batch + 1
                    yield batch
            if batches_this_epoch == 0 and not self._resumed:
                raise ValueError(f"process {self.process_index}'s part of the stream holds fewer than "
                                 f"{self.batch_size} examples (one batch): lower --train_batch_size.")
            self.epoch, self._resumed = self.epoch + 1, False
            self.stream.load_state_dict(self.epoch_start)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._batches)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "micro_batch": self.micro_batch, "stream": self.stream.state_dict()}


def training_batches(args, data: TrainingData, num_processes: int, process_index: int, start: int,
                     checkpoint: Optional[Path] = None) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """This process's micro-batches (uint8 images or points, labels or None) from micro-batch ``start`` on;
    a stream resumes from the state ``checkpoint`` holds."""
    if data.source is not None and data.source.streaming:
        state = None if checkpoint is None else read_data_state(checkpoint, process_index)
        return StreamBatches(data.source, args.train_batch_size, args.seed, num_processes, process_index, start,
                             state)
    num_examples = len(data.examples) if data.source is None else len(data.source.dataset)
    order = BatchOrder(num_examples, args.train_batch_size, num_processes, process_index, args.seed)
    if data.source is None:
        return iter(MemoryBatches(data, order, args, start))
    end = args.max_train_steps * args.gradient_accumulation_steps
    loader = torch.utils.data.DataLoader(ArrowBatches(data.source, order, args.seed), batch_size=None,
                                         sampler=range(start, end), num_workers=args.dataloader_num_workers)
    return iter(loader)


def write_data_state(folder: Path, process_index: int, batches) -> None:
    """Save where this process's batches stand into a checkpoint folder, as JSON (map-style data and data in
    memory need nothing: their order is a function of the step)."""
    if isinstance(batches, StreamBatches):
        path = Path(folder) / DATA_STATE_NAME.format(process_index=process_index)
        path.write_text(json.dumps(batches.state_dict()))


def read_data_state(checkpoint: Path, process_index: int) -> dict:
    path = Path(checkpoint) / DATA_STATE_NAME.format(process_index=process_index)
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no {path.name}: it was not saved by a streamed run of process "
                                f"{process_index}, so the stream cannot resume where it stopped.")
    return json.loads(path.read_text())
