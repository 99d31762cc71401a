"""Fashion-MNIST sample quality vs NFE for every sampler, and test-set bits/dim (issue #6).

Scores a scorekit pipeline folder (trained by ``training/train_score_sde.py``) and, optionally, a diffusers
``DDPMPipeline`` folder (trained by ``benchmarks/train_ddpm_baseline.py``) with the shipped Fashion-MNIST
classifier's features (``diffusers_scorekit.metrics``: Fréchet distance, improved precision / recall against the
10,000 test images; this is *not* the Inception FID, see the README). Samplers:

- scorekit model: PC (Euler-Maruyama predictor + Langevin corrector), Euler-Maruyama, probability-flow ODE Heun
  (EDM spacing) and DPM-Solver++ 2M (log-SNR spacing) at each ``--nfe``, and the adaptive ODE (dopri5) at each
  ``--adaptive_tolerance``, whose NFE is what the solver took;
- DDPM model: diffusers' DDPM (``--ddpm_reference_steps``, its 1000 training steps, and each ``--nfe``), DDIM and DPM-Solver multistep at each ``--nfe``,
  and scorekit's DPM-Solver++ 2M on the same model (the drop-in swap).

Also the test-set bits/dim of the scorekit model (8-bit, by the probability-flow ODE, ``--bpd_examples`` images,
at the training resolution: padded 32 x 32 images are scored with their padding) and the same features scores of
training images (the floor a perfect model would reach with this many samples). Writes JSON, a markdown table
and a grid of the best sampler at NFE <= 50.

    PYTHONPATH=. python benchmarks/eval_fashion_mnist.py --scorekit_pipeline outputs/fmnist-scorekit \\
        --ddpm_pipeline outputs/fmnist-ddpm --nfe 10 20 50 100 --num_samples 10000 --device cuda [--fashion_mnist_dir ...]

Under ``accelerate launch`` (e.g. ``--multi_gpu --num_processes 8``) the images of every sampler are split over the
processes, each image the one a single process would draw (batches seeded by their first index), and the main
process scores them; the test-set bits/dim runs on the main process at the end.
"""

import argparse
import json
import math
import os
import time

from typing import Optional

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils import make_image_grid

from common import levels_for_nfe, run_header
from diffusers_scorekit import (
    PredictorCorrectorScheduler,
    ProbabilityFlowODEScheduler,
    ScoreSDEPipeline,
)
from diffusers_scorekit.distributed_sampling import draw_across_processes
from diffusers_scorekit.metrics import FASHION_MNIST_DIR, fashion_mnist_score, read_fashion_mnist

def scorekit_samplers(config):
    """The samplers of a scorekit model, built from its scheduler config."""
    return {
        "scorekit PC (EM + Langevin)": PredictorCorrectorScheduler.from_config(
            config, predictor="euler_maruyama", corrector="langevin", time_spacing="uniform"),
        "scorekit Euler-Maruyama": PredictorCorrectorScheduler.from_config(
            config, predictor="euler_maruyama", corrector="none", time_spacing="uniform"),
        "scorekit ODE Heun": ProbabilityFlowODEScheduler.from_config(config, solver="heun", time_spacing="edm"),
        "scorekit ODE DPM-Solver++ 2M": ProbabilityFlowODEScheduler.from_config(
            config, solver="dpm_solver_2m", time_spacing="log_snr"),
    }


def ddpm_samplers(config):
    return {
        "diffusers DDPM": DDPMScheduler.from_config(config),
        "diffusers DDIM": DDIMScheduler.from_config(config),
        "diffusers DPM-Solver multistep": DPMSolverMultistepScheduler.from_config(config),
        "scorekit ODE DPM-Solver++ 2M on the DDPM model": ProbabilityFlowODEScheduler.from_config(config),
    }


def draw(pipe, num_samples: int, batch_size: int, seed: int, accelerator, **kwargs) -> Optional[torch.Tensor]:
    """``num_samples`` images in [-1, 1], ``(n, 1, h, w)``, in batches seeded per batch and split over the
    processes (``draw_across_processes``: the same images with any number of them); ``None`` off the main one."""

    def make_batch(indices: range) -> torch.Tensor:
        generator = torch.Generator(pipe.device).manual_seed(seed + indices.start)
        output = pipe(batch_size=len(indices), generator=generator, **kwargs)
        batch = output.images if hasattr(output, "images") else output.samples
        batch = torch.as_tensor(np.asarray(batch)) if not torch.is_tensor(batch) else batch
        if batch.shape[-1] in (1, 3) and batch.shape[1] not in (1, 3):  # NHWC numpy from DDPMPipeline
            batch = batch.permute(0, 3, 1, 2)
        return batch.float().cpu() * 2 - 1

    return draw_across_processes(make_batch, num_samples, batch_size, accelerator)


