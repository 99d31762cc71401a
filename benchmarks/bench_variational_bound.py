"""The variational bounds against the probability-flow ODE and the exact answer, and their cost (issue #16).

1. **Accuracy** on a Gaussian mixture whose exact score is the "model" (``diffusers_scorekit.mixture``): the
   exact ``-log p(x)`` of held-out draws, the ODE's bits/dim (exact divergence) and the bounds, per SDE:
   the continuous-time bound (VE, VP, sub-VP, and VP on diffusers' 1000-step DDPM schedule) and DDPM's discrete
   bound on that schedule (fixed-large and fixed-small variances; all 1000 terms, and 50 random ones).
2. **Cost** per image of a ``UNet2DModel`` (the benchmarks' "small" layout, random weights) on 8-bit images on
   the CPU: the ODE (Hutchinson, dopri5 at 1e-5), the DDPM bound over all terms and over a subset, and the
   continuous bound, each as seconds per image and as a multiple of one diffusers UNet forward pass per image
   (measured in the same run, interleaved).

    PYTHONPATH=. python benchmarks/bench_variational_bound.py [--quick] [--out benchmarks/results/variational_bound.json]
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

from common import UNET_CHANNELS, run_header
from diffusers_scorekit import training
from diffusers_scorekit.likelihood import dequantize_and_scale, log_likelihood
from diffusers_scorekit.mixture import GaussianMixture
from diffusers_scorekit.parametrization import t_from_timestep
from diffusers_scorekit.score_function import ScoreFunction
from diffusers_scorekit.sde import VESDE, VPSDE, SubVPSDE, default_sampling_eps
from diffusers_scorekit.variational_bound import continuous_variational_bound, ddpm_variational_bound, to_bin_centres


class MixtureEpsilon:
    """The mixture's exact noise prediction with one time per example (``t`` as the timestep)."""

    def __init__(self, mixture, sde):
        self.mixture, self.sde = mixture, sde

    def __call__(self, x, timestep):
        t = t_from_timestep(timestep.to(torch.float64), self.sde, "continuous", 1000)
        a, sigma = (value[:, None] for value in self.sde.marginal(t))
        m = self.mixture
        variances = a**2 * m.stds**2 + sigma**2
        diff = x.to(torch.float64)[:, None, :] - a[:, :, None] * m.means[None]
        terms = m.weights.log() - 0.5 * diff.pow(2).sum(-1) / variances - 0.5 * m.dim * variances.log()
        score = -(torch.softmax(terms, 1)[..., None] * diff / variances[..., None]).sum(1)
        return (-sigma * score).to(x.dtype)


def gap_and_error(bits_per_dim, exact_bpd):
    """Mean of ``bits_per_dim - exact`` over the examples, and its standard error."""
    gaps = bits_per_dim - exact_bpd
    return gaps.mean().item(), gaps.std().item() / math.sqrt(len(gaps))


def accuracy_rows(num_examples, num_time_samples, seed=0):
    mixture = GaussianMixture.high_dimensional(dim=8)
    x = mixture.sample(num_examples, torch.Generator().manual_seed(seed))
    exact = -mixture.log_prob(x) / (mixture.dim * math.log(2))
    sdes = {"VE": VESDE(), "VP": VPSDE(), "sub-VP": SubVPSDE(), "VP, DDPM schedule": VPSDE.from_ddpm_schedule()}
    rows = []
    for name, sde in sdes.items():
        score_fn = ScoreFunction(MixtureEpsilon(mixture, sde), sde, "epsilon", "continuous")
        ode = log_likelihood(score_fn, x, divergence="exact").bits_per_dim
        row = {"sde": name, "exact_bpd": exact.mean().item(), "sampling_eps": default_sampling_eps(sde)}
        row["ode_gap"], row["ode_gap_se"] = gap_and_error(ode, exact)
        generator = torch.Generator().manual_seed(seed + 1)
        bound = continuous_variational_bound(score_fn, x, num_time_samples=num_time_samples, generator=generator)
        row["continuous_bound_gap"], row["continuous_bound_gap_se"] = gap_and_error(bound.bits_per_dim, exact)
        if name == "VP, DDPM schedule":
            for variance_type in ("fixed_large", "fixed_small"):
                full = ddpm_variational_bound(score_fn, x, variance_type=variance_type, batch_size=8192,
                                              generator=torch.Generator().manual_seed(seed + 2))
                row[f"ddpm_{variance_type}_gap"], row[f"ddpm_{variance_type}_gap_se"] = gap_and_error(full.bits_per_dim, exact)
            subset = ddpm_variational_bound(score_fn, x, num_time_samples=50, batch_size=8192,
                                            generator=torch.Generator().manual_seed(seed + 3))
            row["ddpm_50_terms_gap"], row["ddpm_50_terms_gap_se"] = gap_and_error(subset.bits_per_dim, exact)
        rows.append(row)
    return rows


