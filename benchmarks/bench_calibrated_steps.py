"""Grids fitted to the model (``calibrate_sigmas``) against our default grid and diffusers' low-NFE settings.

Two parts, each in one run with its peers:

* the exact-score oracle (issue #14 point 1): DPM-Solver++ 2M on the DDPM schedule, its levels fitted to the
  mixture's exact model on a pilot batch (500 draws of seed 1), scored like ``bench_oracle_samplers.py --low_nfe``
  (the same 8000 / 4000 draws of seed 0, the same metrics) next to our default grid and every diffusers peer;
* with ``--model_dir``, a trained network (the digits model of ``bench_real_data.py``): the grid fitted on 64
  pilot draws of seed 1, then ``--num_samples`` draws of seed 0 from every sampler, each compared with our ODE
  solution at ``--reference_steps`` levels from the same noise: the RMS distance, and the Fréchet distance in the
  features of ``bench_real_data``'s digit classifier (trained here).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_calibrated_steps.py [--model_dir outputs/digits-vp]
"""

import argparse
import time

import torch
from diffusers import DEISMultistepScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from common import write_results
from bench_oracle_samplers import (
    LOW_NFE_PEERS,
    LOW_NFE_TARGETS,
    NUM_DIRECTIONS,
    Sampler,
    format_value,
    metrics,
    run,
    scorekit_on_ddpm,
)
from bench_real_data import (
    FeatureSpace,
    diffusers_config,
    digits_split,
    to_model_space,
    train_classifier,
)
from diffusers_scorekit import ProbabilityFlowODEScheduler, ScoreSDEPipeline, calibrate_sigmas
from diffusers_scorekit.mixture import GaussianMixture, exact_score_model
from diffusers_scorekit.schedulers.scheduling_utils import run_plain_loop

REAL_NFE_TARGETS = (5, 10, 20)
ORACLE_PILOT_DRAWS = 500
ORACLE_REFERENCE_STEPS = 400
REAL_PILOT_DRAWS = 64
REAL_CALIBRATION_REFERENCE_STEPS = 200
PILOT_SEED = 1


def loop(scheduler, model, noise, **grid):
    scheduler.set_timesteps(**grid)
    with torch.no_grad():
        return run_plain_loop(scheduler, model, noise * scheduler.init_noise_sigma)


def oracle_part(targets):
    default = Sampler("ode_vp_dpm_solver_2m_log_snr_ddpm (default)", "scorekit",
                      scorekit_on_ddpm(ProbabilityFlowODEScheduler, solver="dpm_solver_2m", time_spacing="log_snr"))
    mixtures = {"ring": (GaussianMixture.ring(), 8000), "64d": (GaussianMixture.high_dimensional(dim=64), 4000)}
    results = {}
    for name, (mixture, num_samples) in mixtures.items():
        reference = mixture.sample(num_samples, torch.Generator().manual_seed(1000))
        directions = torch.randn(NUM_DIRECTIONS, mixture.dim, generator=torch.Generator().manual_seed(3000), dtype=torch.float64)
        directions = directions / directions.norm(dim=1, keepdim=True)
        pilot = torch.randn((ORACLE_PILOT_DRAWS, mixture.dim), generator=torch.Generator().manual_seed(PILOT_SEED))
        noise = torch.randn((num_samples, mixture.dim), generator=torch.Generator().manual_seed(0))  # run()'s draws
        rows = []
        for target in targets:
            for sampler in (default, *LOW_NFE_PEERS):
                rows.append(run(sampler, mixture, num_samples, target, reference, directions))
            scheduler = default.make()
            model = exact_score_model(mixture, scheduler)
            start = time.perf_counter()
            calibration = calibrate_sigmas(scheduler, model, pilot, target, reference_steps=ORACLE_REFERENCE_STEPS)
            seconds = time.perf_counter() - start
            samples = loop(scheduler, model, noise, sigmas=calibration.sigmas)
            rows.append({"sampler": "ode_vp_dpm_solver_2m_calibrated_ddpm", "library": "scorekit", "nfe_target": target,
                         "nfe": len(scheduler.timesteps), "num_samples": num_samples,
                         **metrics(mixture, samples, reference, directions), "sigmas": calibration.sigmas,
                         "grids_tried": calibration.grids_tried, "calibration_s": seconds})
            print(f"{name} NFE {target}: calibrated var {format_value(rows[-1]['variance_error'])} "
                  f"({calibration.grids_tried} grids, {seconds:.0f} s)", flush=True)
        results[name] = {"num_samples": num_samples, "runs": rows}
    return results


