"""Training data through ``datasets`` (issue #13): peak memory of a training run as its image folder grows, and
images/s the data pipeline feeds with 0 and N DataLoader workers.

1. Peak RSS: ``--sizes`` folders of generated ``--image_size``-px RGB PNGs (random pixels); each is trained on for
   ``--steps`` steps (a tiny NCSN at ``--resolution``, batch 8, random crops and flips) in a fresh process, whose
   peak resident set (``ru_maxrss``, DataLoader workers included) is reported. With ``--compare_checkout`` (a
   checkout of the code before this change, which decoded the whole folder into one uint8 tensor) the same runs
   are made with that code, for contrast.
2. Feed rate: ``training_batches`` of the largest folder (batch ``--batch_size``, random crop and flip, decoded
   from PNG) read for ``--batches`` micro-batches with 0 and with each of ``--workers`` workers, interleaved and
   repeated ``--repeats`` times (best of each); no model, so this is what the data side can feed.

    PYTHONPATH=. python benchmarks/bench_training_data.py --compare_checkout /path/to/old/checkout
    PYTHONPATH=. python benchmarks/bench_training_data.py --sizes 2000 20000 --workers 1 2
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import run_header

REPO_ROOT = Path(__file__).resolve().parent.parent


def make_folder(root: Path, count: int, size: int) -> Path:
    """``count`` random ``size``-px RGB PNGs in 10 class-free subfolders of 1,000 (kept between runs)."""
    rng = np.random.default_rng(count)
    for index in range(count):
        path = root / f"{index // 1000:03d}" / f"{index:06d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return root


def child(argv) -> None:
    """Train (in this process) and print the peak RSS in MiB: this process's, and its workers' if any."""
    from diffusers_scorekit import training

    start = time.perf_counter()
    training.main(training.parse_args(argv))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": round(rss, 1), "worker_peak_rss_mib": round(workers, 1),
                      "seconds": round(time.perf_counter() - start, 1)}))


def peak_rss(folder: Path, args, output_dir: Path, checkout: Path, workers: int) -> dict:
    argv = ["--train_data_dir", str(folder), "--resolution", str(args.resolution), "--block_out_channels", "8,8",
            "--train_batch_size", "8", "--max_train_steps", str(args.steps), "--checkpointing_steps", "100000",
            "--lr_warmup_steps", "1", "--num_inference_steps", "2", "--num_eval_samples", "4",
            "--eval_likelihood_samples", "0", "--random_flip", "--report_to", "none", "--output_dir", str(output_dir)]
    if checkout == REPO_ROOT:
        argv += ["--random_crop", "--dataloader_num_workers", str(workers), "--cache_dir", str(args.cache_dir)]
    else:
        argv += ["--center_crop"]
    env = dict(os.environ, PYTHONPATH=f"{checkout}{os.pathsep}{Path(__file__).parent}", OMP_NUM_THREADS="1",
               HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(args.cache_dir))
    result = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, env=env,
                            cwd=REPO_ROOT)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def feed_rate(folder: Path, args, workers: int) -> float:
    """Images/s of ``training_batches`` over ``--batches`` micro-batches (the DataLoader's start-up included)."""
    from diffusers_scorekit import training

    run = training.parse_args(["--train_data_dir", str(folder), "--resolution", str(args.resolution),
                               "--train_batch_size", str(args.batch_size), "--random_crop", "--random_flip",
                               "--dataloader_num_workers", str(workers), "--cache_dir", str(args.cache_dir),
                               "--max_train_steps", str(args.batches)])
    data = training.load_data(run)
    start = time.perf_counter()
    batches = training.training_batches(run, data, 1, 0, start=0)
    for _ in range(args.batches):
        next(batches)
    return args.batches * args.batch_size / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000], help="images per folder")
    parser.add_argument("--image_size", type=int, default=64, help="side of the generated PNGs")
    parser.add_argument("--resolution", type=int, default=48, help="training resolution (random crops)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per peak-RSS run")
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="worker counts compared with 0")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30, help="micro-batches per feed-rate measurement")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compare_checkout", type=Path, help="a checkout of the in-memory loader, for contrast")
    parser.add_argument("--data_dir", type=Path, default=Path(tempfile.gettempdir()) / "scorekit-bench-data")
    parser.add_argument("--out", default="benchmarks/results/training_data.json")
    args = parser.parse_args(argv)
    args.cache_dir = args.data_dir / "hf-cache"

    results = {**run_header(torch.device("cpu")), "load_average": os.getloadavg(),
               "image_size": args.image_size, "resolution": args.resolution, "rss": [], "feed": []}
    checkouts = [("datasets (this code)", REPO_ROOT)]
    if args.compare_checkout:
        checkouts.append(("in memory (before)", args.compare_checkout.resolve()))
    print(f"{'images':>7} {'loader':<22} {'workers':>7} {'peak RSS MiB':>12} {'workers MiB':>11} {'seconds':>8}")
    for count in args.sizes:
        folder = make_folder(args.data_dir / f"images-{count}-{args.image_size}px", count, args.image_size)
        for name, checkout in checkouts:
            for workers in ([0] + args.workers[-1:] if checkout == REPO_ROOT else [0]):
                with tempfile.TemporaryDirectory() as output_dir:
                    row = {"images": count, "loader": name, "workers": workers,
                           **peak_rss(folder, args, Path(output_dir), checkout, workers)}
                results["rss"].append(row)
                print(f"{count:>7} {name:<22} {workers:>7} {row['peak_rss_mib']:>12.0f} "
                      f"{row['worker_peak_rss_mib']:>11.0f} {row['seconds']:>8.0f}", flush=True)

    largest = args.data_dir / f"images-{max(args.sizes)}-{args.image_size}px"
    best = {workers: 0.0 for workers in [0] + args.workers}
    for _ in range(args.repeats):
        for workers in best:  # interleaved, so that changes in the machine's load hit every count alike
            best[workers] = max(best[workers], feed_rate(largest, args, workers))
    print(f"\nimages/s fed (batch {args.batch_size}, {args.image_size}-px PNG -> {args.resolution}-px random crop "
          f"and flip, best of {args.repeats}):")
    for workers, rate in best.items():
        results["feed"].append({"workers": workers, "images_per_second": round(rate, 1),
                                "ratio_to_0_workers": round(rate / best[0], 2)})
        print(f"  {workers} workers: {rate:8.0f} images/s ({rate / best[0]:.2f}x)")
    results["load_average_after"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    else:
        main()
