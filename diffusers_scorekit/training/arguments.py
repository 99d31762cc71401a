"""The command line of ``training/train_score_sde.py`` and ``scorekit train``: the parser, and ``resolve_args``,
which fills the data- and SDE-dependent defaults and rejects inconsistent options before any data is read."""

import argparse
import importlib.util
import inspect
import math
import os
from typing import List, Optional, Tuple

from ..metrics import FASHION_MNIST_DIR
from ..models import NCSNScoreModel
from ..parametrization import PREDICTION_TYPES, TIMESTEP_TYPES
from ..sde import SDE_TYPES
from .data import DATASETS, TOY_DATASETS
from .models import UNET2D_PRESETS

MODELS = ("scorekit_mlp", "ncsn", "unet2d")
LOSSES = ("dsm", "ssm")
SAMPLERS = ("pc", "ode", "em", "ald")
SPEED_MODES = ("auto", "none")
# the speed switches --speed decides when they are not given; resolve_speed turns each into a bool
SPEED_SWITCHES = ("channels_last", "allow_tf32", "fused_optimizer", "torch_compile")
LICENSE_DEFAULT = "apache-2.0"
MULTI_PROCESS_HELP = """\
several processes (data parallel; the log's first line says how many joined and the global batch):
  CPU:  torchrun --nproc_per_node 2 training/train_score_sde.py ...
        (or ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 ...;
        `accelerate launch --cpu --num_processes 2` runs ONE process)
  GPUs: accelerate launch --multi_gpu --num_processes N --num_machines 1 training/train_score_sde.py ...
        or torchrun --nproc_per_node N training/train_score_sde.py ...
--train_batch_size is per process. Two runs writing one --output_dir are refused (a lock file in
<output_dir>-checkpoints/, the folder that holds the checkpoints, outside the pipeline folder)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option help, and the epilog's lines (the launch commands) kept as written."""


