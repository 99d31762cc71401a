"""Every sampler on the exact-score oracle, against NFE, next to diffusers' own schedulers (GitHub issue #2).

Each sampler draws from a Gaussian mixture (2-D ring, 64-D) with the mixture's exact score as its "model", so
every error is the sampler's own. Metrics per run: mode total variation, pooled within-mode variance error,
worst mode mean error, sliced Wasserstein-1 distance to a fresh true sample set, NaN flag and wall time; the
noise floor is the same metrics on independent true sample sets of the same size.

    PYTHONPATH=. python benchmarks/bench_oracle_samplers.py [--quick | --low_nfe] [--out benchmarks/results/oracle_samplers.json]

``--low_nfe`` (issue #14) runs NFE 5-20: our DPM-Solver++ 2M against diffusers' strongest low-NFE settings.
"""

import argparse
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    ScoreSdeVeScheduler,
    UniPCMultistepScheduler,
)

from diffusers_scorekit import (
    AnnealedLangevinScheduler,
    PredictorCorrectorScheduler,
    ProbabilityFlowODEScheduler,
    VEEulerMaruyamaScheduler,
    VPEulerMaruyamaScheduler,
)
from common import write_results
from diffusers_scorekit.demo import sample as plain_loop  # the plain diffusers loop, seeded, any scheduler
from diffusers_scorekit.mixture import GaussianMixture, exact_score_model

NFE_TARGETS = (10, 20, 50, 100, 200, 1000)
QUICK_NFE_TARGETS = (10, 50)
LONG_RUN_NFE, LONG_RUN_SAMPLE_FRACTION = 1000, 4  # runs this long use a quarter of the samples (runtime)
NUM_DIRECTIONS = 256
NUM_FLOOR_DRAWS = 10
METRICS = ("tv", "variance_error", "mean_error", "sliced_w1")

# the DDPM linear schedule (1e-4 .. 0.02, 1000 steps, epsilon) that the diffusers family and our "ddpm" rows share;
# without "_use_default_values", which would make from_config give each class its own defaults (Heun's differ)
DDPM_CONFIG = {k: v for k, v in DDPMScheduler().config.items() if k != "_use_default_values"}


def score_sde_ve_loop(scheduler, model, shape, num_inference_steps, generator):
    """``ScoreSdeVePipeline.__call__``: correctors then predictor per level, the last mean as the sample
    (without the pipeline's image clamp to [0, 1])."""
    scheduler.set_timesteps(num_inference_steps)
    scheduler.set_sigmas(num_inference_steps)
    x = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i] * torch.ones(shape[0])
        for _ in range(scheduler.config.correct_steps):
            x = scheduler.step_correct(model(x, sigma), x, generator=generator).prev_sample
        output = scheduler.step_pred(model(x, sigma), t, x, generator=generator)
        x, x_mean = output.prev_sample, output.prev_sample_mean
    return x_mean


def timesteps_nfe(scheduler, num_inference_steps):
    scheduler.set_timesteps(num_inference_steps)
    return len(scheduler.timesteps)


def score_sde_ve_nfe(scheduler, num_inference_steps):
    return num_inference_steps * (scheduler.config.correct_steps + 1)


@dataclass
class Sampler:
    name: str
    library: str
    make: Callable
    oracle: Optional[Callable] = None  # the scorekit scheduler whose SDE maps timesteps for the exact model
    loop: Callable = plain_loop
    nfe: Callable = timesteps_nfe


def ddpm_oracle():
    return VPEulerMaruyamaScheduler.from_config(DDPM_CONFIG)


def diffusers_ddpm_family(cls, **kwargs):
    # "linspace" spacing runs from timestep 999 to 0 as our DDPM-schedule grids do; no clipping of the predicted
    # x_0 to [-1, 1] (set in the DDPM config; an image prior that would cut the mixtures)
    config = {**DDPM_CONFIG, "timestep_spacing": "linspace", "clip_sample": False}
    return lambda: cls.from_config(config, **kwargs)


def scorekit_on_ddpm(cls, **kwargs):
    return lambda: cls.from_config(DDPM_CONFIG, **kwargs)


def score_sde_ve():
    # the sigma range and snr of our PredictorCorrectorScheduler(sde_type="ve") defaults
    return ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=50.0, snr=0.16)


