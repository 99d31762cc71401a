"""Sampling the trained pipeline for previews and the model card: sample images and scatter plots, and the
card's metrics (k-NN coverage and precision, the Gaussian mixture's mode report, bits/dim by the
probability-flow ODE)."""

import contextlib
import math
from pathlib import Path
from typing import Dict, List, Optional

import torch
from PIL import Image

from ..demo import scatter_image
from ..likelihood import dequantize_and_scale, log_likelihood
from ..metrics import NEIGHBOURHOOD_SIZE, knn_coverage
from ..mixture import GaussianMixture
from ..variational_bound import bound_metric
from ..pipelines import ScoreSDEPipeline
from .data import TrainingData
from .models import build_sampling_scheduler

TOY_PLOT_EXTENT = 3.0  # standardised toy data lies within +-3 of the origin


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


def measure(pipe: ScoreSDEPipeline, args, data: TrainingData, samples, progress: bool = False) -> Dict[str, str]:
    """The metrics of the model card, as printable strings (``progress``: a progress bar for the likelihood)."""
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
    metrics["bits/dim"] = likelihood_metric(pipe, data, args.eval_likelihood_samples, args.seed, progress)
    # the variational bound of the same examples: an upper bound on the ODE's figure, and what DDPM-style models
    # are trained on
    metrics["bits/dim, variational bound"] = bound_metric(
        pipe, data.held_out[: args.eval_likelihood_samples], normalization=None if data.is_image else data.normalization,
        seed=args.seed)
    return metrics


def likelihood_metric(pipe: ScoreSDEPipeline, data: TrainingData, num_examples: int, seed: int,
                      progress: bool = False) -> str:
    """Bits/dim of ``num_examples`` held-out examples by the probability-flow ODE; with ``progress``, a progress
    bar counts the network evaluations of the adaptive solver (their number is not known in advance)."""
    if num_examples <= 0:
        return "not measured"
    if pipe.unet.config.get("num_class_embeds") is not None:
        return "not measured (class-conditional model)"
    with evaluation_progress(pipe.unet, f"bits/dim of {num_examples} examples (PF-ODE network evaluations)",
                             disable=not progress):
        return _bits_per_dim(pipe, data, num_examples, seed)


@contextlib.contextmanager
def evaluation_progress(model: torch.nn.Module, description: str, disable: bool):
    """A tqdm bar advanced by every forward of ``model`` inside the block (``TQDM_DISABLE=1`` turns it off)."""
    from tqdm.auto import tqdm

    bar = tqdm(desc=description, unit=" evaluations", disable=disable)

    def count(module, inputs) -> None:  # a pre-hook returning something would replace the inputs
        bar.update(1)

    hook = model.register_forward_pre_hook(count)
    try:
        yield bar
    finally:
        hook.remove()
        bar.close()


def _bits_per_dim(pipe: ScoreSDEPipeline, data: TrainingData, num_examples: int, seed: int) -> str:
    score_fn = pipe.score_function()
    examples = data.held_out[:num_examples].to(pipe.device)
    generator = torch.Generator(pipe.device).manual_seed(seed)
    if data.is_image:
        result = log_likelihood(score_fn, dequantize_and_scale(examples, generator), data="8bit", generator=generator)
        where = "training" if data.held_out_is_training else "held-out"
        return f"{result.bits_per_dim.mean().item():.3f} (8-bit, {len(examples)} {where} images, PF-ODE)"
    result = log_likelihood(score_fn, examples, divergence="exact")
    # back to data units: log p_data(x) = log p_model((x - mean) / std) - sum(log std)
    log_std = torch.tensor(data.normalization["std"], dtype=torch.float64).log().sum()
    bits = -(result.log_likelihood.cpu() - log_std) / (examples.shape[1] * math.log(2))
    return f"{bits.mean().item():.3f} (continuous, in data units, {len(examples)} held-out points, PF-ODE)"
