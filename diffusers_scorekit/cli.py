"""The ``scorekit`` command: train, sample, a quick demo and the likelihood.

    scorekit train --dataset two_moons --max_train_steps 3000 --output_dir moons     # train_score_sde.py's arguments
    scorekit sample moons --scheduler ProbabilityFlowODEScheduler --num_inference_steps 50 --output moons.png
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m diffusers_scorekit.cli sample fmnist \
        --num_images 1000 --output fmnist-samples.npz                                 # 2 CPU processes
    scorekit demo --output_dir outputs/scorekit-demo                                   # two moons, 1-3 minutes
    scorekit demo --data fashion_mnist                                                # a few minutes
    scorekit likelihood moons --num_examples 500
    scorekit likelihood moons --method elbo                                           # the variational bound
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from . import schedulers as scorekit_schedulers
from . import training
from .demo import scatter_image
from .distributed_sampling import sample_across_processes
from .pipelines import ScoreSDEPipeline
from .schedulers import ProbabilityFlowODEScheduler
from .schedulers.scheduling_utils import SCOREKIT_SCHEDULERS
from .training.data import seed_of
from .variational_bound import bound_metric

PILOT_SEED_STREAM = 5  # seed_of stream of `sample --calibrate`'s pilot draws

# the demo's samplers on the two-moons models, as (title, scheduler class, SDE of the model, inference steps)
DEMO_SAMPLERS = [
    ("annealed Langevin", "AnnealedLangevinScheduler", "ve", 50),
    ("VE Euler-Maruyama", "VEEulerMaruyamaScheduler", "ve", 500),
    ("predictor-corrector", "PredictorCorrectorScheduler", "ve", 250),
    ("PF-ODE (DPM-Solver++ 2M)", "ProbabilityFlowODEScheduler", "ve", 50),
    ("VP Euler-Maruyama", "VPEulerMaruyamaScheduler", "vp", 500),
]


# --- sample --------------------------------------------------------------------------------------------------


def load_pipeline(path: str, scheduler_name: Optional[str] = None) -> ScoreSDEPipeline:
    pipe = ScoreSDEPipeline.from_pretrained(path)
    if scheduler_name is not None:
        scheduler_class = getattr(scorekit_schedulers, scheduler_name)
        try:
            pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
        except ValueError as error:
            raise SystemExit(f"{scheduler_name} cannot sample this model: {error}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def training_config_of(path: str) -> Optional[dict]:
    """The run configuration saved next to a pipeline trained by ``scorekit train`` (None for other folders)."""
    config_path = Path(path) / training.RUN_CONFIG_NAME
    return json.loads(config_path.read_text()) if config_path.is_file() else None


def sample_command(args) -> None:
    """Sample to a PNG (grid or scatter plot), .npy, .npz or a folder of PNGs. Under ``accelerate launch`` the
    samples are split over the processes; sample ``i`` is the same with any number of them
    (``distributed_sampling``), and the main process writes the output."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    pipe = load_pipeline(args.pipeline, args.scheduler)
    if args.num_samples is None:
        args.num_samples = 16 if pipe.is_image_model else 2000
    output = Path(args.output)
    if not pipe.is_image_model and output.suffix not in (".npy", ".npz", ".png"):
        raise SystemExit(f"--output {output}: a folder of PNGs needs an image model; write .npy, .npz or .png.")
    if output.suffix == ".png" and not pipe.is_image_model and pipe.sample_shape != (2,):
        raise SystemExit(f"a PNG needs images or 2-D points, this model samples shape {pipe.sample_shape}; "
                         "write an .npy file instead (--output samples.npy).")
    sigmas = None
    if args.calibrate:
        if not isinstance(pipe.scheduler, ProbabilityFlowODEScheduler):
            raise SystemExit(f"--calibrate fits the levels of a ProbabilityFlowODEScheduler; this pipeline's scheduler is "
                             f"{type(pipe.scheduler).__name__}: add --scheduler ProbabilityFlowODEScheduler.")
        # every process fits the same grid, on pilot draws of their own seed stream (the samples' is stream 4)
        pilot_generator = torch.Generator().manual_seed(seed_of(args.seed, PILOT_SEED_STREAM, 0))
        calibration = pipe.to(accelerator.device).calibrate_sigmas(args.num_inference_steps, generator=pilot_generator)
        sigmas = calibration.sigmas
        if accelerator.is_main_process:
            print(f"fitted {len(sigmas)} levels to the model: mean distance to its 200-level ODE solution "
                  f"{calibration.default_distance:.4g} -> {calibration.distance:.4g} ({calibration.grids_tried} grids)")
    samples = sample_across_processes(pipe, args.num_samples, args.num_inference_steps, args.seed, args.batch_size,
                                      accelerator, class_labels(pipe, args), sigmas)
    if not accelerator.is_main_process:
        return
    if output.suffix == ".npy":
        np.save(output, samples)
    elif output.suffix == ".npz":
        np.savez(output, **({"images": to_uint8(samples)} if pipe.is_image_model else {"samples": samples}))
    elif pipe.is_image_model and output.suffix == ".png":
        training.image_grid(pipe.numpy_to_pil(samples)).save(output)
    elif pipe.is_image_model:
        output.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(pipe.numpy_to_pil(samples)):
            image.save(output / f"{index:06d}.png")
    else:
        points = torch.from_numpy(samples)
        config = training_config_of(args.pipeline)
        normalization = config and config["data"]["normalization"]
        if normalization:
            # plot in data units: the model works on standardised points
            points = points * torch.tensor(normalization["std"]) + torch.tensor(normalization["mean"])
        title = f"{type(pipe.scheduler).__name__}, {args.num_inference_steps} steps"
        scatter_image([(points, title)], extent=training.TOY_PLOT_EXTENT).save(output)
    print(f"wrote {output} ({args.num_samples} samples, {type(pipe.scheduler).__name__}, "
          f"{len(pipe.scheduler.timesteps)} model evaluations, {accelerator.num_processes} process(es))")


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in [0, 1] to uint8, rounded as ``numpy_to_pil`` rounds them."""
    return (images * 255).round().astype(np.uint8)


def class_labels(pipe: ScoreSDEPipeline, args) -> Optional[torch.Tensor]:
    """``--class_label`` for every sample; for a class-conditional model without it, the null label."""
    if pipe.unet.config.get("num_class_embeds") is None:
        if args.class_label is not None:
            raise SystemExit("--class_label needs a class-conditional model.")
        return None
    label = pipe.null_class_label if args.class_label is None else args.class_label
    return torch.full((args.num_samples,), label)


# --- likelihood ----------------------------------------------------------------------------------------------


def likelihood_command(args) -> None:
    config = training_config_of(args.pipeline)
    if config is None:
        raise SystemExit(f"{args.pipeline} has no {training.RUN_CONFIG_NAME}: the likelihood command evaluates "
                         "pipelines trained by `scorekit train` on their own held-out data.")
    # the data exactly as the run prepared it (same normalisation, same held-out split)
    run = training.build_parser().parse_args([])
    vars(run).update(config["training"], fashion_mnist_dir=args.fashion_mnist_dir)
    data = training.load_data(run)
    pipe = load_pipeline(args.pipeline)
    start = time.perf_counter()
    if args.method == "ode":
        bits_per_dim = training.likelihood_metric(pipe, data, args.num_examples, args.seed, progress=True)
    else:
        bits_per_dim = bound_metric(pipe, data.held_out[: args.num_examples], normalization=data.normalization,
                                    seed=args.seed, num_time_samples=args.num_time_samples)
    print(f"bits/dim: {bits_per_dim} ({time.perf_counter() - start:.1f} s)")


# --- demo ----------------------------------------------------------------------------------------------------


def demo_command(args) -> None:
    if args.data == "fashion_mnist":
        return fashion_mnist_demo(args)
    # a 128-wide MLP gains nothing from several threads, and loses a lot when the cores are shared
    torch.set_num_threads(1)
    output_dir = Path(args.output_dir)
    steps = str(args.max_train_steps)
    common = ["--dataset", "two_moons", "--model", "scorekit_mlp", "--max_train_steps", steps,
              "--train_batch_size", "256", "--use_ema", "--ema_decay", "0.995", "--lr_warmup_steps", "50",
              "--checkpointing_steps", steps, "--num_eval_samples", str(args.num_samples),
              "--eval_likelihood_samples", "200", "--seed", str(args.seed)]
    # a VE model for the VE samplers, and a VP one for the VP Euler-Maruyama sampler
    models = {
        "ve": training.main(training.parse_args(common + [
            "--sde", "ve", "--sampler", "pc", "--num_inference_steps", "250", "--output_dir", str(output_dir)])),
        "vp": training.main(training.parse_args(common + [
            "--sde", "vp", "--sampler", "em", "--num_inference_steps", "500", "--output_dir", str(output_dir / "vp")])),
    }
    data = training.load_toy(training.parse_args(common + ["--output_dir", str(output_dir)]))
    panels = [(data.held_out, "held-out data")]
    print(f"{'sampler':<24} {'NFE':>5} {'coverage':>9} {'precision':>9} {'seconds':>8}")
    for title, scheduler_name, sde, num_inference_steps in DEMO_SAMPLERS:
        pipe = load_pipeline(models[sde], scheduler_name)
        if scheduler_name == "AnnealedLangevinScheduler":
            pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, num_annealed_steps=5)
        start = time.perf_counter()
        points = training.sample_pipeline(pipe, args.num_samples, num_inference_steps, args.seed, is_image=False)
        seconds = time.perf_counter() - start
        scores = training.knn_coverage(data.held_out, points)
        nfe = len(pipe.scheduler.timesteps)
        print(f"{title:<24} {nfe:>5} {scores['coverage']:>9.3f} {scores['precision']:>9.3f} {seconds:>8.1f}")
        panels.append((points, f"{title}, NFE {nfe}, cov {scores['coverage']:.2f}"))
    figure_path = output_dir / "demo_samplers.png"
    scatter_image(panels, extent=training.TOY_PLOT_EXTENT).save(figure_path)
    print(f"wrote {figure_path}; the VE pipeline and its model card are in {output_dir}, the VP one in "
          f"{output_dir / 'vp'}")


def fashion_mnist_demo(args) -> None:
    output_dir = Path(args.output_dir)
    training.main(training.parse_args([
        "--dataset", "fashion_mnist", "--model", "ncsn", "--block_out_channels", "32,64,64", "--sde", "ve",
        "--max_train_steps", str(args.max_train_steps), "--train_batch_size", "64", "--learning_rate", "1e-3",
        "--use_ema", "--ema_decay", "0.99", "--lr_warmup_steps", "50", "--sampler", "pc",
        "--num_inference_steps", "100", "--checkpointing_steps", str(args.max_train_steps),
        "--num_eval_samples", "25", "--seed", str(args.seed), "--output_dir", str(output_dir),
    ]))
    print(f"wrote {output_dir / training.SAMPLE_IMAGE_NAME}; the pipeline and its model card are in {output_dir}")


# --- entry point ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scorekit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("train", help="train a model (see `scorekit train --help`)", add_help=False)

    sample = commands.add_parser(
        "sample", help="sample a pipeline folder or Hub repo to a PNG, .npy, .npz or a folder of PNGs; under "
        "`accelerate launch`, over all its processes")
    sample.add_argument("pipeline", help="a folder written by save_pretrained, or a Hub repo id")
    sample.add_argument("--scheduler", choices=SCOREKIT_SCHEDULERS, help="replace the saved scheduler")
    sample.add_argument("--num_inference_steps", type=int, default=100)
    sample.add_argument("--calibrate", action="store_true",
                        help="fit the levels of the grid to the model first (calibrate_sigmas, on 64 pilot draws; "
                             "ProbabilityFlowODEScheduler only): the fewest-NFE choice, at a one-off cost")
    sample.add_argument("--num_samples", "--num_images", type=int, default=None,
                        help="default: 2000 points or 16 images")
    sample.add_argument("--batch_size", type=int, default=64, help="samples per model call (per process)")
    sample.add_argument("--class_label", type=int, default=None, help="for a class-conditional model")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--output", default="samples.png",
                        help=".png (grid or scatter plot), .npy (floats), .npz (uint8 images or float points) or a "
                             "folder (one PNG per image, 000000.png on)")

    demo = commands.add_parser("demo", help="train a small model on the CPU and compare the samplers")
    demo.add_argument("--data", choices=("two_moons", "fashion_mnist"), default="two_moons")
    demo.add_argument("--output_dir", default="outputs/scorekit-demo")
    demo.add_argument("--max_train_steps", type=int, default=None, help="default: 2000 (moons), 400 (images)")
    demo.add_argument("--num_samples", type=int, default=2000, help="points per sampler")
    demo.add_argument("--seed", type=int, default=0)

    likelihood = commands.add_parser("likelihood", help="bits/dim of held-out data: probability-flow ODE or variational bound")
    likelihood.add_argument("pipeline", help="a folder written by `scorekit train`")
    likelihood.add_argument("--num_examples", type=int, default=200)
    likelihood.add_argument("--fashion_mnist_dir", default=training.FASHION_MNIST_DIR)
    likelihood.add_argument("--seed", type=int, default=0)
    likelihood.add_argument("--method", choices=("ode", "elbo"), default="ode",
                            help="ode: exact likelihood by the probability-flow ODE; elbo: the variational bound "
                                 "(DDPM's on a DDPM schedule, else the continuous-time one)")
    likelihood.add_argument("--num_time_samples", type=int, default=None,
                            help="elbo: timesteps per example (DDPM default: all; continuous default: 64)")
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    # `train` hands everything after it to the training script's own parser (and its --help)
    if argv[:1] == ["train"]:
        training.command_line(argv[1:])
        return
    args = build_parser().parse_args(argv)
    if args.command == "sample":
        sample_command(args)
    elif args.command == "demo":
        if args.max_train_steps is None:
            args.max_train_steps = 2000 if args.data == "two_moons" else 400
        demo_command(args)
    elif args.command == "likelihood":
        likelihood_command(args)


if __name__ == "__main__":
    main()