def adaptive_draw(pipe, num_samples: int, batch_size: int, seed: int, tolerance: float, accelerator):
    """Images as ``draw`` makes them, by the adaptive ODE, and its mean NFE per batch (``None, None`` off the main
    process)."""
    nfes = {}

    def make_batch(indices: range) -> torch.Tensor:
        generator = torch.Generator(pipe.device).manual_seed(seed + indices.start)
        output = pipe.sample_adaptive(len(indices), rtol=tolerance, atol=tolerance, generator=generator,
                                      output_type="pt")
        nfes[indices.start] = output.nfe
        return output.samples.float().cpu() * 2 - 1

    images = draw_across_processes(make_batch, num_samples, batch_size, accelerator)
    # each batch's NFE, gathered like the images (one row per image, read at each batch's first row)
    nfe_rows = draw_across_processes(lambda indices: torch.full((len(indices),), float(nfes[indices.start])),
                                     num_samples, batch_size, accelerator)
    if images is None:
        return None, None
    return images, float(nfe_rows[::batch_size].mean())


def test_bits_per_dim(pipe, num_examples: int, batch_size: int, seed: int, directory: str,
                      tolerance: float = 1e-5) -> float:
    images, _ = read_fashion_mnist("test", directory)
    images = images[:num_examples]
    pad = (pipe.sample_shape[-1] - images.shape[-1]) // 2
    if pad:  # the training script pads with the background value 0
        images = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    bits = []
    for index, batch in enumerate(images.split(batch_size)):
        generator = torch.Generator(pipe.device).manual_seed(seed + index)
        bits.append(pipe.log_likelihood(batch, rtol=tolerance, atol=tolerance, generator=generator).bits_per_dim.cpu())
    return torch.cat(bits).mean().item()


