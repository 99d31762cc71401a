"""Images/s of one training step on the DDPM CIFAR-10 UNet: the scorekit training script's step against the step
of diffusers' ``train_unconditional.py``, with each speed switch of the training script measured (issue #6).

The network is a ``UNet2DModel`` in the DDPM CIFAR-10 layout (32 px, 3 channels, block_out_channels (128, 256,
256, 256), layers_per_block 2, attention at 16 px; 35.7 M parameters), built for both by the training script's
``build_unet2d``; batch 128, bf16 autocast on CUDA. A step is forward, backward, gradient clipping, AdamW, the
learning-rate schedule, zero_grad and (unless ``--no-ema``) the EMA update.

- reference: ``train_ddpm_baseline.ddpm_step``, train_unconditional's step written from its description:
  the batch copied to the device as accelerate's data loader does, ``DDPMScheduler.add_noise`` at random integer
  timesteps, ``model(noisy, timesteps).sample``, MSE on the noise, ``accelerator.backward``, clipping at 1,
  AdamW (lr 1e-4, weight decay 1e-6), ``lr_scheduler.step``, ``zero_grad``, EMA with warm-up, and the loss read
  on the host every step for the logs.
- scorekit: ``training.train_step``, the update the training script runs (its batch, its times and noise drawn on
  the host, ``ScoreFunction`` and ``denoising_score_matching_loss`` with the defaults of a ``--model unet2d --sde
  vp`` run: epsilon prediction, discrete timesteps, continuous time, the sigma^2 weighting), set up by
  ``training.prepare_training``, with every speed switch off, each alone, and all on (what ``--speed auto``
  turns on on CUDA).

Every configuration gets a fresh model, optimizer and ``Accelerator``. The first ``--warmup`` steps (compilation
included) are timed separately and excluded; then ``--steps`` steps are timed between two device
synchronisations. The reference is timed first and last, and ratios are to the mean of the two. On the CPU,
bf16 autocast is off unless ``--mixed_precision bf16`` is given, TF32 is left out (CUDA only) and so is
torch.compile unless ``--compile_on_cpu`` (inductor takes minutes on a few cores); the table says what was left
out of each row.

    PYTHONPATH=. python benchmarks/bench_training_step.py                 # CUDA: the issue's table
    PYTHONPATH=. python benchmarks/bench_training_step.py --small         # CPU: a small UNet, batch 8
"""

import argparse
import gc
import json
import os
import time

import accelerate
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from common import UNET_CHANNELS, device_name, run_header, synchronize
from diffusers_scorekit import training
from train_ddpm_baseline import ddpm_step, prepare_ddpm_training
from train_ddpm_baseline import parse_args as baseline_args

