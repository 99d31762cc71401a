"""Our samplers against diffusers' on a real network trained on real data (GitHub issue #14, point 2).

No oracle knows scikit-learn's 8x8 digits (1,797 images, 64-D). The benchmark

1. splits them (seeded) into 1,500 training and 297 held-out images and writes the training images as PNGs;
2. trains a VP-SDE epsilon model on them with our training script (``scorekit train`` as a subprocess), on the CPU
   within a wall-clock budget, or reuses the pipeline folder of an earlier run (``--model_dir``);
3. trains a small MLP classifier on the same 1,500 images (seconds, one thread) and reports its held-out accuracy;
   its penultimate features are the space of the Fréchet distance (``diffusers_scorekit.metrics``);
4. draws ``--num_samples`` images with every sampler at NFE 5, 10 and 20 from the same model and the same initial
   noise (model calls counted by a wrapper) and scores them against two 1000-step references of that model
   (diffusers' DDPM ancestral sampler, and our probability-flow ODE) and against the held-out digits.

The model is our ``NCSNScoreModel`` (8 -> 4 px, 2 levels): the training script's ``unet2d`` has layouts for 28, 32 and
64 px only. It is trained on our continuous VP SDE (beta 0.1 .. 20) with discrete timesteps ``t (N - 1)``; diffusers'
schedulers get that schedule as ``trained_betas`` whose ``alphas_cumprod[i]`` is the SDE's ``alpha_bar(i / (N - 1))``
(index 0, where ``alpha_bar = 1``, clamped to the training's smallest time), so both libraries drive the network with
the noise levels it was trained on.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_real_data.py --model_dir outputs/digits-vp \\
        [--num_samples 1000] [--out benchmarks/results/real_data.json]

The first run trains into ``--model_dir`` (``--max_train_steps``, ``--time_budget_minutes``) and records the
training's wall time there; later runs with the same folder only sample.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image
from torch import nn

from bench_oracle_samplers import Sampler, best, format_value, pivot_table, plain_loop, steps_for_nfe
from common import run_header, write_results
from diffusers_scorekit import (
    PredictorCorrectorScheduler,
    ProbabilityFlowODEScheduler,
    ScoreSDEPipeline,
    VPEulerMaruyamaScheduler,
)
from diffusers_scorekit.metrics import frechet_distance, frechet_distance_from_statistics, gaussian_statistics
from diffusers_scorekit.sde import default_sampling_eps

REPO_ROOT = Path(__file__).resolve().parent.parent
NFE_TARGETS = (5, 10, 20)
REFERENCE_STEPS = 1000
NUM_HELD_OUT = 297
SPLIT_SEED = 0
DIGIT_LEVELS = 16  # load_digits' pixel values run 0..16
TRAINING_RECORD = "benchmark_training.json"
# the network and recipe; --max_train_steps / --time_budget_minutes / --output_dir are added per run
TRAINING_OPTIONS = (
    "--resolution", "8", "--model", "ncsn", "--block_out_channels", "32,64", "--sde", "vp",
    "--prediction_type", "epsilon", "--timestep_type", "discrete", "--train_batch_size", "128",
    "--learning_rate", "1e-3", "--lr_warmup_steps", "200", "--use_ema", "--ema_decay", "0.999",
    "--sampler", "ode", "--num_threads", "1", "--report_to", "none", "--logging_steps", "100", "--seed", "0",
)
CLASSIFIER_HIDDEN, CLASSIFIER_FEATURES, CLASSIFIER_EPOCHS = 256, 32, 60


# --- data ----------------------------------------------------------------------------------------------------


def digits_split(num_held_out: int = NUM_HELD_OUT, seed: int = SPLIT_SEED):
    """scikit-learn's digits as uint8 images ``(n, 1, 8, 8)`` (0..16 scaled to 0..255) and labels, split by a
    seeded permutation into (train images, train labels, held-out images, held-out labels)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(np.rint(digits.images * 255 / DIGIT_LEVELS).astype(np.uint8))[:, None]
    labels = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    train, held_out = order[num_held_out:], order[:num_held_out]
    return images[train], labels[train], images[held_out], labels[held_out]


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to [-1, 1], as the training script reads them."""
    return images.float() / 127.5 - 1.0


def write_image_folder(images: torch.Tensor, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image[0].numpy()).save(folder / f"{index:04d}.png")


# --- training ------------------------------------------------------------------------------------------------


def training_command(image_folder: Path, model_dir: Path, max_train_steps: int, time_budget_minutes: float) -> list:
    """``scorekit train``'s command line for the benchmark's model (one checkpoint, at the end)."""
    return [
        sys.executable, "-m", "diffusers_scorekit.cli", "train", "--train_data_dir", str(image_folder),
        *TRAINING_OPTIONS, "--max_train_steps", str(max_train_steps), "--checkpointing_steps", str(max_train_steps),
        "--time_budget_minutes", str(time_budget_minutes), "--output_dir", str(model_dir),
    ]


def train_model(train_images: torch.Tensor, model_dir: Path, max_train_steps: int,
                time_budget_minutes: float) -> dict:
    """Train with ``scorekit train`` into ``model_dir`` (a subprocess) and record its wall time there."""
    with tempfile.TemporaryDirectory() as scratch:
        image_folder = Path(scratch) / "digits"
        write_image_folder(train_images, image_folder)
        command = training_command(image_folder, model_dir, max_train_steps, time_budget_minutes)
        python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        load_before = os.getloadavg()
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": python_path})
        wall_time = time.perf_counter() - start
    result = json.loads((model_dir / "scorekit_training_config.json").read_text())["result"]
    record = {
        "command": " ".join(["scorekit train --train_data_dir <the 1500 training digits as PNGs>", *command[6:]]),
        "wall_time_s": wall_time,
        "steps": result["steps"],
        "stopped_by": result["stopped_by"],
        "training_minutes": result["training_minutes"],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    (model_dir / TRAINING_RECORD).write_text(json.dumps(record, indent=1))
    return record


# --- the feature classifier ----------------------------------------------------------------------------------


class DigitClassifier(nn.Module):
    """An MLP on the 64 pixels in [-1, 1]; ``features`` is its penultimate layer (after ReLU)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, CLASSIFIER_HIDDEN), nn.ReLU(),
                                  nn.Linear(CLASSIFIER_HIDDEN, CLASSIFIER_FEATURES), nn.ReLU())
        self.head = nn.Linear(CLASSIFIER_FEATURES, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = CLASSIFIER_EPOCHS,
                     seed: int = 0) -> DigitClassifier:
    """Adam on mini-batches of 64 images in [-1, 1], seeded; returned in eval mode."""
    torch.manual_seed(seed)
    classifier = DigitClassifier()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=generator).split(64):
            loss = nn.functional.cross_entropy(classifier(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return classifier.eval()


def accuracy(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (classifier(images).argmax(1) == labels).double().mean().item()


def features_of(classifier: DigitClassifier, images: torch.Tensor) -> torch.Tensor:
    """Features of images in model space, clamped to [-1, 1] first as an image output would be."""
    with torch.no_grad():
        return classifier.features(images.clamp(-1, 1))


# --- samplers ------------------------------------------------------------------------------------------------


def diffusers_config(scorekit_config) -> dict:
    """A DDPM-family config whose ``alphas_cumprod[i]`` is the model's SDE at the timestep it was trained with,
    ``alpha_bar(i / (N - 1))``; at ``i = 0``, where ``alpha_bar = 1`` and DDPM's betas would hold a 0, the SDE at
    the smallest training time. "linspace" spacing runs from timestep N - 1 to 0 as our grids do; no clipping of
    the predicted x_0 (our samplers have none)."""
    sde = ProbabilityFlowODEScheduler.from_config(scorekit_config).sde
    num_train_timesteps = scorekit_config["num_train_timesteps"]
    times = torch.arange(num_train_timesteps, dtype=torch.float64) / (num_train_timesteps - 1)
    times[0] = scorekit_config["sampling_eps"] or default_sampling_eps(sde)
    alphas_cumprod = sde.log_alpha_bar(times).exp()
    betas = 1 - alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return {"num_train_timesteps": num_train_timesteps, "trained_betas": betas.tolist(),
            "prediction_type": "epsilon", "timestep_spacing": "linspace", "clip_sample": False}


def samplers(scorekit_config, ddpm_config):
    """Ours on the model's own (continuous VP) scheduler config, diffusers' on its DDPM-family counterpart."""

    def ours(cls, **kwargs):
        return lambda: cls.from_config(scorekit_config, **kwargs)

    def theirs(cls, **kwargs):
        return lambda: cls.from_config(ddpm_config, **kwargs)

    return [
        Sampler("ode_dpm_solver_2m_log_snr (default)", "scorekit", ours(ProbabilityFlowODEScheduler, solver="dpm_solver_2m", time_spacing="log_snr")),
        Sampler("ode_dpm_solver_2m_edm", "scorekit", ours(ProbabilityFlowODEScheduler, solver="dpm_solver_2m", time_spacing="edm")),
        Sampler("ode_dpm_solver_2m_uniform", "scorekit", ours(ProbabilityFlowODEScheduler, solver="dpm_solver_2m", time_spacing="uniform")),
        Sampler("ode_heun_edm", "scorekit", ours(ProbabilityFlowODEScheduler, solver="heun", time_spacing="edm")),
        Sampler("ode_euler_uniform", "scorekit", ours(ProbabilityFlowODEScheduler, solver="euler", time_spacing="uniform")),
        Sampler("vp_euler_maruyama", "scorekit", ours(VPEulerMaruyamaScheduler)),
        Sampler("pc_ancestral", "scorekit", ours(PredictorCorrectorScheduler, predictor="ancestral", corrector="none")),
        Sampler("dpmsolver++_2m", "diffusers", theirs(DPMSolverMultistepScheduler)),
        Sampler("dpmsolver++_2m_lu", "diffusers", theirs(DPMSolverMultistepScheduler, use_lu_lambdas=True)),
        Sampler("dpmsolver++_2m_karras", "diffusers", theirs(DPMSolverMultistepScheduler, use_karras_sigmas=True)),
        Sampler("unipc_bh2_order2", "diffusers", theirs(UniPCMultistepScheduler)),
        Sampler("deis_order2", "diffusers", theirs(DEISMultistepScheduler)),
        # DDIM steps to t - N // n, which only "trailing" spacing makes the next grid point
        Sampler("ddim_trailing", "diffusers", theirs(DDIMScheduler, timestep_spacing="trailing")),
        Sampler("euler", "diffusers", theirs(EulerDiscreteScheduler)),
        Sampler("ddpm", "diffusers", theirs(DDPMScheduler)),
    ]


def reference_samplers(scorekit_config, ddpm_config):
    return [
        Sampler("ddpm_reference", "diffusers", lambda: DDPMScheduler.from_config(ddpm_config)),
        Sampler("ode_reference", "scorekit", lambda: ProbabilityFlowODEScheduler.from_config(
            scorekit_config, solver="dpm_solver_2m", time_spacing="log_snr")),
    ]


def counting_model(unet):
    """``model(x, t)`` returning the network's output tensor, and the list its calls are appended to."""
    calls = []

    def model(x, timestep):
        calls.append(len(x))
        return unet(x, timestep).sample

    return model, calls


def draw(sampler: Sampler, unet, num_inference_steps: int, num_samples: int, batch_size: int, seed: int):
    """``num_samples`` images from ``sampler`` in batches whose initial noise is seeded by their first index (the
    same noise for every sampler), the model calls per image, and the wall time."""
    model, calls = counting_model(unet)
    batches = []
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, num_samples, batch_size):
            shape = (min(batch_size, num_samples - first), *unet_sample_shape(unet))
            batches.append(plain_loop(sampler.make(), model, shape, num_inference_steps, torch.Generator().manual_seed(seed + first)))
    wall_time = time.perf_counter() - start
    num_batches = len(batches)
    if len(calls) % num_batches or sum(calls) != len(calls) // num_batches * num_samples:
        raise RuntimeError(f"{sampler.name}: {len(calls)} model calls do not split evenly over {num_batches} batches.")
    return torch.cat(batches), len(calls) // num_batches, wall_time


def unet_sample_shape(unet):
    size = unet.config.sample_size
    return (unet.config.in_channels, size, size)


# --- scores --------------------------------------------------------------------------------------------------


class FeatureSpace:
    """The classifier's features and the Gaussian statistics of the sets every sample set is compared with."""

    def __init__(self, classifier: DigitClassifier, references: dict):
        self.classifier = classifier
        self.statistics = {name: gaussian_statistics(features_of(classifier, images)) for name, images in references.items()}

    def distances(self, samples: torch.Tensor) -> dict:
        """Fréchet distance of ``samples`` to each reference set (inf for non-finite samples)."""
        if not torch.isfinite(samples).all():
            return {f"fd_{name}": math.inf for name in self.statistics}
        statistics = gaussian_statistics(features_of(self.classifier, samples))
        return {f"fd_{name}": frechet_distance_from_statistics(*statistics, *reference) for name, reference in self.statistics.items()}


# --- the run -------------------------------------------------------------------------------------------------


def score(sampler: Sampler, unet, target: int, num_inference_steps: int, space: FeatureSpace, args) -> tuple:
    samples, nfe, wall_time = draw(sampler, unet, num_inference_steps, args.num_samples, args.batch_size, args.seed)
    row = {
        "sampler": sampler.name,
        "library": sampler.library,
        "nfe_target": target,
        "num_inference_steps": num_inference_steps,
        "nfe": nfe,
        "num_samples": len(samples),
        **space.distances(samples),
        "nan": not bool(torch.isfinite(samples).all()),
        "wall_time_s": wall_time,
    }
    return samples, row


def summary(rows, targets) -> str:
    lines = []
    for metric in ("fd_ode_reference", "fd_ddpm_reference", "fd_held_out"):
        verdicts = []
        for target in targets:
            at_target = [r for r in rows if r["nfe_target"] == target]
            ours, ours_name = best(at_target, "scorekit", metric)
            theirs, theirs_name = best(at_target, "diffusers", metric)
            verdicts.append(f"NFE {target}: {'<=' if ours <= theirs else '>'} ({format_value(ours)} {ours_name} vs "
                            f"{format_value(theirs)} {theirs_name})")
        lines.append(f"- {metric}, best scorekit vs best diffusers: " + "; ".join(verdicts))
    nan_runs = [f"{r['sampler']}@{r['nfe']}" for r in rows if r["nan"]]
    lines.append(f"- runs with NaN/inf samples: {', '.join(nan_runs) or 'none'}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default="outputs/digits-vp",
                        help="pipeline folder: trained here by scorekit train unless it holds a finished run")
    parser.add_argument("--max_train_steps", type=int, default=5000)
    parser.add_argument("--time_budget_minutes", type=float, default=19.0,
                        help="of the training loop; the whole training command stays within 20 minutes")
    parser.add_argument("--nfe", type=int, nargs="+", default=list(NFE_TARGETS))
    parser.add_argument("--reference_steps", type=int, default=REFERENCE_STEPS)
    parser.add_argument("--num_samples", type=int, default=1000,
                        help="per sampler, references included (a 1000-image model call takes about 1 s on the "
                             "shared 2-core CPU: the two 1000-step references are most of the run)")
    parser.add_argument("--batch_size", type=int, default=1000)
    parser.add_argument("--classifier_epochs", type=int, default=CLASSIFIER_EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/real_data.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # faster here than two threads on a shared 2-core machine

    train_images, train_labels, held_out_images, held_out_labels = digits_split()
    model_dir = Path(args.model_dir)
    if (model_dir / TRAINING_RECORD).is_file():
        training = json.loads((model_dir / TRAINING_RECORD).read_text())
        print(f"reusing the model in {model_dir} (trained {training['steps']} steps in {training['wall_time_s']:.0f} s)")
    else:
        training = train_model(train_images, model_dir, args.max_train_steps, args.time_budget_minutes)
    pipe = ScoreSDEPipeline.from_pretrained(model_dir)
    unet = pipe.unet.eval()
    scorekit_config = dict(pipe.scheduler.config)
    ddpm_config = diffusers_config(scorekit_config)

    start = time.perf_counter()
    classifier = train_classifier(to_model_space(train_images), train_labels, args.classifier_epochs, args.seed)
    classifier_seconds = time.perf_counter() - start
    held_out_accuracy = accuracy(classifier, to_model_space(held_out_images), held_out_labels)
    print(f"classifier: held-out accuracy {held_out_accuracy:.4f} ({len(held_out_images)} images), trained in {classifier_seconds:.1f} s")

    real = {"held_out": to_model_space(held_out_images), "train": to_model_space(train_images)}
    references = {}
    for sampler in reference_samplers(scorekit_config, ddpm_config):
        samples, nfe, wall_time = draw(sampler, unet, args.reference_steps, args.num_samples, args.batch_size, args.seed)
        references[sampler.name] = {"samples": samples, "nfe": nfe, "wall_time_s": wall_time}
        print(f"reference {sampler.name}: NFE {nfe}, {wall_time:.1f} s", flush=True)
    space = FeatureSpace(classifier, {**{name: r["samples"] for name, r in references.items()}, **real})
    reference_rows = {name: {"nfe": r["nfe"], "wall_time_s": r["wall_time_s"], **space.distances(r["samples"])}
                      for name, r in references.items()}
    half = args.num_samples // 2
    floors = {
        "train_vs_held_out": frechet_distance(features_of(classifier, real["train"]), features_of(classifier, real["held_out"])),
        **{f"{name}_half_vs_half": frechet_distance(features_of(classifier, r["samples"][:half]), features_of(classifier, r["samples"][half:]))
           for name, r in references.items()},
    }

    runs = []
    sampler_list = samplers(scorekit_config, ddpm_config)
    for sampler in sampler_list:
        for target in args.nfe:
            _, row = score(sampler, unet, target, steps_for_nfe(sampler, target), space, args)
            runs.append(row)
            print(f"{sampler.name} NFE {row['nfe']}: FD to ODE ref {format_value(row['fd_ode_reference'])}, "
                  f"to DDPM ref {format_value(row['fd_ddpm_reference'])}, to held-out {format_value(row['fd_held_out'])} "
                  f"({row['wall_time_s']:.1f} s)", flush=True)

    print(f"\n## Real data: sklearn digits, {args.num_samples} samples per sampler\n")
    print(f"training: {training['steps']} steps, {training['wall_time_s'] / 60:.1f} min wall ({training['stopped_by']}); "
          f"classifier held-out accuracy {held_out_accuracy:.4f}\n")
    print("references (Fréchet distance in the classifier's features):\n")
    print("| reference | NFE | FD to DDPM reference | FD to ODE reference | FD to held-out | FD to train |\n"
          "|---|---:|---:|---:|---:|---:|")
    for name, r in reference_rows.items():
        print(f"| {name} | {r['nfe']} | {format_value(r['fd_ddpm_reference'])} | {format_value(r['fd_ode_reference'])} | "
              f"{format_value(r['fd_held_out'])} | {format_value(r['fd_train'])} |")
    print("\nfloors: " + ", ".join(f"{name} {format_value(value)}" for name, value in floors.items()))
    for metric, title in (("fd_ode_reference", f"FD to the ODE reference (our DPM-Solver++ 2M, {args.reference_steps} steps)"),
                          ("fd_ddpm_reference", f"FD to the DDPM reference (diffusers' DDPM, {args.reference_steps} steps)"),
                          ("fd_held_out", f"FD to the {len(held_out_images)} held-out digits")):
        print(f"\n{title}:\n\n{pivot_table(runs, metric, args.nfe, sampler_list)}")
    print(f"\n## Summary\n\n{summary(runs, args.nfe)}")

    results = {
        **run_header(torch.device("cpu")),
        "load_average": os.getloadavg(),
        "training": training,
        "model": {"class": type(unet).__name__, "parameters": sum(p.numel() for p in unet.parameters()),
                  "config": dict(unet.config)},
        "scheduler_config": scorekit_config,
        "diffusers_schedule": {k: v for k, v in ddpm_config.items() if k != "trained_betas"},
        "classifier": {"held_out_accuracy": held_out_accuracy, "num_held_out": len(held_out_images),
                       "num_train": len(train_images), "feature_dim": CLASSIFIER_FEATURES,
                       "epochs": args.classifier_epochs, "training_seconds": classifier_seconds},
        "num_samples": args.num_samples,
        "nfe_targets": list(args.nfe),
        "references": reference_rows,
        "floors": floors,
        "runs": runs,
    }
    write_results(args.out, results)
    return results


if __name__ == "__main__":
    main()
