"""Train a score-based model with accelerate and save it as a ``ScoreSDEPipeline`` with a model card.

This is the logic behind ``training/train_score_sde.py`` and ``scorekit train`` (same arguments)::

    accelerate launch training/train_score_sde.py --dataset two_moons --model scorekit_mlp --sde ve \\
        --max_train_steps 3000 --output_dir outputs/moons-ve
    python training/train_score_sde.py --dataset fashion_mnist --model ncsn --resolution 28 --use_ema ...

It follows diffusers' ``train_unconditional.py`` (accelerate, EMA, warm-up, checkpoints, resuming) with one
difference in how data is fed: the dataset is held in memory and the order of the examples is a function of
``(seed, epoch)`` only, and every random draw of an update (flips, label dropout, the loss's times and noise) comes
from a generator seeded with ``(seed, process, step, micro-batch)``. Nothing random is carried from one step to the
next, so a run killed at any point and resumed from its last checkpoint ends with exactly the weights of an
uninterrupted run: the checkpoint only has to hold the model, optimizer, learning-rate schedule and EMA.

Throughput: the speed switches (``--channels_last``, ``--allow_tf32``, ``--fused_optimizer``, ``--torch_compile``)
are each on, off, or left to ``--speed auto``, which turns on CUDA what helps there. The loop never waits for the
device between logging intervals: batches and the loss's random draws are made on the host and copied through
pinned memory without blocking, and the loss is summed on the device and read every ``--logging_steps``.
``benchmarks/bench_training_step.py`` measures each switch. ``--time_budget_minutes`` ends a run early by
wall-clock time, for comparisons at a fixed compute budget.
"""

import argparse
import contextlib
import importlib.util
import inspect
import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .demo import scatter_image
from .likelihood import dequantize_and_scale, log_likelihood
from .losses import denoising_score_matching_loss, sample_time, sliced_score_matching_loss
from .metrics import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    NEIGHBOURHOOD_SIZE,
    knn_coverage,
    read_fashion_mnist,
)
from .mixture import GaussianMixture
from .models import NCSNScoreModel, ScoreMLP
from .parametrization import PREDICTION_TYPES, TIMESTEP_TYPES
from .pipelines import ScoreSDEPipeline
from .schedulers import (
    AnnealedLangevinScheduler,
    PredictorCorrectorScheduler,
    ProbabilityFlowODEScheduler,
    VEEulerMaruyamaScheduler,
    VPEulerMaruyamaScheduler,
)
from .score_function import ScoreFunction
from .sde import SDE_TYPES, build_sde

logger = logging.getLogger(__name__)

TOY_DATASETS = ("two_moons", "circles", "gmm")
DATASETS = TOY_DATASETS + ("fashion_mnist",)
MODELS = ("scorekit_mlp", "ncsn", "unet2d")
LOSSES = ("dsm", "ssm")
SAMPLERS = ("pc", "ode", "em", "ald")
SPEED_MODES = ("auto", "none")
# the speed switches --speed decides when they are not given; resolve_speed turns each into a bool
SPEED_SWITCHES = ("channels_last", "allow_tf32", "fused_optimizer", "torch_compile")
LICENSE_DEFAULT = "apache-2.0"

TOY_PLOT_EXTENT = 3.0  # standardised toy data lies within +-3 of the origin
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

CHECKPOINT_PREFIX = "checkpoint-"
# written next to the weights of every checkpoint and of the final pipeline: what a resume must match, and the
# data normalisation the CLI needs to plot or score toy samples in data units
RUN_CONFIG_NAME = "scorekit_training_config.json"
SAMPLE_IMAGE_NAME = "samples.png"
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "score_sde_model_card.md"
# fault injection for the resume tests: the process SIGKILLs itself right after this optimizer step
KILL_AT_STEP_ENV = "SCOREKIT_KILL_AT_STEP"

# UNet2DModel layouts per resolution: every resolution level but the last halves the size
UNET2D_PRESETS = {
    28: {
        "block_out_channels": (32, 64, 128),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    },
    32: {
        "block_out_channels": (64, 128, 128, 256),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    },
    64: {
        "block_out_channels": (128, 128, 256, 256, 512, 512),
        "down_block_types": ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    },
}


# --- arguments -----------------------------------------------------------------------------------------------