CIFAR10_LAYOUT = UNET_CHANNELS["ddpm_cifar10"]
SMALL = {"batch_size": 8, "block_out_channels": (16, 32, 32, 32), "warmup": 2, "steps": 10}
FULL = {"batch_size": 128, "block_out_channels": CIFAR10_LAYOUT, "warmup": 10, "steps": 50}
# the scorekit configurations: name -> the speed switches turned on (all others explicitly off)
CONFIGS = {
    "none": (),
    "channels_last": ("channels_last",),
    "allow_tf32": ("allow_tf32",),
    "fused_optimizer": ("fused_optimizer",),
    "torch_compile": ("torch_compile",),
    "all": training.SPEED_SWITCHES,
}
LABELS = {"all": "all (what --speed auto turns on on CUDA)"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true",
                        help=f"a quick CPU run: batch {SMALL['batch_size']}, block_out_channels "
                             f"{SMALL['block_out_channels']}, {SMALL['warmup']} warm-up and {SMALL['steps']} timed "
                             "steps (options given explicitly still win)")
    parser.add_argument("--batch_size", type=int, default=None, help=f"default {FULL['batch_size']}")
    parser.add_argument("--block_out_channels", type=training.int_tuple, default=None,
                        help="the UNet's channels per level, 4 levels (default: DDPM CIFAR-10's 128,256,256,256)")
    parser.add_argument("--layers_per_block", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=None, help=f"untimed steps first (default {FULL['warmup']})")
    parser.add_argument("--steps", type=int, default=None, help=f"timed steps (default {FULL['steps']})")
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                        help="default: bf16 on CUDA, no on the CPU")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="include the EMA update in both steps (train_unconditional --use_ema)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated scorekit configurations among: {', '.join(CONFIGS)}")
    parser.add_argument("--compile_on_cpu", action="store_true", help="time torch.compile on the CPU too")
    parser.add_argument("--out", default="benchmarks/results/training_step.json")
    args = parser.parse_args(argv)
    for name, value in (SMALL if args.small else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.configs = [name for name in args.configs.split(",") if name]
    unknown = [name for name in args.configs if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown --configs {unknown}; choose among {list(CONFIGS)}.")
    if len(args.block_out_channels) != 4:
        parser.error(f"--block_out_channels needs 4 levels (the 32-px layout), got {args.block_out_channels}.")
    return args


def time_steps(step, warmup: int, steps: int, device):
    """Runs ``step(i)`` for ``warmup`` then ``steps`` indices; returns the warm-up seconds and the seconds per
    timed step, each measured between device synchronisations."""
    synchronize(device)
    start = time.perf_counter()
    for i in range(warmup):
        step(i)
    synchronize(device)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    synchronize(device)
    return warm, (time.perf_counter() - start) / steps


def synthetic_images(args) -> training.TrainingData:
    """Random 32-px RGB images in memory, enough for every timed step to draw a fresh batch."""
    generator = torch.Generator().manual_seed(0)
    count = args.batch_size * max(4, args.warmup + args.steps)
    examples = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return training.TrainingData(examples=examples, labels=None, held_out=examples,
                                 description=f"{count} random 32-px images")


def scorekit_args(args, switches_on):
    """The training script's arguments for a VP UNet2DModel run with exactly ``switches_on`` speed switches."""
    argv = ["--train_data_dir", "(synthetic images in memory)", "--model", "unet2d", "--sde", "vp",
            "--resolution", "32", "--block_out_channels", ",".join(map(str, args.block_out_channels)),
            "--layers_per_block", str(args.layers_per_block), "--train_batch_size", str(args.batch_size),
            "--report_to", "none", "--speed", "none"]
    argv += [f"--{name}" if name in switches_on else f"--no-{name}" for name in training.SPEED_SWITCHES]
    return training.parse_args(argv + (["--use_ema"] if args.ema else []))


def scorekit_step(args, switches_on, data, mixed_precision):
    """``step(i)`` running the training script's update number ``i`` with ``switches_on``, on a fresh model."""
    run = scorekit_args(args, switches_on)
    accelerator = Accelerator(mixed_precision=mixed_precision)
    training.resolve_speed(run, accelerator.device)
    set_seed(0)
    state = training.prepare_training(run, accelerator, training.build_model(run, data), training.training_sde(run))
    batches = training.training_batches(run, data, 1, 0, start=0)
    state.model.train()
    return lambda i: training.train_step(run, accelerator, state, data, batches, i)


def reference_step(args, data, mixed_precision):
    """``step(i)`` running train_unconditional's update on a fresh model of the same layout."""
    recipe = baseline_args(["--train_batch_size", str(args.batch_size), "--max_train_steps", "1000"]
                           + ([] if args.ema else ["--no-use_ema"]))
    accelerator = Accelerator(mixed_precision=mixed_precision)
    # PyTorch's defaults, whatever a scorekit configuration timed before set
    torch.backends.cuda.matmul.allow_tf32 = False
    set_seed(0)
    parts, _ = prepare_ddpm_training(recipe, accelerator, build_unet(args))
    parts.model.train()
    # a batch as train_unconditional's workers produce it (flips and scaling off the main process), copied to the
    # device in the step as accelerate's prepared data loader does
    batch = data.to_model_space(data.examples[:args.batch_size])
    return lambda i: ddpm_step(accelerator, parts, batch.to(accelerator.device), recipe.max_grad_norm)


def build_unet(args):
    """The benchmarked UNet2DModel, as the training script builds it for ``--model unet2d --sde vp``."""
    return training.build_unet2d(32, 3, block_out_channels=args.block_out_channels,
                                 layers_per_block=args.layers_per_block)


def runnable_switches(config: str, device: torch.device, compile_on_cpu: bool):
    """The switches of ``config`` that are timed on ``device``, and why the others are left out: TF32 exists on
    CUDA only, and torch.compile is left out on the CPU unless ``compile_on_cpu``."""
    switches, left_out = list(CONFIGS[config]), []
    if device.type != "cuda" and "allow_tf32" in switches:
        switches.remove("allow_tf32")
        left_out.append("TF32 left out: CUDA only")
    if device.type != "cuda" and "torch_compile" in switches and not compile_on_cpu:
        switches.remove("torch_compile")
        left_out.append("torch.compile left out on CPU (--compile_on_cpu times it)")
    return tuple(switches), "; ".join(left_out)


def release():
    gc.collect()
    torch.compiler.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plan_of(configs):
    """The rows in the order they are timed: the reference first and last, the scorekit configurations between."""
    return ([("reference (train_unconditional)", None)] + [(LABELS.get(name, name), name) for name in configs]
            + [("reference (train_unconditional), again", None)])


def measure(args, device, mixed_precision, plan, should_stop=lambda: False, on_row=lambda row: None):
    """Times each ``(label, config)`` of ``plan`` (config ``None``: the reference) on fresh models, asking
    ``should_stop()`` before each and telling ``on_row(row)`` after; then sets every row's ratio to the mean of
    the reference rows timed. Returns the rows and that mean (``None`` without a reference row)."""
    data = synthetic_images(args)
    rows = []
    for label, config in plan:
        if should_stop():
            break
        switches, note = ((), "") if config is None else runnable_switches(config, device, args.compile_on_cpu)
        row = {"step": "reference" if config is None else "scorekit", "config": label, "switches": list(switches),
               "note": note}
        rows.append(row)
        if config is not None and CONFIGS[config] and not switches:
            row["skipped"] = True
            print(f"{label}: skipped ({note})", flush=True)
            on_row(row)
            continue
        step = reference_step(args, data, mixed_precision) if config is None else \
            scorekit_step(args, switches, data, mixed_precision)
        warm, seconds = time_steps(step, args.warmup, args.steps, device)
        row.update(images_per_second=args.batch_size / seconds, ms_per_step=seconds * 1e3, warmup_seconds=warm)
        del step
        release()
        print(f"{label}: {row['images_per_second']:.1f} img/s", flush=True)
        on_row(row)

    references = [row["images_per_second"] for row in rows if row["step"] == "reference"]
    reference = sum(references) / len(references) if references else None
    for row in rows:
        if "images_per_second" in row and reference:
            row["ratio_to_reference"] = row["images_per_second"] / reference
            on_row(row)
    return rows, reference


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mixed_precision = args.mixed_precision or ("bf16" if device.type == "cuda" else "no")
    parameters = sum(p.numel() for p in build_unet(args).parameters())
    rows, reference = measure(args, device, mixed_precision, plan_of(args.configs))

    layout = f"block_out_channels {args.block_out_channels}, layers_per_block {args.layers_per_block}"
    print(f"\n{device_name(device)}; UNet2DModel {parameters / 1e6:.2f} M parameters ({layout}); batch "
          f"{args.batch_size}; mixed precision {mixed_precision}; EMA {'on' if args.ema else 'off'}; "
          f"{args.warmup} warm-up + {args.steps} timed steps")
    print("| step | speed switches | img/s | ratio to reference | ms / step | warm-up s (compile included) | note |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        if row.get("skipped"):
            print(f"| {row['step']} | {row['config']} | skipped | | | | {row['note']} |")
        else:
            print(f"| {row['step']} | {row['config']} | {row['images_per_second']:.1f} | "
                  f"{row['ratio_to_reference']:.2f} | {row['ms_per_step']:.1f} | {row['warmup_seconds']:.1f} | "
                  f"{row['note']} |")

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({
            **run_header(device), "accelerate": accelerate.__version__, "parameters": parameters, "block_out_channels": list(args.block_out_channels),
            "layers_per_block": args.layers_per_block, "batch_size": args.batch_size,
            "mixed_precision": mixed_precision, "ema": args.ema, "warmup_steps": args.warmup,
            "timed_steps": args.steps, "reference_images_per_second": reference, "rows": rows,
        }, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
