"""A step density in log-SNR tuned on held-out mixtures: the oracle's targets met, a real network hurt (issue #14).

Tried for issue #14's point 1 and **not shipped**; this script reproduces the finding. A grid of ``n`` levels is put
at equal quantiles of a density over log-SNR ``lambda = log(a / sigma)``: ``exp`` of a piecewise-linear function
through ``(KNOTS, log_density)`` (constant beyond the outer knots), so one density gives the grid of every ``n``.
For DPM-Solver++ 2M with the final denoising call on the DDPM linear schedule, the script minimises the mean over
NFE 5, 6, 8, 10, 12, 15 and 20 of ``log(E_nfe / E_nfe(flat))``, where ``E_nfe`` is the L4 mean, over HELD-OUT
Gaussian mixtures, of ``|V_few - V_ref|``: the pooled within-mode variance ratio of the few-step samples minus that
of the 400-level solution from the same noise (so the metric's sampling noise cancels). The mixtures: six 2-D (5-10
modes at radius 0.7-1.3, mode std 0.05-0.15), six 16-D / 64-D with modes at distance 1-2 (std 0.1-0.35) and, unless
``--no_image_scale``, three at an image's scale (modes 2.5-6 apart, as 8x8 digits in [-1, 1] are about 5). None is
a benchmark mixture. Nelder-Mead (adaptive) from the flat density, which is uniform log-SNR, our default spacing.

Every sample comes from the library's scheduler (``set_timesteps(sigmas=...)``) with the mixture's exact score. The
tuned density is then scored with ``bench_oracle_samplers.run`` (its seeds, sample sizes and metric) on the ring and
the 64-D mixture, next to the default spacing and the best diffusers peer recorded in
``benchmarks/results/oracle_samplers_low_nfe.json``. With ``--real_model_dir`` (the digits model that
``bench_real_data.py`` trains) it also measures what the grid does to a real network: the RMS distance of 300
samples at NFE 5, 10 and 20 to the 200-level solution of that network's ODE from the same noise; with
``--calibration_evaluations`` also for a density fitted to that network itself on a separate pilot batch.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/tune_step_density.py [--max_evaluations 700] \\
        [--real_model_dir outputs/digits-vp] [--log_density v0 ... v10 (score a density, no tuning)]
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize

from common import write_results
from bench_oracle_samplers import DDPM_CONFIG, LOW_NFE_TARGETS, NUM_DIRECTIONS, Sampler, format_value, run, scorekit_on_ddpm
from diffusers_scorekit import ProbabilityFlowODEScheduler, ScoreSDEPipeline
from diffusers_scorekit.mixture import GaussianMixture, exact_score_model
from diffusers_scorekit.schedulers.scheduling_utils import run_plain_loop

REFERENCE_LEVELS = 400
KNOTS = (-5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0)
QUADRATURE_POINTS = 10001
REAL_NFE = (5, 10, 20)
# (dimension, modes, mode std, distance of the modes from the origin) of the held-out mixtures; 2-D modes lie at
# radius 0.7-1.3. The last three have an image's scale: 8x8 digits in [-1, 1] lie about 5 apart.
HELD_OUT = ((2, 5, 0.05, None), (2, 8, 0.08, None), (2, 6, 0.12, None), (2, 10, 0.07, None), (2, 7, 0.15, None),
            (2, 9, 0.1, None), (16, 4, 0.15, 1.0), (16, 5, 0.25, 1.0), (64, 3, 0.1, 1.0), (64, 5, 0.15, 1.0),
            (64, 4, 0.3, 1.0), (64, 6, 0.35, 1.0), (16, 5, 0.15, 2.5), (64, 6, 0.2, 3.0), (64, 10, 0.3, 2.0))


def density_levels(num_levels, log_snr_start, log_snr_end, log_density):
    """``num_levels`` log-SNR values from start to end (both included) at equal quantiles of the density."""
    points = np.linspace(log_snr_start, log_snr_end, QUADRATURE_POINTS)
    density = np.exp(np.interp(points, KNOTS, log_density))
    cumulative = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2)])
    levels = np.interp(np.linspace(0.0, cumulative[-1], num_levels), cumulative, points)
    levels[0], levels[-1] = log_snr_start, log_snr_end
    return levels


def held_out_mixtures(image_scale=True, seed=7):
    generator = torch.Generator().manual_seed(seed)
    mixtures = []
    for dim, num_modes, std, distance in HELD_OUT if image_scale else HELD_OUT[:12]:
        if dim == 2:  # modes at random angles and radii
            angles = torch.rand(num_modes, generator=generator, dtype=torch.float64) * 2 * math.pi
            radii = 0.7 + 0.6 * torch.rand(num_modes, 1, generator=generator, dtype=torch.float64)
            means = radii * torch.stack([angles.cos(), angles.sin()], dim=1)
        else:  # random directions at one random distance in [distance, 2 distance)
            means = torch.randn(num_modes, dim, generator=generator, dtype=torch.float64)
            means = distance * (1 + torch.rand(1, generator=generator, dtype=torch.float64)) * means / means.norm(dim=1, keepdim=True)
        weights = 1 + 3 * torch.rand(num_modes, generator=generator, dtype=torch.float64)
        mixtures.append(GaussianMixture(weights, means, [std] * num_modes))
    return mixtures


def make_scheduler():
    return ProbabilityFlowODEScheduler.from_config(DDPM_CONFIG, solver="dpm_solver_2m", time_spacing="log_snr")


def run_grid(scheduler, model, x):
    """The plain diffusers loop from ``x`` over the scheduler's current grid (``set_begin_index(0)`` restarts it,
    so one ``set_timesteps`` serves many runs)."""
    scheduler.set_begin_index(0)
    return run_plain_loop(scheduler, model, x)


def sample(scheduler, mixture, noise):
    return run_grid(scheduler, exact_score_model(mixture, scheduler), noise)


def sigmas_for(log_density, num_levels, scheduler=None):
    """``sigma / a`` of the density's levels over the scheduler's log-SNR range (default: the DDPM schedule)."""
    scheduler = scheduler or make_scheduler()
    start, end = scheduler.sde.log_snr([1.0, scheduler.sampling_eps]).tolist()
    return np.exp(-density_levels(num_levels, start, end, log_density)).tolist()


def real_network_check(model_dir, log_density, calibration_evaluations=0, num_samples=300, reference_levels=200):
    """RMS distance to the network's own 200-level ODE solution at NFE 5, 10, 20: flat (default) vs the density;
    with ``calibration_evaluations``, also a density fitted to this network on a separate pilot batch (100 draws of
    another seed) by the same Nelder-Mead, minimising the mean over those NFEs of log(RMS / RMS_flat)."""
    pipeline = ScoreSDEPipeline.from_pretrained(model_dir)
    unet = pipeline.unet
    scheduler = ProbabilityFlowODEScheduler.from_config(pipeline.scheduler.config, solver="dpm_solver_2m", time_spacing="log_snr")
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)

    def solve(noise, **grid):
        scheduler.set_timesteps(**grid)
        with torch.no_grad():
            return run_grid(scheduler, lambda x, t: unet(x, t).sample, noise)

    def distances(noise, reference, density):
        return np.array([((solve(noise, sigmas=sigmas_for(density, nfe, scheduler)) - reference) ** 2).mean().sqrt().item()
                         for nfe in REAL_NFE])

    flat = np.zeros(len(KNOTS))
    densities = {"log_snr (default)": flat, "tuned": log_density}
    if calibration_evaluations:
        pilot = torch.randn(100, *shape, generator=torch.Generator().manual_seed(1))
        pilot_reference = solve(pilot, num_inference_steps=reference_levels)
        pilot_flat = distances(pilot, pilot_reference, flat)
        result = minimize(lambda free: float(np.mean(np.log(distances(pilot, pilot_reference, np.concatenate([[0.0], free])) / pilot_flat))),
                          flat[1:], method="Nelder-Mead", options={"maxfev": calibration_evaluations, "adaptive": True,
                                                                    "initial_simplex": np.vstack([flat[1:], flat[1:] + 0.8 * np.eye(len(flat) - 1)])})
        densities["calibrated on this network"] = np.round(np.concatenate([[0.0], result.x]), 4)
        print(f"calibrated log_density = {tuple(densities['calibrated on this network'].tolist())}")
    noise = torch.randn(num_samples, *shape, generator=torch.Generator().manual_seed(0))
    reference = solve(noise, num_inference_steps=reference_levels)
    return {name: {"log_density": np.asarray(density).tolist(), **dict(zip(REAL_NFE, distances(noise, reference, density).tolist()))}
            for name, density in densities.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_evaluations", type=int, default=700)
    parser.add_argument("--no_image_scale", action="store_true", help="tune on the first twelve mixtures only")
    parser.add_argument("--log_density", type=float, nargs=len(KNOTS), help="score this density instead of tuning")
    parser.add_argument("--real_model_dir", default=None, help="a ScoreSDEPipeline folder (bench_real_data.py's digits model)")
    parser.add_argument("--calibration_evaluations", type=int, default=0,
                        help="with --real_model_dir: also fit a density to that network on a pilot batch")
    parser.add_argument("--out", default="benchmarks/results/tuned_step_density.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    scheduler = make_scheduler()
    scheduler.set_timesteps(REFERENCE_LEVELS)
    held_out = []
    for index, mixture in enumerate(held_out_mixtures(image_scale=not args.no_image_scale)):
        noise = torch.randn(1000 if mixture.dim == 2 else 500, mixture.dim, generator=torch.Generator().manual_seed(100 + index))
        held_out.append((mixture, noise, mixture.pooled_variance_ratio(sample(scheduler, mixture, noise)) - 1))

    def errors(log_density):
        """Per NFE: the L4 mean over the held-out mixtures of |V_few - V_ref|."""
        per_nfe = []
        for nfe in LOW_NFE_TARGETS:
            scheduler.set_timesteps(sigmas=sigmas_for(log_density, nfe, scheduler))
            deviations = [abs(m.pooled_variance_ratio(sample(scheduler, m, noise)) - 1 - ref) for m, noise, ref in held_out]
            per_nfe.append(np.mean(np.power(deviations, 4)) ** 0.25)
        return np.array(per_nfe)

    flat = np.zeros(len(KNOTS))
    uniform_errors = errors(flat)
    evaluations = []

    def objective(free):
        value = float(np.mean(np.log(errors(np.concatenate([[0.0], free])) / uniform_errors)))
        evaluations.append(value)
        if len(evaluations) % 50 == 0:
            print(f"evaluation {len(evaluations)}: objective {min(evaluations):.4f}", flush=True)
        return value

    if args.log_density is None:
        result = minimize(objective, flat[1:], method="Nelder-Mead", options={
            "maxfev": args.max_evaluations, "adaptive": True,
            "initial_simplex": np.vstack([flat[1:], flat[1:] + 0.8 * np.eye(len(flat) - 1)])})
        log_density = np.round(np.concatenate([[0.0], result.x]), 4)
    else:
        log_density = np.asarray(args.log_density)
    tuned_errors = errors(log_density)
    print(f"\nknots = {KNOTS}\nlog_density = {tuple(log_density.tolist())}\n")
    print("held-out error (L4 mean of |V_few - V_ref|) per NFE:")
    print("| spacing | " + " | ".join(f"NFE {n}" for n in LOW_NFE_TARGETS) + " |\n|---|" + "---:|" * len(LOW_NFE_TARGETS))
    print("| log_snr (default) | " + " | ".join(f"{e:.4f}" for e in uniform_errors) + " |")
    print("| tuned | " + " | ".join(f"{e:.4f}" for e in tuned_errors) + " |")

    # the benchmark, with bench_oracle_samplers' seeds and metric: the tuned density as a custom sigma grid
    recorded = json.loads(Path("benchmarks/results/oracle_samplers_low_nfe.json").read_text())["results"]
    tuned = Sampler("tuned", "scorekit", scorekit_on_ddpm(ProbabilityFlowODEScheduler, solver="dpm_solver_2m", time_spacing="log_snr"))
    benchmark = {}
    for name, mixture, num_samples in (("ring", GaussianMixture.ring(), 8000), ("64d", GaussianMixture.high_dimensional(dim=64), 4000)):
        reference = mixture.sample(num_samples, torch.Generator().manual_seed(1000))
        directions = torch.randn(NUM_DIRECTIONS, mixture.dim, generator=torch.Generator().manual_seed(3000), dtype=torch.float64)
        directions = directions / directions.norm(dim=1, keepdim=True)
        benchmark[name] = {}
        for nfe in LOW_NFE_TARGETS:
            tuned.loop = lambda scheduler, model, shape, steps, generator, nfe=nfe: custom_grid_loop(scheduler, model, shape, sigmas_for(log_density, nfe), generator)
            row = run(tuned, mixture, num_samples, nfe, reference, directions)
            peers = [r for r in recorded[name]["runs"] if r["nfe_target"] == nfe and r["library"] == "diffusers"]
            peer = min(peers, key=lambda r: r["variance_error"])
            default = next(r for r in recorded[name]["runs"] if r["nfe_target"] == nfe and r["sampler"] == "ode_vp_dpm_solver_2m_log_snr_ddpm")
            benchmark[name][nfe] = {"tuned": row["variance_error"], "nfe": row["nfe"], "default": default["variance_error"], "best_peer": peer["variance_error"], "best_peer_name": peer["sampler"]}
        print(f"\n{name}: variance error\n\n| | " + " | ".join(f"NFE {n}" for n in LOW_NFE_TARGETS) + " |\n|---|" + "---:|" * len(LOW_NFE_TARGETS))
        for key in ("tuned", "default", "best_peer"):
            print(f"| {key} | " + " | ".join(format_value(benchmark[name][n][key]) for n in LOW_NFE_TARGETS) + " |")
    real_rms = None
    if args.real_model_dir:
        real_rms = real_network_check(args.real_model_dir, log_density, args.calibration_evaluations)
        print(f"\nreal network ({args.real_model_dir}): RMS distance to its 200-level ODE solution, 300 samples\n\n"
              "| spacing | NFE 5 | NFE 10 | NFE 20 |\n|---|---:|---:|---:|")
        for name, row in real_rms.items():
            print(f"| {name} | " + " | ".join(f"{row[nfe]:.4f}" for nfe in REAL_NFE) + " |")
    write_results(args.out, {
        "knots": list(KNOTS), "log_density": log_density.tolist(), "nfe_targets": list(LOW_NFE_TARGETS),
        "image_scale_mixtures": not args.no_image_scale, "real_network_rms": real_rms,
        "held_out_error_uniform": uniform_errors.tolist(), "held_out_error_tuned": tuned_errors.tolist(),
        "evaluations": len(evaluations), "benchmark": benchmark,
    })


def custom_grid_loop(scheduler, model, shape, sigmas, generator):
    """``plain_loop`` on a custom sigma grid (the same noise draw)."""
    scheduler.set_timesteps(sigmas=sigmas)
    return run_grid(scheduler, model, torch.randn(shape, generator=generator) * scheduler.init_noise_sigma)


if __name__ == "__main__":
    main()
