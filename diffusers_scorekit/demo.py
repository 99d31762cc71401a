"""Sample a 2-D Gaussian-mixture ring from its exact score with every scorekit scheduler.

``python -m diffusers_scorekit.demo --out outputs/demo.png`` writes one scatter panel per scheduler beside the
true samples and prints how close each got (mode weights, within-mode variance). No training involved: the
"model" is the mixture's closed-form score, so what you see is the sampler alone.
"""

import argparse
import os
import time

import torch
from PIL import Image, ImageDraw

from .mixture import GaussianMixture, exact_score_model
from .schedulers import (
    AnnealedLangevinScheduler,
    PredictorCorrectorScheduler,
    ProbabilityFlowODEScheduler,
    VEEulerMaruyamaScheduler,
    VPEulerMaruyamaScheduler,
)
from .schedulers.scheduling_utils import run_plain_loop

DEMO_SCHEDULERS = {
    "annealed Langevin": (AnnealedLangevinScheduler(sigma_max=10.0, num_annealed_steps=20), 25),
    "VE Euler-Maruyama": (VEEulerMaruyamaScheduler(), 500),
    "VP Euler-Maruyama": (VPEulerMaruyamaScheduler(), 500),
    "PC (VE, RD + Langevin)": (PredictorCorrectorScheduler(), 250),
    "PF-ODE (VP, DPM-Solver++ 2M)": (ProbabilityFlowODEScheduler(), 25),
}


def sample(scheduler, model, shape, num_inference_steps, generator):
    """The plain diffusers loop on ``num_inference_steps`` levels, its initial noise and every noise a ``step``
    draws from ``generator`` (a CPU generator)."""
    scheduler.set_timesteps(num_inference_steps)
    return run_plain_loop(scheduler, model, torch.randn(shape, generator=generator) * scheduler.init_noise_sigma, generator)


def scatter_panel(points, title, size=320, extent=1.6):
    panel = Image.new("RGB", (size, size + 24), "white")
    draw = ImageDraw.Draw(panel)
    draw.text((6, 4), title, fill="black")
    scale = size / (2 * extent)
    for x, y in points.tolist():
        px, py = (x + extent) * scale, 24 + (extent - y) * scale
        draw.point((px, py), fill=(31, 119, 180))
    draw.rectangle((0, 24, size - 1, size + 23), outline="gray")
    return panel


def scatter_image(panels, extent=1.6):
    """Side-by-side scatter panels of ``(points, title)`` pairs, as one PIL image."""
    images = [scatter_panel(points, title, extent=extent) for points, title in panels]
    figure = Image.new("RGB", (sum(image.width for image in images), images[0].height), "white")
    for i, image in enumerate(images):
        figure.paste(image, (i * image.width, 0))
    return figure


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo.png", help="where to write the PNG")
    parser.add_argument("--num_samples", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    mixture = GaussianMixture.ring()
    generator = torch.Generator().manual_seed(args.seed)
    panels = [(mixture.sample(args.num_samples, generator), "true samples")]
    print(f"{'scheduler':<26} {'NFE':>5} {'mode TV':>8} {'var err':>8} {'seconds':>8}")
    for name, (scheduler, steps) in DEMO_SCHEDULERS.items():
        start = time.perf_counter()
        points = sample(scheduler, exact_score_model(mixture, scheduler), (args.num_samples, 2), steps, generator)
        report = mixture.report(points)
        seconds = time.perf_counter() - start
        print(f"{name:<26} {len(scheduler.timesteps):>5} {report['tv']:>8.3f} {report['variance_error']:>8.3f} {seconds:>8.1f}")
        panels.append((points, f"{name}, NFE {len(scheduler.timesteps)}"))

    grid = scatter_image(panels)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
