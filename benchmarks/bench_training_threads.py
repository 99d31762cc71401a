"""Steps/s of ``scorekit train``'s update on the CPU with one torch thread against torch's default thread count
(issue #12), to choose ``--num_threads``'s default.

Two workloads, each with ``scorekit train``'s defaults: the 2-D toy (two moons, a 128-wide ScoreMLP with 3 blocks,
batch 128) and a small image model (an NCSN with block_out_channels 32,64,64 on 28 px, batch 64, as the Fashion-MNIST
demo). The thread counts are interleaved (A/B/A/B ...) in one process with ``--rounds`` rounds of ``--steps`` timed
steps each, so load from other programs affects both alike; the table gives the median of each and the ratio.

    PYTHONPATH=. python benchmarks/bench_training_threads.py
"""

import argparse
import json
import os
import statistics
import time

import torch
from accelerate import Accelerator

from common import run_header
from diffusers_scorekit import training

WORKLOADS = {
    "toy (two moons, ScoreMLP 128x3, batch 128)": ["--dataset", "two_moons", "--num_toy_samples", "4000"],
    "image (NCSN 32,64,64, 28 px, batch 64)": ["--dataset", "fashion_mnist", "--model", "ncsn",
                                               "--block_out_channels", "32,64,64", "--train_batch_size", "64"],
}


def steps_per_second(args, accelerator, state, data, batches, start: int, steps: int) -> float:
    begin = time.perf_counter()
    for step in range(start, start + steps):
        training.train_step(args, accelerator, state, data, batches, step)
    return steps / (time.perf_counter() - begin)


def fake_images(args) -> training.TrainingData:
    """Random 28 px images: the timing does not depend on the pixels (and Fashion-MNIST may be absent)."""
    images = torch.randint(0, 256, (512, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return training.TrainingData(images, None, images[:16], "random 28 px images")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--image_steps", type=int, default=5)
    parser.add_argument("--output", default="benchmarks/results/training_threads.json")
    options = parser.parse_args()
    default_threads = torch.get_num_threads()
    results = {**run_header(torch.device("cpu")), "default_threads": default_threads,
               "load_average_at_start": os.getloadavg(), "rows": []}
    print(f"torch default threads {default_threads}, load average {os.getloadavg()}")
    print(f"{'workload':<44} {'1 thread':>10} {f'{default_threads} threads':>10} {'ratio':>7}")
    for name, argv in WORKLOADS.items():
        args = training.parse_args([*argv, "--output_dir", "/tmp/unused", "--report_to", "none", "--speed", "none"])
        data = training.load_toy(args) if args.dataset == "two_moons" else fake_images(args)
        accelerator = Accelerator(cpu=True)
        state = training.prepare_training(args, accelerator, training.build_model(args, data),
                                          training.training_sde(args))
        batches = training.training_batches(args, data, 1, 0, start=0)
        steps = options.steps if args.dataset == "two_moons" else options.image_steps
        rates = {1: [], default_threads: []}
        step = 0
        steps_per_second(args, accelerator, state, data, batches, step, 2)  # warm-up
        for _ in range(options.rounds):
            for threads in rates:
                torch.set_num_threads(threads)
                rates[threads].append(steps_per_second(args, accelerator, state, data, batches, step, steps))
                step += steps
        torch.set_num_threads(default_threads)
        one, many = statistics.median(rates[1]), statistics.median(rates[default_threads])
        print(f"{name:<44} {one:>10.1f} {many:>10.1f} {one / many:>7.2f}")
        results["rows"].append({"workload": name, "steps_per_second": {str(k): v for k, v in rates.items()},
                                "median_1_thread": one, f"median_{default_threads}_threads": many,
                                "ratio_1_to_default": one / many})
    results["load_average_at_end"] = os.getloadavg()
    print(f"load average at the end {os.getloadavg()} (steps/s, median of {options.rounds} interleaved rounds)")
    with open(options.output, "w") as file:
        json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