def int_tuple(text: str) -> Tuple[int, ...]:
    """An argparse type: "32,64,64" -> (32, 64, 64)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 32,64,64, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a score-based generative model (VE / VP / sub-VP SDE) and save a ScoreSDEPipeline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, help="a built-in dataset (2-D toys or Fashion-MNIST)")
    data.add_argument("--train_data_dir", help="a folder of images (class subfolders give labels)")
    data.add_argument("--dataset_name", help="a Hugging Face Hub image dataset (needs `datasets` and the network)")
    data.add_argument("--dataset_config_name")
    data.add_argument("--image_column", default="image", help="column of --dataset_name holding the images")
    data.add_argument("--cache_dir")
    data.add_argument("--fashion_mnist_dir", default=FASHION_MNIST_DIR)
    data.add_argument("--num_toy_samples", type=int, default=20000, help="training points of a 2-D toy")
    data.add_argument("--resolution", type=int, default=None, help="image size (default 28 for Fashion-MNIST, "
                      "where 32 pads the images; 32 otherwise)")
    data.add_argument("--center_crop", action="store_true", help="crop the centre square after resizing the short "
                      "side; otherwise images are resized to a square")
    data.add_argument("--random_flip", action="store_true", help="flip images horizontally at random")

    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=MODELS, default=None, help="default: scorekit_mlp for toys, ncsn for images")
    model.add_argument("--hidden_dim", type=int, default=128, help="ScoreMLP width")
    model.add_argument("--num_layers", type=int, default=3, help="ScoreMLP residual blocks")
    model.add_argument("--block_out_channels", type=int_tuple, default=None,
                       help="channels per level of ncsn / unet2d (default: the model's or the unet2d preset's)")
    model.add_argument("--layers_per_block", type=int, default=None)
    model.add_argument("--prediction_type", choices=PREDICTION_TYPES, default=None,
                       help="default: score on VE, epsilon on VP / sub-VP")
    model.add_argument("--timestep_type", choices=TIMESTEP_TYPES, default=None,
                       help="default: sigma on VE, discrete on VP / sub-VP")
    model.add_argument("--num_classes", type=int, default=None, help="train class-conditionally on this many labels")
    model.add_argument("--label_dropout", type=float, default=0.1,
                       help="probability of replacing a label by the null label (classifier-free guidance)")

    sde = parser.add_argument_group("SDE")
    sde.add_argument("--sde", choices=SDE_TYPES, default="ve")
    sde.add_argument("--sigma_min", type=float, default=0.01)
    sde.add_argument("--sigma_max", type=float, default=None, help="default: 10 for toys, 50 for images")
    sde.add_argument("--beta_min", type=float, default=0.1)
    sde.add_argument("--beta_max", type=float, default=20.0)
    sde.add_argument("--num_train_timesteps", type=int, default=1000)

    loss = parser.add_argument_group("loss")
    loss.add_argument("--loss", choices=LOSSES, default="dsm")
    loss.add_argument("--time_sampling", default="continuous", help="dsm: continuous or discrete")
    loss.add_argument("--weighting", default="sigma2", help="dsm: sigma2, likelihood or native")
    loss.add_argument("--importance_sampling", action="store_true", help="dsm with the likelihood weighting")
    loss.add_argument("--num_projections", type=int, default=1, help="ssm projections")
    loss.add_argument("--sampling_eps", type=float, default=None, help="smallest training time")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=128, help="per process")
    optim.add_argument("--max_train_steps", type=int, default=10000,
                       help="optimizer updates; the learning-rate schedule always spans this many")
    optim.add_argument("--time_budget_minutes", type=float, default=None,
                       help="also stop once the training loop has run this long (wall clock, compilation and "
                            "checkpoints included, checked every --logging_steps), then save a checkpoint and the "
                            "pipeline as at the last step. The schedule still spans --max_train_steps: set that "
                            "near the steps the budget allows for a decaying schedule to finish")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--learning_rate", type=float, default=None, help="default: 1e-3 for toys, 2e-4 for images")
    optim.add_argument("--lr_scheduler", default="constant_with_warmup",
                       help="a diffusers get_scheduler name (constant, cosine, linear, ...)")
    optim.add_argument("--lr_warmup_steps", type=int, default=100)
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.999)
    optim.add_argument("--adam_weight_decay", type=float, default=0.0)
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    optim.add_argument("--use_ema", action="store_true")
    optim.add_argument("--ema_decay", type=float, default=0.999)
    optim.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                       help="default: accelerate's configuration")
    optim.add_argument("--seed", type=int, default=0)

    speed = parser.add_argument_group(
        "speed", "each switch is on (--X), off (--no-X) or, unset, decided by --speed; the log says what was used")
    speed.add_argument("--speed", choices=SPEED_MODES, default="auto",
                       help="auto: on CUDA, turn on every unset switch (channels_last and torch_compile for image "
                            "models only); on other devices, none. none: unset switches stay off")
    speed.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                       help="model and batches in channels-last memory format (NHWC), which tensor-core "
                            "convolutions prefer; image models only")
    speed.add_argument("--allow_tf32", action=argparse.BooleanOptionalAction, default=None,
                       help="TF32 tensor cores for float32 matmuls and convolutions (CUDA, Ampere or newer; "
                            "no effect elsewhere); under bf16/fp16 autocast it covers what stays in float32")
    speed.add_argument("--fused_optimizer", action=argparse.BooleanOptionalAction, default=None,
                       help="AdamW as one fused kernel (foreach kernels where the device has no fused AdamW) and "
                            "the EMA update as foreach kernels, instead of loops over the parameters")
    speed.add_argument("--torch_compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the model's training forward (the first steps compile); checkpoints, "
                            "EMA and the saved pipeline use the uncompiled model, so their weights keep their names")

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", default="score-sde-model")
    run.add_argument("--logging_dir", default="logs", help="relative to --output_dir")
    run.add_argument("--report_to", default=None, help="an accelerate tracker; default tensorboard if installed")
    run.add_argument("--logging_steps", type=int, default=10,
                     help="log the mean loss (and check --time_budget_minutes) every N steps; in between, the "
                          "loop never waits for the device, checkpoints and previews aside")
    run.add_argument("--checkpointing_steps", type=int, default=500)
    run.add_argument("--checkpoints_total_limit", type=int, default=None)
    run.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint folder')
    run.add_argument("--sample_every", type=int, default=0, help="write a sample image every N steps (0: never)")
    run.add_argument("--num_preview_samples", type=int, default=None, help="default: 2000 points or 16 images")

    sampling = parser.add_argument_group("the saved pipeline")
    sampling.add_argument("--sampler", choices=SAMPLERS, default="pc",
                          help="predictor-corrector, probability-flow ODE, Euler-Maruyama, annealed Langevin (VE)")
    sampling.add_argument("--num_inference_steps", type=int, default=None,
                          help="default: pc 500, ode 50, em 1000, ald 100 (x num_annealed_steps)")
    sampling.add_argument("--num_eval_samples", type=int, default=None,
                          help="samples for the metrics and the image (default: 2000 points or 16 images)")
    sampling.add_argument("--eval_likelihood_samples", type=int, default=None,
                          help="held-out examples for the likelihood (default: 500 points, 0 images)")
    sampling.add_argument("--license", default=LICENSE_DEFAULT)
    sampling.add_argument("--push_to_hub", action="store_true")
    sampling.add_argument("--hub_model_id")
    sampling.add_argument("--hub_token")
    sampling.add_argument("--hub_private_repo", action="store_true")
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        resolve_args(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def resolve_args(args: argparse.Namespace) -> None:
    """Fill the data- and SDE-dependent defaults and reject inconsistent options (ValueError), before any data is
    read. ``main`` calls it too, so a Namespace built in code gets the same checks."""
    sources = [name for name in ("dataset", "train_data_dir", "dataset_name") if getattr(args, name)]
    if len(sources) != 1:
        raise ValueError("give exactly one of --dataset, --train_data_dir, --dataset_name" +
                         (f" (got {', '.join('--' + s for s in sources)})" if sources else ""))
    is_toy = args.dataset in TOY_DATASETS
    if args.model is None:
        args.model = "scorekit_mlp" if is_toy else "ncsn"
    if is_toy != (args.model == "scorekit_mlp"):
        raise ValueError(f"--model {args.model} does not fit --dataset/--train_data_dir: use scorekit_mlp for the "
                         "2-D toys and ncsn or unet2d for images.")
    if args.resolution is None:
        args.resolution = 28 if args.dataset == "fashion_mnist" else 32
    if not is_toy:
        check_resolution(args)
    if args.sigma_max is None:
        args.sigma_max = 10.0 if is_toy else 50.0
    if args.learning_rate is None:
        args.learning_rate = 1e-3 if is_toy else 2e-4

    default_conventions = ("score", "sigma") if args.sde == "ve" else ("epsilon", "discrete")
    if args.model == "unet2d" and args.sde == "ve":
        # the NCSN++ layout: Fourier features of log sigma, output divided by sigma
        if args.prediction_type not in (None, "score") or args.timestep_type not in (None, "sigma"):
            raise ValueError("unet2d on the VE SDE is diffusers' NCSN++ layout, which outputs a score and is "
                             "conditioned on sigma: leave --prediction_type / --timestep_type unset.")
    args.prediction_type = args.prediction_type or default_conventions[0]
    args.timestep_type = args.timestep_type or default_conventions[1]

    if args.loss == "ssm" and args.num_classes:
        raise ValueError("--loss ssm trains unconditional models only; drop --num_classes or use --loss dsm.")
    if args.sampler == "ald" and args.sde != "ve":
        raise ValueError(f"--sampler ald (annealed Langevin) runs the VE SDE only, not --sde {args.sde}.")
    if args.num_classes is not None and args.num_classes < 1:
        raise ValueError(f"--num_classes must be >= 1, got {args.num_classes}.")
    if not 0 <= args.label_dropout < 1:
        raise ValueError(f"--label_dropout must lie in [0, 1), got {args.label_dropout}.")
    for name in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "checkpointing_steps",
                 "logging_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.time_budget_minutes is not None and not args.time_budget_minutes > 0:
        raise ValueError(f"--time_budget_minutes must be > 0 (or left out for no budget), "
                         f"got {args.time_budget_minutes}.")
    if args.channels_last and is_toy:
        raise ValueError("--channels_last is a memory format of image batches (n, c, h, w); the 2-D toys have "
                         "none: drop it or use --no-channels_last.")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/score-sde-moons).")
    if args.report_to is None:
        args.report_to = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    elif args.report_to == "tensorboard" and not importlib.util.find_spec("tensorboard"):
        raise ValueError("--report_to tensorboard needs the tensorboard package: pip install tensorboard.")
    args.num_inference_steps = args.num_inference_steps or {"pc": 500, "ode": 50, "em": 1000, "ald": 100}[args.sampler]
    args.num_preview_samples = args.num_preview_samples or (2000 if is_toy else 16)
    args.num_eval_samples = args.num_eval_samples or (2000 if is_toy else 16)
    if args.eval_likelihood_samples is None:
        args.eval_likelihood_samples = 500 if is_toy else 0


def check_resolution(args: argparse.Namespace) -> None:
    if args.dataset == "fashion_mnist" and args.resolution not in (28, 32):
        raise ValueError(f"--resolution {args.resolution} does not fit Fashion-MNIST: use 28 or 32 (zero-padded).")
    if args.model == "unet2d" and args.resolution not in UNET2D_PRESETS:
        raise ValueError(f"--model unet2d has presets for --resolution {sorted(UNET2D_PRESETS)}, "
                         f"not {args.resolution}.")
    if args.model == "ncsn":
        default_channels = inspect.signature(NCSNScoreModel.__init__).parameters["block_out_channels"].default
        levels = len(args.block_out_channels or default_channels)
        if args.resolution % 2 ** (levels - 1):
            raise ValueError(f"--resolution {args.resolution} must be divisible by {2 ** (levels - 1)} for an ncsn "
                             f"model with {levels} levels (--block_out_channels).")


# --- data ----------------------------------------------------------------------------------------------------


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


# --- model, SDE and sampler ----------------------------------------------------------------------------------


def build_model(args, data: TrainingData):
    if args.model == "scorekit_mlp":
        return ScoreMLP(
            data_dim=data.examples.shape[1], hidden_dim=args.hidden_dim, num_layers=args.num_layers,
            prediction_type=args.prediction_type, timestep_type=args.timestep_type, num_class_embeds=args.num_classes,
        )
    channels = data.examples.shape[1]
    if args.model == "ncsn":
        options = {"block_out_channels": args.block_out_channels, "layers_per_block": args.layers_per_block}
        return NCSNScoreModel(
            in_channels=channels, sample_size=args.resolution,
            prediction_type=args.prediction_type, timestep_type=args.timestep_type,
            num_class_embeds=args.num_classes, **{k: v for k, v in options.items() if v is not None},
        )
    return build_unet2d(args.resolution, channels, block_out_channels=args.block_out_channels,
                        layers_per_block=args.layers_per_block, fourier_time=args.sde == "ve",
                        num_classes=args.num_classes)


def build_unet2d(resolution: int, channels: int, *, block_out_channels: Optional[Tuple[int, ...]] = None,
                 layers_per_block: Optional[int] = None, fourier_time: bool = False,
                 num_classes: Optional[int] = None):
    """The ``UNet2DModel`` of ``UNET2D_PRESETS[resolution]`` (channels per level replaceable, 2 layers per block
    by default), with positional time embeddings (DDPM's) or Fourier ones (NCSN++'s, for the VE SDE). Shared with
    ``benchmarks/train_ddpm_baseline.py`` so that the DDPM baseline trains exactly this network."""
    from diffusers import UNet2DModel

    preset = dict(UNET2D_PRESETS[resolution])
    if block_out_channels is not None:
        if len(block_out_channels) != len(preset["block_out_channels"]):
            raise ValueError(f"--block_out_channels for unet2d at {resolution} px needs "
                             f"{len(preset['block_out_channels'])} entries, got {block_out_channels}.")
        preset["block_out_channels"] = tuple(block_out_channels)
    return UNet2DModel(
        sample_size=resolution, in_channels=channels, out_channels=channels,
        layers_per_block=layers_per_block or 2,
        norm_num_groups=math.gcd(32, *preset["block_out_channels"]),
        time_embedding_type="fourier" if fourier_time else "positional",
        # diffusers' convention for classifier-free guidance: the null label is the last embedding
        num_class_embeds=None if num_classes is None else num_classes + 1,
        **preset,
    )


def training_sde(args):
    """The forward SDE of ``--sde`` with the run's parameters."""
    return build_sde(args.sde, sigma_min=args.sigma_min, sigma_max=args.sigma_max, beta_min=args.beta_min,
                     beta_max=args.beta_max, num_train_timesteps=args.num_train_timesteps)


