"""Probability-flow log-likelihood (bits/dim, NFE, wall time) against score_sde's way of computing it (issue #4).

Two paths solve the same augmented ODE ``[x, delta_log_p]`` with the same tolerances and the same Hutchinson
(Rademacher) probe:

- ``scorekit``: ``diffusers_scorekit.likelihood.log_likelihood``: its Dormand-Prince 5(4) solver
  (``ode_solver``, PI step-size control) on the device, one network forward and one vector-Jacobian product per
  evaluation.
- ``score_sde``: what score_sde's ``likelihood.get_likelihood_fn`` does: scipy ``solve_ivp`` (RK45, the same
  Dormand-Prince stages) on a flattened float64 NumPy state, copying it to the device and back at every
  evaluation, with the drift and the divergence computed by separate network calls (two forwards per evaluation).

Models: the exact score of a Gaussian mixture (the oracle, whose exact bits/dim are known) and a
``UNet2DModel`` with random weights on dequantised 8-bit images (size set by flags).

    PYTHONPATH=. python benchmarks/bench_likelihood.py [--quick] [--device cpu] [--repeats 3] [--out benchmarks/results/likelihood.json]
"""

import argparse
import datetime
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy import integrate

from diffusers_scorekit.likelihood import (
    bits_per_dim,
    dequantize_and_scale,
    log_likelihood,
    probability_flow_drift,
)
from diffusers_scorekit.mixture import GaussianMixture, marginal_at_timestep
from diffusers_scorekit.score_function import ScoreFunction
from diffusers_scorekit.sde import VPSDE, default_sampling_eps


def score_sde_log_likelihood(score_fn, x, probe, rtol, atol, sampling_eps, data):
    """score_sde's likelihood: scipy RK45 on a flat float64 NumPy state, a host round trip per evaluation."""
    shape, batch = x.shape, x.shape[0]

    def drift_fn(sample, t):
        with torch.no_grad():
            return probability_flow_drift(score_fn, sample, t)

    def divergence_fn(sample, t):
        with torch.enable_grad():
            sample = sample.detach().requires_grad_(True)
            projected = torch.sum(probability_flow_drift(score_fn, sample, t) * probe)
            (vjp,) = torch.autograd.grad(projected, sample)
        return (vjp * probe).flatten(1).sum(1)

    def ode_func(t, state):
        sample = torch.from_numpy(state[:-batch]).reshape(shape).to(x.device, x.dtype)
        drift = drift_fn(sample, t).flatten().cpu().numpy().astype(np.float64)
        divergence = divergence_fn(sample, t).cpu().numpy().astype(np.float64)
        return np.concatenate([drift, divergence])

    start = np.concatenate([x.flatten().cpu().numpy().astype(np.float64), np.zeros(batch)])
    solution = integrate.solve_ivp(ode_func, (sampling_eps, 1.0), start, rtol=rtol, atol=atol, method="RK45")
    end = solution.y[:, -1]
    latent = torch.from_numpy(end[:-batch]).reshape(shape)
    total = score_fn.sde.prior_log_prob(latent) + torch.from_numpy(end[-batch:])
    return {"bits_per_dim": bits_per_dim(total, x[0].numel(), data), "nfe": int(solution.nfev)}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_both(score_fn, x, rtol, atol, data, device, repeats=1, seed=0):
    """Both paths on ``x`` with one shared Rademacher probe, ``repeats`` rounds alternating between them so
    that a change in the machine's load hits both; bits/dim are per-sample means, seconds the median round.
    CPU seconds (this process's, all threads) are kept too: on a shared machine they move less with the load."""
    eps = default_sampling_eps(score_fn.sde)
    generator = torch.Generator(device).manual_seed(seed)
    probe = (2 * torch.randint(0, 2, x.shape, generator=generator, device=device) - 1).to(x.dtype)
    seconds = {"scorekit": [], "score_sde": []}
    cpu_seconds = {"scorekit": [], "score_sde": []}
    for _ in range(repeats):
        synchronize(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        ours = log_likelihood(
            score_fn, x, rtol=rtol, atol=atol, sampling_eps=eps, data=data, generator=torch.Generator(device).manual_seed(seed)
        )
        synchronize(device)
        seconds["scorekit"].append(time.perf_counter() - started)
        cpu_seconds["scorekit"].append(time.process_time() - cpu_started)

        started, cpu_started = time.perf_counter(), time.process_time()
        reference = score_sde_log_likelihood(score_fn, x, probe, rtol, atol, eps, data)
        synchronize(device)
        seconds["score_sde"].append(time.perf_counter() - started)
        cpu_seconds["score_sde"].append(time.process_time() - cpu_started)
    return {
        "scorekit": {"bits_per_dim": ours.bits_per_dim.mean().item(), "nfe": ours.nfe, "forwards": ours.nfe, "seconds": float(np.median(seconds["scorekit"])), "rounds_s": seconds["scorekit"], "cpu_rounds_s": cpu_seconds["scorekit"]},
        "score_sde": {
            "bits_per_dim": reference["bits_per_dim"].mean().item(),
            "nfe": reference["nfe"],
            "forwards": 2 * reference["nfe"],
            "seconds": float(np.median(seconds["score_sde"])),
            "rounds_s": seconds["score_sde"],
            "cpu_rounds_s": cpu_seconds["score_sde"],
        },
        "round_speedups": [theirs / ours_s for ours_s, theirs in zip(seconds["scorekit"], seconds["score_sde"])],
        "round_cpu_speedups": [theirs / ours_s for ours_s, theirs in zip(cpu_seconds["scorekit"], cpu_seconds["score_sde"])],
        "load_average": os.getloadavg(),
    }


def oracle_case(args, device):
    """The 2-D ring's exact score on VP; its exact bits/dim at t = eps is known."""
    sde, mixture = VPSDE(), GaussianMixture.ring()
    eps = default_sampling_eps(sde)

    def model(x, timestep):
        a, sigma = marginal_at_timestep(sde, timestep, "continuous")
        return mixture.model_output(x.cpu(), a, sigma, "epsilon").to(x.device)

    generator = torch.Generator().manual_seed(0)
    a, sigma = (value.item() for value in sde.marginal(eps))
    x_0 = mixture.sample(args.oracle_samples, generator)
    x = a * x_0 + sigma * torch.randn(x_0.shape, generator=generator, dtype=torch.float64)
    exact = (-mixture.log_prob(x, a, sigma) / (2 * math.log(2))).mean().item()
    result = time_both(ScoreFunction(model, sde, "epsilon", "continuous"), x.to(device), args.rtol, args.atol, "continuous", device, args.repeats)
    return {"model": f"oracle ring, {args.oracle_samples} samples", "exact_bits_per_dim": exact, **result}


def unet_case(args, device):
    """A random-weight ``UNet2DModel`` (epsilon, continuous ``t``) on dequantised random 8-bit images.

    Conditioned on ``t`` in [0, 1] its output is smooth in time; on DDPM's 0..999 the random sinusoidal time
    embedding oscillates and the adaptive solver needs thousands of steps, which measures nothing useful.
    """
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    channels = tuple(int(c) for c in args.channels.split(","))
    unet = UNet2DModel(
        sample_size=args.image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        layers_per_block=args.layers_per_block,
        down_block_types=("DownBlock2D",) * len(channels),
        up_block_types=("UpBlock2D",) * len(channels),
        norm_num_groups=min(32, channels[0]),
    ).to(device).eval()
    sde = VPSDE()
    images = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), generator=torch.Generator().manual_seed(0))
    x = dequantize_and_scale(images, torch.Generator().manual_seed(1)).to(device)
    result = time_both(ScoreFunction(unet, sde, "epsilon", "continuous"), x, args.rtol, args.atol, "8bit", device, args.repeats)
    parameters = sum(p.numel() for p in unet.parameters())
    name = f"UNet2DModel {args.image_size}x{args.image_size}x3, channels {channels}, {parameters / 1e6:.2f}M params, batch {args.batch_size}"
    return {"model": name, "exact_bits_per_dim": None, **result}