def main(argv=None, on_row=None):
    """Runs the evaluation of ``argv`` (the command line's options); ``on_row(row)`` is told each scored row as it
    comes. Returns the results as written to ``results.json``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scorekit_pipeline", required=True, help="folder saved by training/train_score_sde.py")
    parser.add_argument("--ddpm_pipeline", help="DDPMPipeline folder saved by benchmarks/train_ddpm_baseline.py")
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--ddpm_reference_steps", type=int, default=1000,
                        help="the DDPM sampler's own number of steps, the issue's reference point")
    parser.add_argument("--adaptive_tolerance", type=float, nargs="*", default=[1e-3, 1e-5])
    parser.add_argument("--num_samples", type=int, default=10_000, help="per sampler; 10,000 = the test set's size")
    parser.add_argument("--ddpm_reference_samples", type=int, default=None,
                        help="samples for the --ddpm_reference_steps row (default: --num_samples)")
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--bpd_examples", type=int, default=10_000, help="test images for bits/dim; 0 skips it")
    parser.add_argument("--bpd_tolerance", type=float, default=1e-5, help="rtol = atol of the likelihood's ODE solve")
    parser.add_argument("--fashion_mnist_dir", default=FASHION_MNIST_DIR, help="folder of the four .gz files")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time_budget_seconds", type=float, default=None,
                        help="start no new sampler row after this many seconds; the results list those left out")
    parser.add_argument("--output_dir", default="benchmarks/results/fashion_mnist")
    args = parser.parse_args(argv)
    deadline = None if args.time_budget_seconds is None else time.monotonic() + args.time_budget_seconds

    # under `accelerate launch` the images are split over its processes and scored by the main one
    accelerator = Accelerator(cpu=args.device == "cpu")
    device = accelerator.device if accelerator.num_processes > 1 else torch.device(args.device)
    if accelerator.num_processes > 1 and args.time_budget_seconds is not None:
        # each process would read its own clock and could skip a row the others gather
        parser.error("--time_budget_seconds works in one process only, not under a multi-process launch")
    os.makedirs(args.output_dir, exist_ok=True)
    rows, grids, left_out = [], {}, []

    def out_of_time(model, sampler, nfe):
        """True (and the row noted as left out) once the time budget is spent."""
        if deadline is not None and time.monotonic() > deadline:
            left_out.append(f"{model} | {sampler} | NFE {nfe}")
            return True
        return False

    def score(model, sampler, nfe, images, seconds):
        if not accelerator.is_main_process:
            return
        result = fashion_mnist_score(images, directory=args.fashion_mnist_dir, device=args.device)
        rows.append({"model": model, "sampler": sampler, "nfe": nfe, "seconds": seconds, **result})
        grids[(model, sampler, nfe)] = images[:64]
        if on_row is not None:
            on_row(rows[-1])
        print(f"{model:8s} | {sampler:48s} | NFE {nfe:7.1f} | FD {result['frechet_distance']:9.3f} | "
              f"precision {result['precision']:.3f} | recall {result['recall']:.3f} | {seconds:.0f} s", flush=True)

    def timed_draw(fn):
        start = time.perf_counter()
        images = fn()
        return images, time.perf_counter() - start

    # the floor: real training images scored like generated ones
    train_images, _ = read_fashion_mnist("train", args.fashion_mnist_dir)
    floor = train_images[torch.randperm(len(train_images), generator=torch.Generator().manual_seed(args.seed))]
    score("data", "training images", 0, floor[: args.num_samples].float() / 127.5 - 1, 0.0)

    pipe = ScoreSDEPipeline.from_pretrained(args.scorekit_pipeline).to(device)
    pipe.set_progress_bar_config(disable=True)
    for name, scheduler in scorekit_samplers(pipe.scheduler.config).items():
        pipe.scheduler = scheduler
        for nfe in args.nfe:
            if out_of_time("scorekit", name, nfe):
                continue
            steps = levels_for_nfe(scheduler, nfe)
            scheduler.set_timesteps(steps)
            images, seconds = timed_draw(lambda: draw(pipe, args.num_samples, args.batch_size, args.seed, accelerator,
                                                      num_inference_steps=steps, output_type="pt"))
            score("scorekit", name, len(scheduler.timesteps), images, seconds)
    for tolerance in args.adaptive_tolerance:
        if out_of_time("scorekit", "scorekit adaptive ODE (dopri5)", f"tol {tolerance:g}"):
            continue
        (images, nfe), seconds = timed_draw(lambda: adaptive_draw(pipe, args.num_samples, args.batch_size, args.seed, tolerance,
                                                                   accelerator))
        score("scorekit", f"scorekit adaptive ODE (dopri5, tol {tolerance:g})", nfe, images, seconds)

    if args.ddpm_pipeline:
        ddpm = DDPMPipeline.from_pretrained(args.ddpm_pipeline).to(device)
        ddpm.set_progress_bar_config(disable=True)
        config = ddpm.scheduler.config
        for name, scheduler in ddpm_samplers(config).items():
            budgets = args.nfe + ([args.ddpm_reference_steps] if name == "diffusers DDPM" else [])
            for nfe in budgets:
                if out_of_time("ddpm", name, nfe):
                    continue
                num_samples = args.num_samples
                if nfe == args.ddpm_reference_steps and name == "diffusers DDPM":
                    num_samples = args.ddpm_reference_samples or args.num_samples
                if isinstance(scheduler, ProbabilityFlowODEScheduler):
                    # the scorekit scheduler in diffusers' own pipeline: DDPMPipeline calls step(output, t, x)
                    ddpm.scheduler = scheduler
                    steps = levels_for_nfe(scheduler, nfe)
                else:
                    ddpm.scheduler, steps = scheduler, nfe
                images, seconds = timed_draw(lambda: draw(ddpm, num_samples, args.batch_size, args.seed, accelerator,
                                                          num_inference_steps=steps, output_type="np"))
                ddpm.scheduler.set_timesteps(steps)
                score("ddpm", name, len(ddpm.scheduler.timesteps), images, seconds)

    if not accelerator.is_main_process:
        return None
    # on the main process only, once the others are done
    # last: the test-set likelihood, the slowest figure per image
    bits_per_dim = None
    if args.bpd_examples > 0 and not out_of_time("scorekit", "test-set bits/dim", "adaptive"):
        bits_per_dim = test_bits_per_dim(pipe, args.bpd_examples, args.batch_size, args.seed, args.fashion_mnist_dir,
                                         args.bpd_tolerance)
        print(f"scorekit test-set bits/dim ({args.bpd_examples} images, {pipe.sample_shape[-1]} px): {bits_per_dim:.3f}")

    best, grid_path = None, None
    candidates = [row for row in rows if row["model"] == "scorekit" and row["nfe"] <= 50]
    if candidates:
        best = min(candidates, key=lambda row: row["frechet_distance"])
        grid_images = grids[(best["model"], best["sampler"], best["nfe"])]
        side = math.isqrt(len(grid_images))  # 8 x 8 with the default sample counts
        pil_images = ScoreSDEPipeline.numpy_to_pil(((grid_images[: side * side] + 1) / 2).permute(0, 2, 3, 1).numpy())
        grid_path = os.path.join(args.output_dir, "best_sampler_grid.png")
        make_image_grid(pil_images, rows=side, cols=side).save(grid_path)
    if left_out:
        print(f"time budget of {args.time_budget_seconds:g} s spent; left out: {'; '.join(left_out)}")

    results = {**run_header(device), "num_samples": args.num_samples, "bits_per_dim": bits_per_dim,
               "bpd_examples": args.bpd_examples, "best_at_nfe_50": best, "grid": grid_path, "rows": rows,
               "left_out_by_time_budget": left_out}
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = ["| model | sampler | NFE | Fréchet distance | precision | recall | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {row['model']} | {row['sampler']} | {row['nfe']:.0f} | {row['frechet_distance']:.3f} | "
              f"{row['precision']:.3f} | {row['recall']:.3f} | {row['seconds']:.0f} |" for row in rows]
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if best is not None:
        print(f"best scorekit sampler at NFE <= 50: {best['sampler']} (NFE {best['nfe']:.0f}), grid: {grid_path}")
    return results


if __name__ == "__main__":
    main()