def sde_config(args) -> dict:
    """The SDE fields every scorekit scheduler config shares."""
    return {
        "sde_type": args.sde, "sigma_min": args.sigma_min, "sigma_max": args.sigma_max, "beta_min": args.beta_min,
        "beta_max": args.beta_max, "num_train_timesteps": args.num_train_timesteps,
        "prediction_type": args.prediction_type, "timestep_type": args.timestep_type,
    }


def build_sampling_scheduler(args):
    """The scheduler of ``--sampler`` on the training SDE, with the model's output and time conventions."""
    reference = PredictorCorrectorScheduler(**sde_config(args))
    if args.sampler == "pc":
        return reference
    if args.sampler == "ode":
        return ProbabilityFlowODEScheduler.from_config(reference.config)
    if args.sampler == "ald":
        # NCSN's 100 Langevin steps per level is for images; a few per level do for the toys
        return AnnealedLangevinScheduler.from_config(reference.config, num_annealed_steps=5)
    euler_maruyama = VEEulerMaruyamaScheduler if args.sde == "ve" else VPEulerMaruyamaScheduler
    return euler_maruyama.from_config(reference.config)


def run_config(args, model, data: TrainingData) -> dict:
    """What a checkpoint was trained with: ``model`` and ``sde`` must match to resume; ``training`` should."""
    model_config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    return json.loads(json.dumps({
        "model": {"class": type(model).__name__, "config": model_config},
        "sde": sde_config(args),
        "data": {"description": data.description, "normalization": data.normalization,
                 "class_names": data.class_names},
        "training": {name: getattr(args, name) for name in (
            "dataset", "train_data_dir", "dataset_name", "dataset_config_name", "image_column", "num_toy_samples",
            "resolution", "center_crop", "random_flip", "num_classes",
            "label_dropout", "loss", "time_sampling", "weighting", "importance_sampling", "num_projections",
            "sampling_eps", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
            "lr_warmup_steps", "max_grad_norm", "use_ema", "ema_decay", "seed") + SPEED_SWITCHES},
    }))