SAMPLERS = [
    Sampler("ve_em", "scorekit", lambda: VEEulerMaruyamaScheduler()),
    Sampler("vp_em", "scorekit", lambda: VPEulerMaruyamaScheduler()),
    Sampler("vp_em_ddpm", "scorekit", scorekit_on_ddpm(VPEulerMaruyamaScheduler)),
    Sampler("subvp_em", "scorekit", lambda: VPEulerMaruyamaScheduler(sde_type="subvp")),
    Sampler("pc_ve_rd_langevin", "scorekit", lambda: PredictorCorrectorScheduler()),
    Sampler("pc_vp_ancestral", "scorekit", lambda: PredictorCorrectorScheduler(sde_type="vp", predictor="ancestral", corrector="none", prediction_type="epsilon")),
    Sampler("pc_vp_ancestral_ddpm", "scorekit", scorekit_on_ddpm(PredictorCorrectorScheduler, predictor="ancestral", corrector="none")),
    *[
        Sampler(f"ode_{sde}_{solver}_{spacing}", "scorekit", lambda sde=sde, solver=solver, spacing=spacing: ProbabilityFlowODEScheduler(
            sde_type=sde, solver=solver, time_spacing=spacing, **({"prediction_type": "score", "timestep_type": "sigma"} if sde == "ve" else {})
        ))
        for sde in ("vp", "ve")
        for solver in ("euler", "heun", "dpm_solver_2m")
        for spacing in ("edm", "log_snr")
    ],
    *[
        Sampler(f"ode_vp_{solver}_{spacing}_ddpm", "scorekit", scorekit_on_ddpm(ProbabilityFlowODEScheduler, solver=solver, time_spacing=spacing))
        for solver in ("euler", "heun", "dpm_solver_2m")
        for spacing in ("edm", "log_snr")
    ],
    Sampler("annealed_langevin", "scorekit", lambda: AnnealedLangevinScheduler(sigma_max=10.0, num_annealed_steps=5)),
    Sampler("ddpm", "diffusers", diffusers_ddpm_family(DDPMScheduler), ddpm_oracle),
    Sampler("ddim", "diffusers", diffusers_ddpm_family(DDIMScheduler), ddpm_oracle),
    Sampler("euler", "diffusers", diffusers_ddpm_family(EulerDiscreteScheduler), ddpm_oracle),
    Sampler("heun", "diffusers", diffusers_ddpm_family(HeunDiscreteScheduler), ddpm_oracle),
    Sampler("dpmsolver++_2m", "diffusers", diffusers_ddpm_family(DPMSolverMultistepScheduler), ddpm_oracle),
    Sampler(
        "score_sde_ve",
        "diffusers",
        score_sde_ve,
        lambda: PredictorCorrectorScheduler.from_config(score_sde_ve().config),
        score_sde_ve_loop,
        score_sde_ve_nfe,
    ),
]


# issue #14: diffusers' strongest low-NFE settings, all on the DDPM schedule the scorekit "_ddpm" rows share
LOW_NFE_TARGETS = (5, 6, 8, 10, 12, 15, 20)
LOW_NFE_PEERS = [
    *[
        Sampler(f"dpmsolver++_{order}m{suffix}", "diffusers", diffusers_ddpm_family(DPMSolverMultistepScheduler, solver_order=order, **kwargs), ddpm_oracle)
        for order in (2, 3)
        for suffix, kwargs in (("", {}), ("_lu", {"use_lu_lambdas": True}), ("_karras", {"use_karras_sigmas": True}))
    ],
    *[
        Sampler(f"unipc_{variant}_order{order}{suffix}", "diffusers", diffusers_ddpm_family(UniPCMultistepScheduler, solver_type=variant, solver_order=order, **kwargs), ddpm_oracle)
        for variant in ("bh1", "bh2")
        for order in (2, 3)
        for suffix, kwargs in (("", {}), ("_karras", {"use_karras_sigmas": True}))
    ],
    *[
        Sampler(f"deis_order{order}", "diffusers", diffusers_ddpm_family(DEISMultistepScheduler, solver_order=order), ddpm_oracle)
        for order in (2, 3)
    ],
    *[
        Sampler(f"dpmsolver++_{order}s_singlestep", "diffusers", diffusers_ddpm_family(DPMSolverSinglestepScheduler, solver_order=order), ddpm_oracle)
        for order in (2, 3)
    ],
]
LOW_NFE_SAMPLERS = [
    *[
        Sampler(f"ode_vp_{solver}_{spacing}_ddpm", "scorekit", scorekit_on_ddpm(ProbabilityFlowODEScheduler, solver=solver, time_spacing=spacing))
        for solver in ("dpm_solver_2m",)
        for spacing in ("edm", "log_snr")
    ],
    *LOW_NFE_PEERS,
]