def oracle_table(result, targets):
    lines = ["| | " + " | ".join(f"NFE {t}" for t in targets) + " |", "|---|" + "---:|" * len(targets)]

    def cells(pick):
        return " | ".join(pick([r for r in result["runs"] if r["nfe_target"] == t]) for t in targets)

    def of(name):
        return lambda rows: next(format_value(r["variance_error"]) for r in rows if r["sampler"].startswith(name))

    def best_peer(rows):
        peer = min((r for r in rows if r["library"] == "diffusers"), key=lambda r: r["variance_error"])
        return f"{format_value(peer['variance_error'])} ({peer['sampler']})"

    lines.append(f"| ours, default (log-SNR) | {cells(of('ode_vp_dpm_solver_2m_log_snr'))} |")
    lines.append(f"| ours, calibrated | {cells(of('ode_vp_dpm_solver_2m_calibrated'))} |")
    lines.append(f"| best diffusers peer | {cells(best_peer)} |")
    return "\n".join(lines)


def real_part(model_dir, targets, num_samples, reference_steps):
    pipeline = ScoreSDEPipeline.from_pretrained(model_dir)
    unet = pipeline.unet
    scorekit_config = dict(pipeline.scheduler.config)
    ddpm_config = diffusers_config(scorekit_config)

    def model(x, t):
        return unet(x, t).sample

    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    pilot = torch.randn((REAL_PILOT_DRAWS, *shape), generator=torch.Generator().manual_seed(PILOT_SEED))
    noise = torch.randn((num_samples, *shape), generator=torch.Generator().manual_seed(0))

    def ours():
        return ProbabilityFlowODEScheduler.from_config(scorekit_config, solver="dpm_solver_2m", time_spacing="log_snr")

    start = time.perf_counter()
    reference = loop(ours(), model, noise, num_inference_steps=reference_steps)
    print(f"reference: {reference_steps} levels, {time.perf_counter() - start:.0f} s", flush=True)
    train_images, train_labels, _, _ = digits_split()
    classifier = train_classifier(to_model_space(train_images), train_labels)
    space = FeatureSpace(classifier, {"ode_reference": reference})
    peers = {
        "dpmsolver++_2m": lambda: DPMSolverMultistepScheduler.from_config(ddpm_config),
        "dpmsolver++_3m": lambda: DPMSolverMultistepScheduler.from_config(ddpm_config, solver_order=3),
        "unipc_bh2_order2": lambda: UniPCMultistepScheduler.from_config(ddpm_config),
        "deis_order2": lambda: DEISMultistepScheduler.from_config(ddpm_config),
    }
    rows = []

    def record(name, library, target, samples, **extra):
        rms = (samples - reference).pow(2).mean().sqrt().item()
        rows.append({"sampler": name, "library": library, "nfe_target": target, "rms_to_reference": rms,
                     **space.distances(samples), **extra})
        print(f"NFE {target} {name}: RMS {rms:.4f}, FD {format_value(rows[-1]['fd_ode_reference'])}", flush=True)

    for target in targets:
        record("ode_dpm_solver_2m_log_snr (default)", "scorekit", target, loop(ours(), model, noise, num_inference_steps=target))
        scheduler = ours()
        start = time.perf_counter()
        calibration = calibrate_sigmas(scheduler, model, pilot, target, reference_steps=REAL_CALIBRATION_REFERENCE_STEPS)
        seconds = time.perf_counter() - start
        record("ode_dpm_solver_2m_calibrated", "scorekit", target, loop(scheduler, model, noise, sigmas=calibration.sigmas),
               sigmas=calibration.sigmas, grids_tried=calibration.grids_tried, calibration_s=seconds)
        for name, make in peers.items():
            record(name, "diffusers", target, loop(make(), model, noise, num_inference_steps=target))
    return {"num_samples": num_samples, "reference_steps": reference_steps, "runs": rows}


def real_table(result, targets):
    names = list(dict.fromkeys(r["sampler"] for r in result["runs"]))
    lines = ["| sampler | " + " | ".join(f"NFE {t}: RMS / FD" for t in targets) + " |", "|---|" + "---:|" * len(targets)]
    for name in names:
        cells = []
        for target in targets:
            row = next(r for r in result["runs"] if r["sampler"] == name and r["nfe_target"] == target)
            cells.append(f"{row['rms_to_reference']:.4f} / {format_value(row['fd_ode_reference'])}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default=None, help="a trained ScoreSDEPipeline folder (bench_real_data.py's)")
    parser.add_argument("--skip_oracle", action="store_true")
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--reference_steps", type=int, default=500)
    parser.add_argument("--out", default="benchmarks/results/calibrated_steps.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # faster here than two threads on a shared 2-core machine
    results = {}
    if not args.skip_oracle:
        results["oracle"] = oracle_part(LOW_NFE_TARGETS)
        for name, result in results["oracle"].items():
            print(f"\n## {name}: within-mode variance error\n\n{oracle_table(result, LOW_NFE_TARGETS)}")
    if args.model_dir:
        results["real"] = real_part(args.model_dir, REAL_NFE_TARGETS, args.num_samples, args.reference_steps)
        print(f"\n## {args.model_dir}: distance to the {args.reference_steps}-level ODE solution\n\n"
              f"{real_table(results['real'], REAL_NFE_TARGETS)}")
    write_results(args.out, results)
    return results


if __name__ == "__main__":
    main()