def int_tuple(text: str) -> Tuple[int, ...]:
    """An argparse type: "32,64,64" -> (32, 64, 64)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 32,64,64, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a score-based generative model (VE / VP / sub-VP SDE) and save a ScoreSDEPipeline.",
        epilog=MULTI_PROCESS_HELP,
        formatter_class=HelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, help="a built-in dataset (2-D toys or Fashion-MNIST); "
                      "imagefolder: --train_data_dir's")
    data.add_argument("--train_data_dir", help="a folder of images, read by datasets' imagefolder (class subfolders "
                      "give labels)")
    data.add_argument("--dataset_name", help="a Hugging Face Hub image dataset (needs the network or a cached copy), "
                      "a local dataset folder, or a folder written by datasets' save_to_disk")
    data.add_argument("--dataset_config_name")
    data.add_argument("--image_column", default="image", help="column of --dataset_name holding the images")
    data.add_argument("--cache_dir")
    data.add_argument("--fashion_mnist_dir", default=FASHION_MNIST_DIR)
    data.add_argument("--num_toy_samples", type=int, default=20000, help="training points of a 2-D toy")
    data.add_argument("--resolution", type=int, default=None, help="image size (default 28 for Fashion-MNIST, "
                      "where 32 pads the images; 32 otherwise)")
    data.add_argument("--center_crop", action="store_true", help="crop the centre square after resizing the short "
                      "side; otherwise images are resized to a square")
    data.add_argument("--random_crop", action="store_true", help="crop a random square after resizing the short "
                      "side (drawn per image from the seed, process and micro-batch)")
    data.add_argument("--random_flip", action="store_true", help="flip images horizontally at random")
    data.add_argument("--streaming", action="store_true", help="stream the dataset (--train_data_dir or "
                      "--dataset_name) instead of preparing it on disk, for data larger than the disk; read in "
                      "its order, in the main process; checkpoints save where the stream stands")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes that "
                      "decode and transform the images of map-style datasets (0: the main process); the batches "
                      "do not depend on it")

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
                            "checkpoints included, checked on the host after every step; with several processes "
                            "every --logging_steps), then save a checkpoint and the pipeline as at the last step. "
                            "The schedule still spans --max_train_steps: set that near the steps the budget allows "
                            "for a decaying schedule to finish")
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
    optim.add_argument("--num_threads", type=int, default=None,
                       help="torch threads per process (default: 1 for the 2-D toys on a CPU, where more threads "
                            "only slow a small MLP down; torch's default otherwise)")

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
    run.add_argument("--output_dir", default="score-sde-model",
                     help="the pipeline folder (weights, configs, model card, samples); checkpoints go to "
                          "<output_dir>-checkpoints next to it, so the folder can be uploaded as it is")
    run.add_argument("--logging_dir", default="logs", help="relative to --output_dir")
    run.add_argument("--report_to", default=None, help="an accelerate tracker; default tensorboard if installed")
    run.add_argument("--logging_steps", type=int, default=10,
                     help="log the mean loss (and, with several processes, check --time_budget_minutes) every N "
                          "steps; in between, the "
                          "loop never waits for the device, checkpoints and previews aside")
    run.add_argument("--checkpointing_steps", type=int, default=500)
    run.add_argument("--checkpoints_total_limit", type=int, default=None,
                     help="keep the newest N checkpoints (the oldest are removed after a new one is written)")
    run.add_argument("--resume_from_checkpoint", default=None,
                     help='"latest" (the newest intact checkpoint of --output_dir) or a checkpoint folder')
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
    if args.dataset == "imagefolder":
        if not args.train_data_dir:
            raise ValueError("--dataset imagefolder reads --train_data_dir: give the folder.")
        args.dataset = None
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

    if args.center_crop and args.random_crop:
        raise ValueError("--center_crop and --random_crop exclude each other: pick one (or neither, to resize "
                         "images to a square).")
    if args.streaming and not (args.train_data_dir or args.dataset_name):
        raise ValueError("--streaming streams --train_data_dir or --dataset_name; the built-in datasets are in memory.")
    if args.dataloader_num_workers < 0:
        raise ValueError(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}.")
    if args.loss == "ssm" and args.num_classes:
        raise ValueError("--loss ssm trains unconditional models only; drop --num_classes or use --loss dsm.")
    if args.sampler == "ald" and args.sde != "ve":
        raise ValueError(f"--sampler ald (annealed Langevin) runs the VE SDE only, not --sde {args.sde}.")
    if args.num_classes is not None and args.num_classes < 1:
        raise ValueError(f"--num_classes must be >= 1, got {args.num_classes}.")
    check_ranges(args)
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
    check_writable(args.output_dir)


# options that count something: (name, smallest value); None (the option's unset default) passes
COUNTS = (("train_batch_size", 1), ("max_train_steps", 1), ("gradient_accumulation_steps", 1),
          ("checkpointing_steps", 1), ("logging_steps", 1), ("num_toy_samples", 1), ("resolution", 1),
          ("hidden_dim", 1), ("num_layers", 1), ("layers_per_block", 1), ("num_train_timesteps", 1),
          ("num_projections", 1), ("lr_warmup_steps", 0), ("checkpoints_total_limit", 1), ("sample_every", 0),
          ("num_preview_samples", 1), ("num_inference_steps", 1), ("num_eval_samples", 1),
          ("eval_likelihood_samples", 0), ("num_threads", 1))


def check_ranges(args: argparse.Namespace) -> None:
    """Counts at least their smallest value, and every real number finite and in its range (ValueError)."""
    for name, smallest in COUNTS:
        value = getattr(args, name, None)
        if value is not None and value < smallest:
            raise ValueError(f"--{name} must be >= {smallest}, got {value}.")
    if args.block_out_channels is not None and min(args.block_out_channels) < 1:
        raise ValueError(f"--block_out_channels must be positive, got {','.join(map(str, args.block_out_channels))}.")
    for name in ("sigma_min", "sigma_max", "beta_min", "beta_max", "learning_rate", "adam_beta1", "adam_beta2",
                 "adam_weight_decay", "adam_epsilon", "max_grad_norm", "ema_decay", "label_dropout",
                 "sampling_eps", "time_budget_minutes"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"--{name} must be a finite number, got {value}.")
    ranges = [
        ("sigma_min", args.sigma_min > 0, "> 0"),
        ("sigma_max", args.sigma_max > args.sigma_min, f"> --sigma_min ({args.sigma_min})"),
        ("beta_min", args.beta_min >= 0, ">= 0"),
        ("beta_max", args.beta_max > args.beta_min, f"> --beta_min ({args.beta_min})"),
        ("learning_rate", args.learning_rate > 0, "> 0"),
        ("adam_beta1", 0 <= args.adam_beta1 < 1, "in [0, 1)"),
        ("adam_beta2", 0 <= args.adam_beta2 < 1, "in [0, 1)"),
        ("adam_weight_decay", args.adam_weight_decay >= 0, ">= 0"),
        ("adam_epsilon", args.adam_epsilon > 0, "> 0"),
        ("max_grad_norm", args.max_grad_norm >= 0, ">= 0 (0 disables clipping)"),
        ("ema_decay", 0 < args.ema_decay < 1, "in (0, 1)"),
        ("label_dropout", 0 <= args.label_dropout < 1, "in [0, 1)"),
        ("sampling_eps", args.sampling_eps is None or 0 < args.sampling_eps < 1, "in (0, 1)"),
    ]
    for name, valid, allowed in ranges:
        if not valid:
            raise ValueError(f"--{name} must be {allowed}, got {getattr(args, name)}.")


def check_writable(output_dir: str) -> None:
    """``--output_dir`` (and its checkpoints folder next to it) must be creatable and writable, checked before any
    data is read rather than at the first checkpoint."""
    path = os.path.abspath(output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--output_dir {output_dir} is a file, not a folder.")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--output_dir {output_dir} cannot be created: {existing} is a file.")
    # the checkpoints folder is created next to output_dir, so its parent must be writable too
    for folder in {existing, os.path.dirname(path) if os.path.exists(path) else existing}:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"--output_dir {output_dir} cannot be written: no write permission on {folder}.")


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