def steps_for_nfe(sampler, target):
    """The ``num_inference_steps`` whose NFE is closest to ``target``, the smaller on a tie (NFE grows with it,
    and is at least it)."""
    scheduler = sampler.make()
    low, high = 1, target
    while low < high:  # smallest n with nfe(n) >= target
        middle = (low + high) // 2
        low, high = (middle + 1, high) if sampler.nfe(scheduler, middle) < target else (low, middle)
    if low > 1 and target - sampler.nfe(scheduler, low - 1) <= sampler.nfe(scheduler, low) - target:
        return low - 1
    return low


def sliced_w1(x, y, directions):
    """Mean over unit directions of the 1-D Wasserstein-1 distance between the projections (equal sizes)."""
    projected_x = (x.to(torch.float64) @ directions.T).sort(dim=0).values
    projected_y = (y.to(torch.float64) @ directions.T).sort(dim=0).values
    return (projected_x - projected_y).abs().mean().item()


def metrics(mixture, samples, reference, directions):
    report = mixture.report(samples)
    return {
        "tv": report["tv"],
        "variance_error": report["variance_error"],
        "mean_error": report["mean_error"],
        "sliced_w1": sliced_w1(samples, reference, directions) if not report["nonfinite"] else math.inf,
        "nan": report["nonfinite"],
    }


def noise_floor(mixture, num_samples, reference, directions):
    """Metrics of independent true sample sets: mean and max over draws."""
    draws = [metrics(mixture, mixture.sample(num_samples, torch.Generator().manual_seed(2000 + i)), reference, directions) for i in range(NUM_FLOOR_DRAWS)]
    return {f"{stat}_{name}": aggregate(d[name] for d in draws) for name in METRICS for stat, aggregate in (("mean", lambda v: sum(v) / NUM_FLOOR_DRAWS), ("max", max))}


def sample_size(num_samples, target):
    return num_samples // LONG_RUN_SAMPLE_FRACTION if target >= LONG_RUN_NFE else num_samples


def run(sampler, mixture, num_samples, target, reference, directions):
    scheduler = sampler.make()
    exact_model = exact_score_model(mixture, sampler.oracle() if sampler.oracle else scheduler)
    calls = []

    def model(x, timestep):
        calls.append(1)
        return exact_model(x, timestep)

    num_inference_steps = steps_for_nfe(sampler, target)
    start = time.perf_counter()
    samples = sampler.loop(scheduler, model, (num_samples, mixture.dim), num_inference_steps, torch.Generator().manual_seed(0))
    wall_time = time.perf_counter() - start
    return {
        "sampler": sampler.name,
        "library": sampler.library,
        "nfe_target": target,
        "num_inference_steps": num_inference_steps,
        "nfe": len(calls),
        "num_samples": num_samples,
        **metrics(mixture, samples, reference, directions),
        "wall_time_s": wall_time,
    }


def format_value(value):
    return "inf" if math.isinf(value) else "nan" if math.isnan(value) else f"{value:.4f}"


def pivot_table(rows, metric, targets, samplers):
    """Samplers x NFE target; the actual NFE in brackets where it differs from the target."""
    lines = ["| sampler | library | " + " | ".join(f"NFE {t}" for t in targets) + " |", "|---|---|" + "---:|" * len(targets)]
    for sampler in samplers:
        cells = []
        for target in targets:
            row = next(r for r in rows if r["sampler"] == sampler.name and r["nfe_target"] == target)
            cell = format_value(row[metric]) + (f" ({row['nfe']})" if row["nfe"] != target else "") + (" NaN" if row["nan"] else "")
            cells.append(cell)
        lines.append(f"| {sampler.name} | {sampler.library} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def floor_table(floors):
    lines = ["| samples | | " + " | ".join(METRICS) + " |", "|---:|---|" + "---:|" * len(METRICS)]
    for num_samples, floor in floors.items():
        for stat in ("mean", "max"):
            values = " | ".join(format_value(floor[f"{stat}_{m}"]) for m in METRICS)
            lines.append(f"| {num_samples} | {stat} of {NUM_FLOOR_DRAWS} true sets | {values} |")
    return "\n".join(lines)


def best(rows, library, metric):
    row = min((r for r in rows if r["library"] == library), key=lambda r: r[metric])
    return row[metric], row["sampler"]


def summary(results, targets):
    """The issue's questions, answered from the results."""
    lines = []
    at_floor = {}
    for name, result in results.items():
        floor = result["noise_floor"][result["num_samples"]]["max_variance_error"]
        at_floor[name] = {
            r["sampler"]
            for r in result["runs"]
            if r["library"] == "scorekit" and r["nfe"] <= 50 and r["variance_error"] <= floor
        }
        lines.append(f"- {name}: scorekit samplers at the variance noise floor (<= {floor:.4f}, the max over {NUM_FLOOR_DRAWS} true sets) with NFE <= 50: {', '.join(sorted(at_floor[name])) or 'none'}")
    both = set.intersection(*at_floor.values())
    lines.append(f"- at the floor on both mixtures by NFE <= 50: {'yes: ' + ', '.join(sorted(both)) if both else 'no'}")
    for name, result in results.items():
        for metric in ("variance_error", "sliced_w1"):
            verdicts = []
            for target in targets:
                rows = [r for r in result["runs"] if r["nfe_target"] == target]
                ours, ours_name = best(rows, "scorekit", metric)
                theirs, theirs_name = best(rows, "diffusers", metric)
                verdicts.append(f"NFE {target}: {'<=' if ours <= theirs else '>'} ({format_value(ours)} {ours_name} vs {format_value(theirs)} {theirs_name})")
            lines.append(f"- {name}, {metric}, best scorekit vs best diffusers: " + "; ".join(verdicts))
    nan_runs = [f"{name}/{r['sampler']}@{r['nfe']}" for name, result in results.items() for r in result["runs"] if r["nan"]]
    lines.append(f"- runs with NaN/inf samples: {', '.join(nan_runs) or 'none'}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples and NFE targets (a smoke run)")
    parser.add_argument("--low_nfe", action="store_true", help="NFE 5-20: the ODE samplers against diffusers' low-NFE settings")
    parser.add_argument("--out", default=None, help="defaults to benchmarks/results/oracle_samplers[_low_nfe].json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # faster here than two threads on a shared 2-core machine
    targets = LOW_NFE_TARGETS if args.low_nfe else QUICK_NFE_TARGETS if args.quick else NFE_TARGETS
    samplers = LOW_NFE_SAMPLERS if args.low_nfe else SAMPLERS
    args.out = args.out or f"benchmarks/results/oracle_samplers{'_low_nfe' if args.low_nfe else ''}.json"
    mixtures = {
        "ring": (GaussianMixture.ring(), 1000 if args.quick else 8000),
        "64d": (GaussianMixture.high_dimensional(dim=64), 500 if args.quick else 4000),
    }
    results = {}
    for name, (mixture, num_samples) in mixtures.items():
        reference = mixture.sample(num_samples, torch.Generator().manual_seed(1000))
        directions = torch.randn(NUM_DIRECTIONS, mixture.dim, generator=torch.Generator().manual_seed(3000), dtype=torch.float64)
        directions = directions / directions.norm(dim=1, keepdim=True)
        sizes = sorted({sample_size(num_samples, target) for target in targets}, reverse=True)
        floors = {size: noise_floor(mixture, size, reference[:size], directions) for size in sizes}
        runs = []
        for sampler in samplers:
            for target in targets:
                size = sample_size(num_samples, target)
                runs.append(run(sampler, mixture, size, target, reference[:size], directions))
                print(f"{name} {sampler.name} NFE {runs[-1]['nfe']}: var {format_value(runs[-1]['variance_error'])} sw1 {format_value(runs[-1]['sliced_w1'])} ({runs[-1]['wall_time_s']:.1f}s)", flush=True)
        results[name] = {"num_samples": num_samples, "noise_floor": floors, "runs": runs}

    for name, result in results.items():
        print(f"\n## {name} ({result['num_samples']} samples; {result['num_samples'] // LONG_RUN_SAMPLE_FRACTION} at NFE >= {LONG_RUN_NFE})\n\nNoise floor:\n\n{floor_table(result['noise_floor'])}")
        for metric in METRICS:
            print(f"\n{metric}:\n\n{pivot_table(result['runs'], metric, targets, samplers)}")
        print(f"\nwall time (s):\n\n{pivot_table(result['runs'], 'wall_time_s', targets, samplers)}")
    print(f"\n## Summary\n\n{summary(results, targets)}")
    write_results(args.out, {"nfe_targets": list(targets), "results": results})


if __name__ == "__main__":
    main()