# --- deterministic data order and randomness -----------------------------------------------------------------


def seed_of(*keys: int) -> int:
    """A 63-bit seed derived from integers, well mixed (neighbouring keys give unrelated streams)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


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


def step_generator(seed: int, process_index: int, step: int, micro_batch: int) -> torch.Generator:
    """The CPU generator of every draw in one micro-batch (the losses draw on the CPU and move the result)."""
    return torch.Generator().manual_seed(seed_of(seed, 2, process_index, step, micro_batch))


# --- checkpoints ---------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str) -> List[Path]:
    """Complete checkpoints, oldest first (a checkpoint is renamed into place only once fully written)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def find_resume_checkpoint(args) -> Optional[Path]:
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(args.output_dir)
        if not checkpoints:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting a new run.",
                           args.output_dir)
            return None
        return checkpoints[-1]
    path = Path(args.resume_from_checkpoint)
    if not (path / RUN_CONFIG_NAME).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {path} is not a checkpoint folder (no {RUN_CONFIG_NAME}).")
    return path


def check_resumable(checkpoint: Path, current: dict) -> None:
    """Raise if the checkpoint's model or SDE differs from this run's; warn on other training settings."""
    saved = json.loads((checkpoint / RUN_CONFIG_NAME).read_text())
    for section in ("model", "sde"):
        if saved[section] != current[section]:
            differences = _differences(saved[section], current[section])
            raise ValueError(f"cannot resume from {checkpoint}: its {section} differs from this run's "
                             f"({'; '.join(differences)}).")
    differences = _differences(saved["training"], current["training"])
    if differences:
        logger.warning("resuming from %s with different training settings (%s): the run will not reproduce an "
                       "uninterrupted one.", checkpoint, "; ".join(differences))


def _differences(saved: dict, current: dict, prefix: str = "") -> List[str]:
    lines = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            lines += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            lines.append(f"{prefix}{key}: checkpoint {old!r}, now {new!r}")
    return lines


def save_checkpoint(accelerator, args, step: int, config: dict) -> None:
    """``accelerator.save_state`` into a temporary folder renamed into place when complete, so that a run killed
    while saving leaves no half-written "latest" checkpoint; keeps at most ``checkpoints_total_limit``."""
    final = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    partial = Path(args.output_dir) / f".{CHECKPOINT_PREFIX}{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        # every process writes its own random states into it
        partial.mkdir(parents=True)
        if args.checkpoints_total_limit:
            # make room for the new one
            existing = list_checkpoints(args.output_dir)
            for old in existing[:max(0, len(existing) - args.checkpoints_total_limit + 1)]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / RUN_CONFIG_NAME).write_text(json.dumps(config, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()


# --- evaluation and images -----------------------------------------------------------------------------------


def image_grid(images: List[Image.Image]) -> Image.Image:
    from diffusers.utils import make_image_grid

    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    blank = Image.new(images[0].mode, images[0].size)
    return make_image_grid(images + [blank] * (rows * columns - len(images)), rows=rows, cols=columns)


def evaluation_labels(pipe: ScoreSDEPipeline, batch_size: int, is_image: bool) -> Optional[torch.Tensor]:
    """Labels to sample a class-conditional model with: each class in turn for an image grid, the null label
    (the whole distribution) for the point-set metrics; ``None`` for an unconditional model."""
    if pipe.unet.config.get("num_class_embeds") is None:
        return None
    null_label = pipe.null_class_label
    if is_image:
        return torch.arange(batch_size) % null_label
    return torch.full((batch_size,), null_label)


def sample_pipeline(pipe: ScoreSDEPipeline, num_samples: int, num_inference_steps: int, seed: int, is_image: bool):
    """Samples as PIL images (image models) or a float tensor of points."""
    generator = torch.Generator(pipe.device).manual_seed(seed)
    labels = evaluation_labels(pipe, num_samples, is_image)
    output = pipe(num_samples, num_inference_steps, generator=generator, class_labels=labels,
                  output_type="pil" if is_image else "pt")
    return output.images if is_image else output.samples.float().cpu()


def sample_figure(samples, data: TrainingData, title: str) -> Image.Image:
    if data.is_image:
        return image_grid(samples)
    return scatter_image([(data.held_out, "held-out data"), (samples, title)], extent=TOY_PLOT_EXTENT)


def measure(pipe: ScoreSDEPipeline, args, data: TrainingData, samples) -> Dict[str, str]:
    """The metrics of the model card, as printable strings."""
    metrics = {}
    if not data.is_image:
        scores = knn_coverage(data.held_out, samples)
        metrics[f"coverage ({NEIGHBOURHOOD_SIZE}-NN, {len(data.held_out)} held-out points)"] = f"{scores['coverage']:.3f}"
        metrics[f"precision ({NEIGHBOURHOOD_SIZE}-NN)"] = f"{scores['precision']:.3f}"
        if args.dataset == "gmm":
            mixture = GaussianMixture.ring()
            std, mean = torch.tensor(data.normalization["std"]), torch.tensor(data.normalization["mean"])
            report = mixture.report(samples.double() * std + mean)
            metrics["mode weights, total variation (GaussianMixture.report)"] = f"{report['tv']:.3f}"
            metrics["within-mode variance error (GaussianMixture.report)"] = f"{report['variance_error']:.3f}"
    metrics["bits/dim"] = likelihood_metric(pipe, data, args.eval_likelihood_samples, args.seed)
    return metrics


def likelihood_metric(pipe: ScoreSDEPipeline, data: TrainingData, num_examples: int, seed: int) -> str:
    """Bits/dim of ``num_examples`` held-out examples by the probability-flow ODE."""
    if num_examples <= 0:
        return "not measured"
    if pipe.unet.config.get("num_class_embeds") is not None:
        return "not measured (class-conditional model)"
    score_fn = pipe.score_function()
    examples = data.held_out[:num_examples].to(pipe.device)
    generator = torch.Generator(pipe.device).manual_seed(seed)
    if data.is_image:
        result = log_likelihood(score_fn, dequantize_and_scale(examples, generator), data="8bit", generator=generator)
        where = "training" if data.held_out is data.examples else "held-out"
        return f"{result.bits_per_dim.mean().item():.3f} (8-bit, {len(examples)} {where} images, PF-ODE)"
    result = log_likelihood(score_fn, examples, divergence="exact")
    # back to data units: log p_data(x) = log p_model((x - mean) / std) - sum(log std)
    log_std = torch.tensor(data.normalization["std"], dtype=torch.float64).log().sum()
    bits = -(result.log_likelihood.cpu() - log_std) / (examples.shape[1] * math.log(2))
    return f"{bits.mean().item():.3f} (continuous, in data units, {len(examples)} held-out points, PF-ODE)"


# --- model card and Hub --------------------------------------------------------------------------------------


def training_length(result: Dict[str, object]) -> str:
    """``TimeBudget.report``'s record as a line of the model card."""
    length = f"{result['steps']} of {result['max_train_steps']} steps, {result['training_minutes']} min"
    if result["time_budget_minutes"] is None:
        return length
    if result["stopped_by"] == "time_budget_minutes":
        return f"{length}: stopped by the {result['time_budget_minutes']:g}-min time budget"
    return f"{length} (time budget {result['time_budget_minutes']:g} min, not reached)"


def write_model_card(args, pipe: ScoreSDEPipeline, data: TrainingData, metrics: Dict[str, str],
                     steps: int) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    if not MODEL_CARD_TEMPLATE.is_file():
        raise FileNotFoundError(f"model card template {MODEL_CARD_TEMPLATE} is missing.")
    tags = ["score-based", "sde", f"{args.sde}-sde", "diffusers", "diffusers_scorekit", args.model]
    if data.is_image:
        tags.append("unconditional-image-generation" if args.num_classes is None else "class-conditional")
    card_data = ModelCardData(
        library_name="diffusers_scorekit",
        license=args.license,
        tags=tags,
        datasets=[data.hub_dataset] if data.hub_dataset else None,
        pipeline_tag="unconditional-image-generation" if data.is_image else None,
    )
    scheduler = pipe.scheduler
    repo_or_path = args.hub_model_id if args.push_to_hub else os.path.abspath(args.output_dir)
    output = "images" if data.is_image else "samples"
    batch_size = 16 if data.is_image else 2000
    call = f"{output} = pipe(batch_size={batch_size}, num_inference_steps={args.num_inference_steps}).{output}"
    if args.num_classes is not None:
        call = (f"labels = torch.arange({batch_size}) % {args.num_classes}  # label {args.num_classes} is the null "
                f"(unconditional) one\n{output} = pipe(batch_size={batch_size}, num_inference_steps="
                f"{args.num_inference_steps}, class_labels=labels, guidance_scale=2.0).{output}")
    training_config = {k: v for k, v in run_config(args, pipe.unet, data)["training"].items() if v is not None}
    card = ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        model_name=os.path.basename(os.path.abspath(args.output_dir)),
        model_class=type(pipe.unet).__name__,
        sde_description=repr(scheduler.sde),
        data_description=data.description,
        normalization=data.normalization,
        # labels only matter to a class-conditional model
        class_names=data.class_names if args.num_classes is not None else None,
        null_label=args.num_classes,
        training_config=training_config,
        model_config={k: v for k, v in dict(pipe.unet.config).items() if not k.startswith("_")},
        max_train_steps=steps,
        scheduler_class=type(scheduler).__name__,
        scheduler_config={k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")},
        num_inference_steps=args.num_inference_steps,
        nfe=len(scheduler.timesteps) if scheduler.timesteps is not None else "n/a",
        metrics=metrics,
        neighbourhood_size=None if data.is_image else NEIGHBOURHOOD_SIZE,
        sample_image=SAMPLE_IMAGE_NAME,
        repo_or_path=repo_or_path,
        usage_call=call,
    )
    card.save(os.path.join(args.output_dir, "README.md"))


def push_to_hub(args) -> str:
    """Create the repo and upload the pipeline folder; on failure say so and where the files are."""
    from huggingface_hub import create_repo, upload_folder

    try:
        repo_id = create_repo(args.hub_model_id, exist_ok=True, private=args.hub_private_repo,
                              token=args.hub_token).repo_id
        upload_folder(repo_id=repo_id, folder_path=args.output_dir, token=args.hub_token,
                      commit_message="Upload score-based model trained with diffusers_scorekit",
                      ignore_patterns=[f"{CHECKPOINT_PREFIX}*", f".{CHECKPOINT_PREFIX}*", "samples/*",
                                       f"{args.logging_dir}/*"])
    except Exception as error:  # network, authentication and permission errors come in many types
        raise RuntimeError(
            f"pushing to the Hub repo {args.hub_model_id!r} failed ({type(error).__name__}: {error}). Nothing is "
            f"lost: the trained pipeline and its model card are in {os.path.abspath(args.output_dir)}; upload it "
            f"later with `huggingface-cli upload {args.hub_model_id} {args.output_dir}`."
        ) from error
    return repo_id


# --- training ------------------------------------------------------------------------------------------------


def resolve_speed(args, device: torch.device) -> None:
    """Turn every unset speed switch into a bool for a run on ``device`` (``--speed auto``: all on for CUDA, but
    channels_last and torch_compile only for image models; none elsewhere) and apply the process-wide one, TF32.

    With the switch off, float32 matmuls keep PyTorch's default full precision; cuDNN convolutions use TF32 by
    PyTorch's default either way, so on means TF32 matmuls (and, explicitly, cuDNN)."""
    image_model = args.model != "scorekit_mlp"
    auto = args.speed == "auto" and device.type == "cuda"
    for name in SPEED_SWITCHES:
        if getattr(args, name) is None:
            setattr(args, name, auto and (image_model or name not in ("channels_last", "torch_compile")))
    torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
    if args.allow_tf32:
        torch.backends.cudnn.allow_tf32 = True


def build_optimizer(args, parameters, device: torch.device) -> Tuple[torch.optim.AdamW, str]:
    """AdamW with the run's hyper-parameters, on parameters already on ``device``, and the name of the
    implementation for the log: with ``--fused_optimizer`` the fused kernel where ``device`` has one (else
    foreach kernels), without it PyTorch's default (foreach on CUDA, a loop over the parameters on the CPU)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    implementation, name = {}, f"AdamW (PyTorch's default implementation on {device.type})"
    if args.fused_optimizer:
        if device.type in _get_fused_kernels_supported_devices():
            implementation, name = {"fused": True}, "AdamW (fused)"
        else:
            implementation, name = {"foreach": True}, f"AdamW (foreach: no fused AdamW on {device.type})"
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, **implementation)
    return optimizer, name


@dataclass
class TrainingState:
    """What one optimizer update works on (see ``prepare_training``)."""

    model: torch.nn.Module  # as accelerate prepared it (DDP-wrapped with several processes); checkpointed
    unwrapped: torch.nn.Module  # the plain model: the EMA, previews and the saved pipeline use it
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: Optional[object]  # diffusers' EMAModel with --use_ema
    score_fn: ScoreFunction  # the training forward, compiled with --torch_compile


def prepare_training(args, accelerator, model, sde) -> TrainingState:
    """Put ``model`` on the device with the speed switches (already resolved by ``resolve_speed``), build its
    optimizer, schedule and EMA, prepare them with ``accelerator`` and register everything an exact resume needs
    (model, optimizer, schedule, EMA) for its checkpoints. The log says which switches are on.

    ``torch.compile`` wraps only the forward the loss calls: accelerate checkpoints, the EMA and the saved
    pipeline see the uncompiled module, so its state-dict keys never get compile's ``_orig_mod.`` prefix, and
    sampling the pipeline does not recompile."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # on the device before the optimizer is built, so that the fused implementation is chosen for that device
    model = model.to(accelerator.device)
    optimizer, optimizer_name = build_optimizer(args, model.parameters(), accelerator.device)
    # stepped once per optimizer update by us rather than prepared, so warm-up counts updates whatever the
    # number of processes; saved with the checkpoint as a registered object
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)
    ema = None
    if args.use_ema:
        ema = EMAModel(unwrapped.parameters(), decay=args.ema_decay, foreach=args.fused_optimizer,
                       model_cls=type(unwrapped), model_config=unwrapped.config)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    forward = torch.compile(model) if args.torch_compile else model
    score_fn = ScoreFunction(forward, sde, args.prediction_type, args.timestep_type, args.num_train_timesteps)
    logger.info("speed on %s: channels_last %s, TF32 %s, %s%s, torch.compile %s, %s", accelerator.device,
                *("on" if getattr(args, name) else "off" for name in ("channels_last", "allow_tf32")), optimizer_name,
                " and foreach EMA" if ema is not None and args.fused_optimizer else "",
                "on" if args.torch_compile else "off", f"{accelerator.mixed_precision} mixed precision")
    return TrainingState(model, unwrapped, optimizer, lr_scheduler, ema, score_fn)


def to_device(tensor: torch.Tensor, device, channels_last: bool = False) -> torch.Tensor:
    """A host tensor on ``device`` (channels-last if asked). To CUDA it goes through pinned memory without
    blocking: a blocking copy waits for everything queued on the device, which would leave the device idle while
    the host prepares each step."""
    if channels_last:
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def training_loss(args, score_fn: ScoreFunction, x0, class_labels, generator) -> torch.Tensor:
    """The loss of one micro-batch. Denoising score matching gets its times and noise drawn here on the host
    from ``generator``, as the loss would draw them itself, and copied with ``to_device`` (without waiting)."""
    if args.loss == "ssm":
        return sliced_score_matching_loss(score_fn, x0, num_projections=args.num_projections,
                                          sampling_eps=args.sampling_eps, generator=generator)
    t = sample_time(score_fn, len(x0), time_sampling=args.time_sampling, sampling_eps=args.sampling_eps,
                    importance_sampling=args.importance_sampling, generator=generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    return denoising_score_matching_loss(
        score_fn, x0, time_sampling=args.time_sampling, weighting=args.weighting,
        importance_sampling=args.importance_sampling, sampling_eps=args.sampling_eps, class_labels=class_labels,
        t=to_device(t, x0.device), noise=to_device(noise, x0.device, channels_last=bool(args.channels_last)),
    )


def make_batch(args, data: TrainingData, indices, generator, device):
    """The micro-batch in model space, randomly flipped and with labels dropped to the null label, all drawn
    from this micro-batch's ``generator``, on ``device`` (see ``to_device``)."""
    x0 = data.to_model_space(data.examples[indices])
    if args.random_flip and data.is_image:
        flip = torch.rand(len(indices), generator=generator) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    labels = None
    if args.num_classes is not None:
        labels = data.labels[indices].clone()
        labels[torch.rand(len(indices), generator=generator) < args.label_dropout] = args.num_classes
        labels = to_device(labels, device)
    return to_device(x0, device, channels_last=bool(args.channels_last)), labels


def train_step(args, accelerator, state: TrainingState, data: TrainingData, order: "BatchOrder",
               step: int) -> torch.Tensor:
    """Optimizer update number ``step`` (from 0): its micro-batches with gradient accumulation, clipping, AdamW,
    the learning-rate schedule and the EMA. Returns the sum of the micro-batch losses on the device, without
    waiting for it."""
    loss_sum = 0
    for micro_batch in range(args.gradient_accumulation_steps):
        generator = step_generator(args.seed, accelerator.process_index, step, micro_batch)
        indices = order.indices(step * args.gradient_accumulation_steps + micro_batch)
        x0, labels = make_batch(args, data, indices, generator, accelerator.device)
        with accelerator.accumulate(state.model):
            with accelerator.autocast():
                loss = training_loss(args, state.score_fn, x0, labels, generator)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(state.model.parameters(), args.max_grad_norm)
            state.optimizer.step()
            state.optimizer.zero_grad()
        loss_sum = loss_sum + loss.detach()
    if not accelerator.sync_gradients:
        raise RuntimeError("gradients were not synchronised after a full accumulation: accelerate's step "
                           "counter is out of line with this loop.")
    state.lr_scheduler.step()
    if state.ema is not None:
        state.ema.step(state.unwrapped.parameters())
    return loss_sum


class TimeBudget:
    """The wall-clock budget of a training loop, counted from construction (``minutes=None``: no budget).
    ``exhausted`` is decided by the main process's clock and broadcast, so every process stops at the same step;
    it waits for the device, so call it where the loop waits anyway (at logging)."""

    def __init__(self, minutes: Optional[float], accelerator):
        self.minutes, self.accelerator = minutes, accelerator
        self.start = time.monotonic()

    def elapsed_minutes(self) -> float:
        return (time.monotonic() - self.start) / 60

    def exhausted(self) -> bool:
        if self.minutes is None:
            return False
        from accelerate.utils import broadcast

        over = torch.tensor([float(self.elapsed_minutes() >= self.minutes)], device=self.accelerator.device)
        return bool(broadcast(over, from_process=0).item())

    def report(self, steps: int, max_train_steps: int, stopped: bool) -> Dict[str, object]:
        """How long the run trained, for the run configuration and the model card: ``steps`` counts from the
        start of the run, ``training_minutes`` from the start of this launch (a resumed run's last part)."""
        return {"steps": steps, "max_train_steps": max_train_steps, "time_budget_minutes": self.minutes,
                "training_minutes": round(self.elapsed_minutes(), 3),
                "stopped_by": "time_budget_minutes" if stopped else "max_train_steps"}


def export_pipeline(model, args, data: TrainingData, preview_step: Optional[int] = None) -> ScoreSDEPipeline:
    """Build the sampling pipeline; for a preview, write its samples to ``samples/step-N.png``."""
    pipe = ScoreSDEPipeline(unet=model, scheduler=build_sampling_scheduler(args))
    pipe.set_progress_bar_config(disable=True)
    if preview_step is not None:
        samples = sample_pipeline(pipe, args.num_preview_samples, args.num_inference_steps, args.seed, data.is_image)
        folder = Path(args.output_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        sample_figure(samples, data, f"step {preview_step}").save(folder / f"step-{preview_step:07d}.png")
    return pipe


def main(args: argparse.Namespace) -> str:
    """Train, then save the pipeline and its model card to ``args.output_dir`` (returned)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    resolve_args(args)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    resolve_speed(args, accelerator.device)
    data = load_data(args)
    set_seed(args.seed)
    model = build_model(args, data)
    config = run_config(args, model, data)
    checkpoint = find_resume_checkpoint(args)
    if checkpoint is not None:
        check_resumable(checkpoint, config)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    state = prepare_training(args, accelerator, model, training_sde(args))
    order = BatchOrder(len(data.examples), args.train_batch_size, accelerator.num_processes,
                       accelerator.process_index, args.seed)

    global_step = 0
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        global_step = int(checkpoint.name[len(CHECKPOINT_PREFIX):])
        logger.info("resumed from %s at step %d", checkpoint, global_step)
    if accelerator.is_main_process:
        accelerator.init_trackers("score_sde", config={k: v for k, v in vars(args).items()
                                                       if isinstance(v, (int, float, str, bool))})
    logger.info("training %s (%.2fM parameters) on %s for %d steps%s, %d process(es), %d example(s) per update",
                type(state.unwrapped).__name__, sum(p.numel() for p in state.unwrapped.parameters()) / 1e6,
                data.description, args.max_train_steps,
                "" if args.time_budget_minutes is None else f" or {args.time_budget_minutes:g} minutes",
                accelerator.num_processes,
                args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps)
    kill_at_step = int(os.environ.get(KILL_AT_STEP_ENV, "0"))

    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    budget = TimeBudget(args.time_budget_minutes, accelerator)
    out_of_time = False
    # summed on the device and read only at logging, the one place the loop waits for the device
    unlogged_loss, unlogged_steps = 0, 0
    state.model.train()
    while global_step < args.max_train_steps and not out_of_time:
        unlogged_loss = unlogged_loss + train_step(args, accelerator, state, data, order, global_step)
        unlogged_steps += 1
        global_step += 1
        progress.update(1)
        finished = global_step == args.max_train_steps
        if global_step % args.logging_steps == 0 or finished:
            logs = {"loss": unlogged_loss.item() / (unlogged_steps * args.gradient_accumulation_steps),
                    "lr": state.lr_scheduler.get_last_lr()[0]}
            if state.ema is not None:
                logs["ema_decay"] = state.ema.cur_decay_value
            progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=global_step)
            unlogged_loss, unlogged_steps = 0, 0
            out_of_time = not finished and budget.exhausted()
            if out_of_time:
                logger.info("time budget of %g minutes used up at step %d of %d", args.time_budget_minutes,
                            global_step, args.max_train_steps)

        if out_of_time or (global_step % args.checkpointing_steps == 0 and not finished):
            save_checkpoint(accelerator, args, global_step, config)
        if args.sample_every and global_step % args.sample_every == 0 and accelerator.is_main_process:
            with ema_weights(state.ema, state.unwrapped):
                state.unwrapped.eval()
                export_pipeline(state.unwrapped, args, data, preview_step=global_step)
                state.unwrapped.train()
        if global_step == kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
    progress.close()
    config["result"] = budget.report(global_step, args.max_train_steps, out_of_time)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if state.ema is not None:
            state.ema.copy_to(state.unwrapped.parameters())
        state.unwrapped.eval()
        save_final(state.unwrapped, args, data, config)
    accelerator.end_training()
    return args.output_dir


@contextlib.contextmanager
def ema_weights(ema, model):
    """Inside the block the model holds the EMA weights; after it, its own again."""
    if ema is None:
        yield
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield
    finally:
        ema.restore(model.parameters())


def save_final(model, args, data: TrainingData, config: dict) -> None:
    """The pipeline (safetensors), its run configuration (with how long it trained, ``config["result"]``), a
    sample image and the model card; then the Hub."""
    pipe = export_pipeline(model, args, data)
    pipe.save_pretrained(args.output_dir)
    Path(args.output_dir, RUN_CONFIG_NAME).write_text(json.dumps(config, indent=2))
    samples = sample_pipeline(pipe, args.num_eval_samples, args.num_inference_steps, args.seed, data.is_image)
    sample_figure(samples, data, f"{type(pipe.scheduler).__name__}, {args.num_inference_steps} steps").save(
        os.path.join(args.output_dir, SAMPLE_IMAGE_NAME))
    metrics = {"training length": training_length(config["result"]), **measure(pipe, args, data, samples)}
    for name, value in metrics.items():
        logger.info("%s: %s", name, value)
    write_model_card(args, pipe, data, metrics, config["result"]["steps"])
    logger.info("saved the pipeline and its model card to %s", os.path.abspath(args.output_dir))
    if args.push_to_hub:
        logger.info("pushed to https://huggingface.co/%s", push_to_hub(args))
