"""What several benchmarks share: the reference UNet layout, device timing, and the JSON header."""

import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import diffusers
import torch

# channels per level of diffusers' google/ddpm-cifar10-32 UNet2DModel (35.7 M parameters at 3 channels), the
# network issue #6 times: training.build_unet2d(32, channels, block_out_channels=...) builds it (its 32-px preset
# has that model's block types); "small" and "tiny" are the same shape of network for a CPU and a smoke run
UNET_CHANNELS = {"ddpm_cifar10": (128, 256, 256, 256), "small": (32, 64, 64, 64), "tiny": (16, 32, 32, 32)}


def write_results(path, results: dict) -> None:
    """``results`` as JSON at ``path`` (its folder made if needed), and say so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {path}")


def levels_for_nfe(scheduler, nfe: int) -> int:
    """The ``num_inference_steps`` of the finest grid with at most ``nfe`` model calls (Heun makes an odd number,
    predictor-corrector an even one)."""
    best = 1
    for steps in range(1, nfe + 1):
        scheduler.set_timesteps(steps)
        if len(scheduler.timesteps) <= nfe:
            best = steps
    return best


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 1) -> float:
    """Seconds per call of ``fn`` (device work included), the best of ``repeats`` calls."""
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def run_header(device: torch.device) -> dict:
    """Where and when a result was measured, for the JSON files."""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "device": device_name(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }
