"""End-to-end sampling time of the pipeline against NFE x the bare UNet forward (issue #6).

The UNet is diffusers' DDPM CIFAR-10 ``UNet2DModel`` layout (35.7 M parameters, `--layout ddpm_cifar10`) or a
small one of the same shape for CPUs (`--layout small`). For each sampler the pipeline draws ``--batch_size``
samples with ``--nfe`` model calls (Heun: the largest odd number below) (output_type "pt": the decoding to PIL is not the sampler's cost),
and the table gives its time over ``nfe`` bare forwards of the same UNet on the same batch, timed in the same
run: 1.00 is a sampler that costs nothing. Target on a GPU: within 3 % (ratio <= 1.03) in bf16 at NFE 50.
diffusers' DDPMPipeline with DDIM and DPM-Solver multistep, on the same UNet, is timed as the reference.

    PYTHONPATH=. python benchmarks/bench_pipeline_overhead.py                 # CUDA: ddpm_cifar10, bf16, batch 128
    PYTHONPATH=. python benchmarks/bench_pipeline_overhead.py --layout small --batch_size 16 --nfe 10   # a CPU
"""

import argparse
import json
import os

import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler

from common import UNET_CHANNELS, levels_for_nfe, run_header, timed
from diffusers_scorekit import (
    PredictorCorrectorScheduler,
    ProbabilityFlowODEScheduler,
    ScoreSDEPipeline,
    VPEulerMaruyamaScheduler,
    training,
)

DDPM_CONFIG = DDPMScheduler().config
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def scorekit_schedulers():
    return {
        "scorekit PF-ODE (DPM-Solver++ 2M)": ProbabilityFlowODEScheduler.from_config(DDPM_CONFIG),
        "scorekit PF-ODE (Heun)": ProbabilityFlowODEScheduler.from_config(DDPM_CONFIG, solver="heun"),
        "scorekit VP Euler-Maruyama": VPEulerMaruyamaScheduler.from_config(DDPM_CONFIG),
        "scorekit PC (ancestral = DDPM)": PredictorCorrectorScheduler.from_config(
            DDPM_CONFIG, predictor="ancestral", corrector="none"
        ),
        "scorekit PC (EM + Langevin)": PredictorCorrectorScheduler.from_config(
            DDPM_CONFIG, predictor="euler_maruyama", corrector="langevin"
        ),
    }


def measure(layout: str, batch_size: int, nfe: int, dtype: torch.dtype, device: torch.device, compile: bool = False,
            repeats: int = 3, should_stop=lambda: False, on_row=lambda row: None):
    """Times ``nfe`` bare forwards of the UNet, then each sampler's pipeline at that NFE (``should_stop()`` is
    asked before each; ``on_row(row)`` told after each). Returns the UNet, the seconds of one forward and the rows."""
    unet = training.build_unet2d(32, 3, block_out_channels=UNET_CHANNELS[layout]).to(device=device, dtype=dtype).eval()
    model = torch.compile(unet) if compile else unet
    shape = (batch_size, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = torch.randn(shape, device=device, dtype=dtype)
    t = torch.full((batch_size,), 500, device=device)

    @torch.no_grad()
    def bare_forwards():
        for _ in range(nfe):
            model(x, t)

    bare_forwards()  # warm-up (and compilation)
    forward_seconds = timed(bare_forwards, device, repeats) / nfe

    rows = []

    def time_pipeline(name, pipe, steps, nfe):
        pipe.set_progress_bar_config(disable=True)
        run = lambda: pipe(batch_size=batch_size, num_inference_steps=steps, output_type="pt",  # noqa: E731
                           generator=torch.Generator(device).manual_seed(0))
        run()
        seconds = timed(run, device, repeats)
        rows.append({"sampler": name, "num_inference_steps": steps, "nfe": nfe, "seconds": seconds,
                     "ratio_to_nfe_forwards": seconds / (nfe * forward_seconds)})
        on_row(rows[-1])

    for name, scheduler in scorekit_schedulers().items():
        if should_stop():
            return unet, forward_seconds, rows
        steps = levels_for_nfe(scheduler, nfe)
        scheduler.set_timesteps(steps)
        time_pipeline(name, ScoreSDEPipeline(unet=model, scheduler=scheduler), steps, len(scheduler.timesteps))
    for name, scheduler_cls in (("diffusers DDIM", DDIMScheduler), ("diffusers DPM-Solver multistep", DPMSolverMultistepScheduler)):
        if should_stop():
            break
        time_pipeline(name, DDPMPipeline(unet=model, scheduler=scheduler_cls.from_config(DDPM_CONFIG)), nfe, nfe)
    return unet, forward_seconds, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=sorted(UNET_CHANNELS), default="ddpm_cifar10")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--nfe", type=int, default=50)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (for both sides)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row; the best is kept")
    parser.add_argument("--out", default="benchmarks/results/pipeline_overhead.json")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    unet, forward_seconds, rows = measure(args.layout, args.batch_size, args.nfe, dtype, device, args.compile,
                                          args.repeats)

    header = run_header(device)
    print(f"{header['device']}, {args.layout} UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M), "
          f"{str(dtype).replace('torch.', '')}, batch {args.batch_size}, NFE {args.nfe}: "
          f"bare forward {forward_seconds * 1e3:.2f} ms, x NFE = {args.nfe * forward_seconds:.3f} s")
    print("| sampler | NFE | seconds | ratio to NFE x forward |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['sampler']} | {row['nfe']} | {row['seconds']:.3f} | {row['ratio_to_nfe_forwards']:.3f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({**header, "layout": args.layout, "dtype": str(dtype), "batch_size": args.batch_size, "nfe": args.nfe,
                   "compile": args.compile, "forward_seconds": forward_seconds, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