def print_table(rows):
    header = "| model | device | path | bits/dim | exact | NFE | forwards | median wall s | speed-up (per round) | CPU-time speed-up (per round) |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for row in rows:
        exact = "-" if row["exact_bits_per_dim"] is None else f"{row['exact_bits_per_dim']:.4f}"
        speedup = row["score_sde"]["seconds"] / row["scorekit"]["seconds"]
        for path in ("scorekit", "score_sde"):
            r = row[path]
            rounds = ", ".join(f"{value:.2f}" for value in row.get("round_speedups", []))
            speed = f"{speedup:.2f}x ({rounds})" if path == "scorekit" else ""
            cpu_rounds = row.get("round_cpu_speedups", [])
            cpu = f"{np.median(cpu_rounds):.2f}x ({', '.join(f'{value:.2f}' for value in cpu_rounds)})" if path == "scorekit" and cpu_rounds else ""
            print(f"| {row['model']} | {row['device']} | {path} | {r['bits_per_dim']:.4f} | {exact} | {r['nfe']} | {r['forwards']} | {r['seconds']:.2f} | {speed} | {cpu} |")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", action="append", help="cpu and/or cuda (default: cpu, plus cuda when available)")
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--oracle-samples", type=int, default=4096)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", default="32,64", help="UNet block_out_channels, comma-separated")
    parser.add_argument("--layers-per-block", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 on a shared or small CPU avoids spin-waits)")
    parser.add_argument("--skip-unet", action="store_true")
    parser.add_argument("--repeats", type=int, default=1, help="rounds per case, alternating the two paths (median time)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    parser.add_argument("--out", default="benchmarks/results/likelihood.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.oracle_samples, args.image_size, args.channels, args.batch_size = 256, 16, "16,32", 1
    return args


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])

    rows = []
    for device in map(torch.device, devices):
        cases = [oracle_case] + ([] if args.skip_unet else [unet_case])
        for case in cases:
            rows.append({"device": str(device), **case(args, device)})
            print(json.dumps(rows[-1]), flush=True)
    print_table(rows)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name()
    report = {"date": datetime.date.today().isoformat(), "machine": machine, "args": vars(args), "rows": rows}
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