def cost_rows(batch_size, num_subset, num_time_samples, resolution=32, seed=0):
    torch.manual_seed(seed)
    unet = training.build_unet2d(resolution, 3, block_out_channels=UNET_CHANNELS["small"]).eval()
    sde = VPSDE.from_ddpm_schedule()
    score_fn = ScoreFunction(unet, sde, "epsilon", "discrete")
    images = torch.randint(0, 256, (batch_size, 3, resolution, resolution), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed)
    timestep = torch.full((batch_size,), 500)
    x = to_bin_centres(images)

    def forward():
        with torch.no_grad():
            unet(x, timestep)

    def ode():
        return log_likelihood(score_fn, dequantize_and_scale(images, generator), data="8bit", generator=generator)

    def ddpm_all():
        return ddpm_variational_bound(score_fn, x, data="8bit", batch_size=64, generator=generator)

    def ddpm_subset():
        return ddpm_variational_bound(score_fn, x, data="8bit", num_time_samples=num_subset, batch_size=64,
                                      generator=generator)

    def continuous():
        return continuous_variational_bound(score_fn, dequantize_and_scale(images, generator), data="8bit",
                                            num_time_samples=num_time_samples, batch_size=64, generator=generator)

    forward()  # warm-up
    rows = []
    for name, fn in [("UNet forward (diffusers)", forward), ("PF-ODE, Hutchinson, dopri5 1e-5", ode),
                     ("DDPM bound, all 1000 terms", ddpm_all), (f"DDPM bound, {num_subset} random terms", ddpm_subset),
                     (f"continuous bound, {num_time_samples} times", continuous)]:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        row = {"method": name, "seconds_per_image": seconds / batch_size}
        if result is not None:
            row["bpd"] = result.bits_per_dim.mean().item()
            row["nfe_per_image"] = result.nfe
            if getattr(result, "standard_error_bpd", None) is not None:
                row["se_bpd"] = result.standard_error_bpd.pow(2).mean().sqrt().item() / math.sqrt(batch_size)
        rows.append(row)
    forward_seconds = rows[0]["seconds_per_image"]
    for row in rows:
        row["unet_forwards"] = row["seconds_per_image"] / forward_seconds
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer examples and images (a smoke run)")
    parser.add_argument("--out", default="benchmarks/results/variational_bound.json")
    args = parser.parse_args()
    num_examples, num_images = (64, 1) if args.quick else (512, 2)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    accuracy = accuracy_rows(num_examples, num_time_samples=64)
    print(f"\nbits/dim on an 8-D Gaussian mixture with its exact score, {num_examples} draws: exact -log p(x), and "
          "each method minus it (± standard error of the mean difference)")
    print(f"{'SDE':<18} {'exact':>7} {'ODE':>16} {'continuous bound':>16} {'DDPM fixed-large':>16} "
          f"{'DDPM fixed-small':>16} {'DDPM 50 terms':>16}")
    for row in accuracy:
        cells = [f"{row[f'{key}_gap']:+.3f} ± {row[f'{key}_gap_se']:.3f}" if f"{key}_gap" in row else ""
                 for key in ("ode", "continuous_bound", "ddpm_fixed_large", "ddpm_fixed_small", "ddpm_50_terms")]
        print(f"{row['sde']:<18} {row['exact_bpd']:>7.3f} " + " ".join(f"{cell:>16}" for cell in cells))

    cost = cost_rows(num_images, num_subset=50, num_time_samples=64)
    print(f"\ncost per 32x32x3 image, UNet2DModel 'small' {UNET_CHANNELS['small']}, random weights, CPU ({num_images} images)")
    print(f"{'method':<36} {'s/image':>9} {'x forward':>10} {'NFE':>6} {'bits/dim':>10}")
    for row in cost:
        bpd = f"{row['bpd']:.3f}" if "bpd" in row else ""
        print(f"{row['method']:<36} {row['seconds_per_image']:>9.3f} {row['unet_forwards']:>10.1f} "
              f"{row.get('nfe_per_image', 1):>6} {bpd:>10}")

    output = Path(args.out)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({**run_header(torch.device("cpu")), "accuracy": accuracy, "cost": cost}, indent=2))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
