"""Time the scheduler alone: microseconds per ``step`` with the model output precomputed (issue #6).

Every scorekit scheduler against diffusers' DDPM, Euler, DPM-Solver multistep and ScoreSdeVe (predictor +
corrector, the two calls ScoreSdeVePipeline makes per level) on a batch of 128 x 3 x 32 x 32, on the CPU and on
CUDA when present. Prints a table (with each scheduler's ratio to diffusers' Euler, timed in the same run) and
writes JSON.

On CUDA each scorekit loop is also captured whole by ``torch.compile(mode="reduce-overhead", fullgraph=True)``
(CUDA graphs; the random draws fall back to eager's generator so the outputs compare): the "captured" column is
its time per step, and "same output" whether it reproduced the eager loop.

    PYTHONPATH=. python benchmarks/bench_scheduler_overhead.py [--batch_size 128] [--steps 50] [--out ...]
"""

import argparse
import json
import os
import time

import torch
from common import run_header, synchronize
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, ScoreSdeVeScheduler

from diffusers_scorekit import (
    AnnealedLangevinScheduler,
    PredictorCorrectorScheduler,
    ProbabilityFlowODEScheduler,
    VEEulerMaruyamaScheduler,
    VPEulerMaruyamaScheduler,
)

DDPM_CONFIG = DDPMScheduler().config


def scorekit_schedulers():
    return {
        "scorekit AnnealedLangevin": AnnealedLangevinScheduler(num_annealed_steps=1),
        "scorekit VEEulerMaruyama": VEEulerMaruyamaScheduler(),
        "scorekit VPEulerMaruyama": VPEulerMaruyamaScheduler.from_config(DDPM_CONFIG),
        "scorekit PC (RD + Langevin)": PredictorCorrectorScheduler(),
        "scorekit PC (ancestral)": PredictorCorrectorScheduler.from_config(DDPM_CONFIG, predictor="ancestral", corrector="none"),
        "scorekit PF-ODE (DPM-Solver++ 2M)": ProbabilityFlowODEScheduler.from_config(DDPM_CONFIG),
        "scorekit PF-ODE (Heun)": ProbabilityFlowODEScheduler.from_config(DDPM_CONFIG, solver="heun"),
    }


def diffusers_schedulers():
    return {
        "diffusers DDPM": DDPMScheduler(),
        "diffusers Euler": EulerDiscreteScheduler.from_config(DDPM_CONFIG),
        "diffusers DPM-Solver multistep": DPMSolverMultistepScheduler.from_config(DDPM_CONFIG),
    }


def time_plain_loop(scheduler, sample, model_output, steps, device, generator):
    """Microseconds per ``scale_model_input`` + ``step`` over one full plain-loop pass of ``steps`` levels (after a warm-up pass)."""
    for _ in range(2):
        scheduler.set_timesteps(steps, device=device)
        x = sample.clone()
        synchronize(device)
        start = time.perf_counter()
        for t in scheduler.timesteps:
            scheduler.scale_model_input(x, t)  # part of each step's scheduler work in the plain loop
            x = scheduler.step(model_output, t, x, generator=generator).prev_sample
        synchronize(device)
        elapsed = time.perf_counter() - start
    return elapsed / len(scheduler.timesteps) * 1e6


def time_captured_loop(scheduler, sample, model_output, steps, device):
    """``(microseconds per step, same output as eager)`` for the whole loop under CUDA graphs."""
    import torch._inductor.config

    torch._inductor.config.fallback_random = True

    def loop(x):
        for t in scheduler.timesteps:
            x = scheduler.step(model_output, t, x).prev_sample
        return x

    def run(fn):
        scheduler.set_timesteps(steps, device=device)
        torch.manual_seed(0)
        synchronize(device)
        start = time.perf_counter()
        x = fn(sample)
        synchronize(device)
        return x.clone(), time.perf_counter() - start

    expected, _ = run(loop)
    captured = torch.compile(loop, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # compile, record the graph, first replay
        run(captured)
    x, elapsed = run(captured)
    return elapsed / len(scheduler.timesteps) * 1e6, bool(torch.equal(x, expected))


def time_score_sde_ve(sample, model_output, steps, device, generator):
    """ScoreSdeVe as its pipeline runs it: step_correct then step_pred per level (two calls, two model outputs)."""
    scheduler = ScoreSdeVeScheduler()
    for _ in range(2):
        scheduler.set_timesteps(steps, device=device)
        scheduler.set_sigmas(steps)
        x = sample.clone()
        synchronize(device)
        start = time.perf_counter()
        for t in scheduler.timesteps:
            x = scheduler.step_correct(model_output, x, generator=generator).prev_sample
            x = scheduler.step_pred(model_output, t, x, generator=generator).prev_sample
        synchronize(device)
        elapsed = time.perf_counter() - start
    return elapsed / (2 * steps) * 1e6


def measure(device, batch_size: int, steps: int, capture_steps: int = None, should_stop=lambda: False,
            on_row=lambda row: None):
    """The rows of one device: every scheduler eager (ratios to diffusers' Euler), then, on CUDA, each scorekit
    loop of ``capture_steps`` levels (default ``steps``; 0: none) captured. ``should_stop()`` is asked before each
    captured loop (a compile takes seconds), and ``on_row(row)`` is told each time a row is added or completed."""
    generator = torch.Generator(device).manual_seed(0)
    shape = (batch_size, 3, 32, 32)
    sample = torch.randn(shape, generator=generator, device=device)
    model_output = 0.1 * torch.randn(shape, generator=generator, device=device)
    schedulers = {**scorekit_schedulers(), **diffusers_schedulers()}
    timings = {name: time_plain_loop(scheduler, sample, model_output, steps, device, generator)
               for name, scheduler in schedulers.items()}
    timings["diffusers ScoreSdeVe (pred + corr)"] = time_score_sde_ve(sample, model_output, steps, device, generator)
    reference = timings["diffusers Euler"]
    rows = []
    for name, microseconds in timings.items():
        rows.append({"device": device.type, "scheduler": name, "us_per_step": microseconds,
                     "ratio_to_diffusers_euler": microseconds / reference,
                     "captured_us_per_step": None, "captured_same_output": None})
        on_row(rows[-1])
    capture_steps = steps if capture_steps is None else capture_steps
    if device.type == "cuda" and capture_steps:
        for row in rows:
            if row["scheduler"].startswith("scorekit"):
                if should_stop():
                    break
                row["captured_us_per_step"], row["captured_same_output"] = time_captured_loop(
                    schedulers[row["scheduler"]], sample, model_output, capture_steps, device)
                on_row(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="noise levels per timed loop")
    parser.add_argument("--out", default="benchmarks/results/scheduler_overhead.json")
    args = parser.parse_args()

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = [row for device in devices for row in measure(device, args.batch_size, args.steps)]

    print(f"batch {args.batch_size} x 3 x 32 x 32, float32, {args.steps} levels per loop")
    print("| device | scheduler | µs / step | ratio to diffusers Euler | captured µs / step | same output |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        captured_us = "-" if row["captured_us_per_step"] is None else f"{row['captured_us_per_step']:.1f}"
        same = "-" if row["captured_same_output"] is None else ("yes" if row["captured_same_output"] else "NO")
        print(f"| {row['device']} | {row['scheduler']} | {row['us_per_step']:.0f} | "
              f"{row['ratio_to_diffusers_euler']:.2f} | {captured_us} | {same} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({**run_header(devices[-1]), "batch_size": args.batch_size, "steps": args.steps, "rows": rows},
                  f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
