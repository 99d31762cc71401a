"""The plain-DDPM baseline of issue #6's fixed-budget comparison: diffusers' recipe on Fashion-MNIST padded to 32 px.

The network is the one the scorekit training script trains on the same data (``train_score_sde.py --dataset
fashion_mnist --resolution 32 --model unet2d --sde vp``): ``training.build_unet2d(32, 1)``, i.e. the
``UNET2D_PRESETS[32]`` layout -- block_out_channels (64, 128, 128, 256), layers_per_block 2, down blocks
(Down, AttnDown, Down, Down), up blocks (Up, Up, AttnUp, Up), positional time embedding -- with one input and
output channel (17.2 M parameters). ``--block_out_channels`` / ``--layers_per_block`` change it as the training
script's options of the same names do, so the two runs keep the same network.

The recipe is that of diffusers' ``examples/unconditional_image_generation/train_unconditional.py`` with its
defaults: a ``DDPMScheduler`` (1000 steps, linear betas) adds noise at uniformly drawn integer timesteps, the
UNet predicts it (epsilon) under an MSE loss; AdamW (lr 1e-4, betas 0.95 / 0.999, weight decay 1e-6, eps 1e-8),
gradient norm clipped at 1, a cosine learning-rate schedule with 500 warm-up steps, EMA with warm-up (inv_gamma
1, power 3/4, max decay 0.9999), random horizontal flips, batches in ``weight_dtype`` under mixed precision, and
the loss read on the host every step, as that script logs it. The data comes from the scorekit training script's
Fashion-MNIST loader. Training runs for ``--max_train_steps`` or until ``--time_budget_minutes`` of wall clock
(shared with the training script's ``TimeBudget``); the learning-rate schedule spans ``--max_train_steps`` either
way. The result is a ``DDPMPipeline`` folder (unet with the EMA weights and scheduler, safetensors) and
``ddpm_baseline_run.json``, which records the settings and how long the run trained.

    accelerate launch benchmarks/train_ddpm_baseline.py --mixed_precision bf16 --train_batch_size 128 \\
        --time_budget_minutes 15 --max_train_steps 20000 --output_dir outputs/fmnist32-ddpm-baseline
    PYTHONPATH=. python benchmarks/train_ddpm_baseline.py --max_train_steps 20 --max_train_samples 512 ...
"""

import argparse
import json
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffusers_scorekit import training

logger = logging.getLogger(__name__)

RUN_RECORD_NAME = "ddpm_baseline_run.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--fashion_mnist_dir", default=training.FASHION_MNIST_DIR)
    data.add_argument("--max_train_samples", type=int, default=None,
                      help="train on the first N of the 60,000 training images (quick checks)")
    data.add_argument("--dataloader_num_workers", type=int, default=0)

    model = parser.add_argument_group("model (the scorekit training script's UNet2DModel preset for 32 px)")
    model.add_argument("--block_out_channels", type=training.int_tuple, default=None,
                       help="channels per level (default: the preset's 64,128,128,256)")
    model.add_argument("--layers_per_block", type=int, default=None, help="default: 2")

    recipe = parser.add_argument_group("diffusers' train_unconditional recipe (its defaults)")
    recipe.add_argument("--ddpm_num_steps", type=int, default=1000)
    recipe.add_argument("--ddpm_beta_schedule", default="linear")
    recipe.add_argument("--train_batch_size", type=int, default=128)
    recipe.add_argument("--learning_rate", type=float, default=1e-4)
    recipe.add_argument("--lr_scheduler", default="cosine")
    recipe.add_argument("--lr_warmup_steps", type=int, default=500)
    recipe.add_argument("--adam_beta1", type=float, default=0.95)
    recipe.add_argument("--adam_beta2", type=float, default=0.999)
    recipe.add_argument("--adam_weight_decay", type=float, default=1e-6)
    recipe.add_argument("--adam_epsilon", type=float, default=1e-8)
    recipe.add_argument("--max_grad_norm", type=float, default=1.0)
    recipe.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True)
    recipe.add_argument("--ema_inv_gamma", type=float, default=1.0)
    recipe.add_argument("--ema_power", type=float, default=3 / 4)
    recipe.add_argument("--ema_max_decay", type=float, default=0.9999)
    recipe.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=True)

    run = parser.add_argument_group("run")
    run.add_argument("--max_train_steps", type=int, default=20000,
                     help="optimizer updates; the learning-rate schedule always spans this many")
    run.add_argument("--time_budget_minutes", type=float, default=None,
                     help="also stop once the training loop has run this long (wall clock, checked every "
                          "--logging_steps)")
    run.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                     help="default: accelerate's configuration")
    run.add_argument("--logging_steps", type=int, default=10, help="check the time budget every N steps")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--output_dir", default="ddpm-baseline")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("train_batch_size", "max_train_steps", "logging_steps", "ddpm_num_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.max_train_samples is not None and args.max_train_samples < args.train_batch_size:
        parser.error(f"--max_train_samples {args.max_train_samples} is less than one batch: it must be at least "
                     f"--train_batch_size ({args.train_batch_size}).")
    if args.time_budget_minutes is not None and not args.time_budget_minutes > 0:
        parser.error(f"--time_budget_minutes must be > 0 (or left out), got {args.time_budget_minutes}.")
    return args


def build_unet(args, channels: int):
    """The scorekit training script's 32-px UNet2DModel (positional time embedding, as for its VP runs)."""
    return training.build_unet2d(32, channels, block_out_channels=args.block_out_channels,
                                 layers_per_block=args.layers_per_block)


@dataclass
class DDPMTraining:
    """What train_unconditional's step works on, prepared by accelerate as that script prepares it."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: object  # diffusers' EMAModel, or None without --use_ema
    noise_scheduler: object  # diffusers' DDPMScheduler
    weight_dtype: torch.dtype  # the dtype of the batches: bf16 / fp16 under mixed precision, as in the script


def prepare_ddpm_training(args, accelerator, unet, dataloader=None):
    """Optimizer, schedule, EMA and noise scheduler of the recipe around ``unet``, prepared with ``accelerator``
    (and ``dataloader`` when given, which is returned prepared as the second value)."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    noise_scheduler = DDPMScheduler(num_train_timesteps=args.ddpm_num_steps, beta_schedule=args.ddpm_beta_schedule,
                                    prediction_type="epsilon")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    ema = None
    if args.use_ema:
        ema = EMAModel(unet.parameters(), decay=args.ema_max_decay, use_ema_warmup=True,
                       inv_gamma=args.ema_inv_gamma, power=args.ema_power, model_cls=type(unet),
                       model_config=unet.config)
    if dataloader is None:
        model, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    else:
        model, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    return DDPMTraining(model, optimizer, lr_scheduler, ema, noise_scheduler, weight_dtype), dataloader


def ddpm_step(accelerator, parts: DDPMTraining, clean_images: torch.Tensor, max_grad_norm: float = 1.0) -> float:
    """One update as train_unconditional.py makes it, on a batch in [-1, 1] already on the device; returns the
    loss as a float, read on the host every step as that script does for its logs."""
    clean_images = clean_images.to(parts.weight_dtype)
    noise = torch.randn(clean_images.shape, dtype=parts.weight_dtype, device=clean_images.device)
    timesteps = torch.randint(0, parts.noise_scheduler.config.num_train_timesteps, (clean_images.shape[0],),
                              device=clean_images.device).long()
    noisy_images = parts.noise_scheduler.add_noise(clean_images, noise, timesteps)
    with accelerator.accumulate(parts.model):
        model_output = parts.model(noisy_images, timesteps).sample
        loss = F.mse_loss(model_output.float(), noise.float())
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(parts.model.parameters(), max_grad_norm)
        parts.optimizer.step()
        parts.lr_scheduler.step()
        parts.optimizer.zero_grad()
    if accelerator.sync_gradients and parts.ema is not None:
        parts.ema.step(parts.model.parameters())
    return loss.detach().item()


def load_images(args) -> torch.Tensor:
    """Fashion-MNIST's training images padded to 32 px (uint8, ``(n, 1, 32, 32)``), by the training script's
    loader; the first ``--max_train_samples`` of them if given."""
    data = training.load_fashion_mnist(argparse.Namespace(fashion_mnist_dir=args.fashion_mnist_dir, resolution=32))
    return data.examples[:args.max_train_samples]


class FlipCollate:
    """Batches of uint8 images to [-1, 1], each flipped horizontally with probability 1/2 when ``random_flip``
    (train_unconditional's transforms, applied per batch)."""

    def __init__(self, random_flip: bool):
        self.random_flip = random_flip

    def __call__(self, images):
        batch = torch.stack(images).float() / 127.5 - 1.0
        if self.random_flip:
            flip = torch.rand(len(batch)) < 0.5
            batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        return batch


def main(args: argparse.Namespace) -> str:
    """Train the baseline and save its DDPMPipeline to ``args.output_dir`` (returned)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import DDPMPipeline
    from tqdm.auto import tqdm

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    images = load_images(args)
    set_seed(args.seed)
    unet = build_unet(args, images.shape[1])
    dataloader = torch.utils.data.DataLoader(images, batch_size=args.train_batch_size, shuffle=True,
                                             collate_fn=FlipCollate(args.random_flip),
                                             num_workers=args.dataloader_num_workers)
    parts, dataloader = prepare_ddpm_training(args, accelerator, unet, dataloader)
    logger.info("DDPM baseline: UNet2DModel (%.2fM parameters) on %d Fashion-MNIST images (32 px) for %d steps%s, "
                "%s mixed precision", sum(p.numel() for p in unet.parameters()) / 1e6, len(images),
                args.max_train_steps,
                "" if args.time_budget_minutes is None else f" or {args.time_budget_minutes:g} minutes",
                accelerator.mixed_precision)

    progress = tqdm(total=args.max_train_steps, desc="steps", disable=not accelerator.is_local_main_process)
    budget = training.TimeBudget(args.time_budget_minutes, accelerator)
    global_step, out_of_time = 0, False
    parts.model.train()
    while global_step < args.max_train_steps and not out_of_time:
        for clean_images in dataloader:
            loss = ddpm_step(accelerator, parts, clean_images, args.max_grad_norm)
            global_step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{parts.lr_scheduler.get_last_lr()[0]:.2e}")
            finished = global_step == args.max_train_steps
            out_of_time = not finished and global_step % args.logging_steps == 0 and budget.exhausted()
            if finished or out_of_time:
                break
    progress.close()
    result = budget.report(global_step, args.max_train_steps, out_of_time)
    logger.info("trained %d steps in %.2f minutes (stopped by %s)", global_step, result["training_minutes"],
                result["stopped_by"])

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(parts.model)
        if parts.ema is not None:
            parts.ema.copy_to(unet.parameters())
        DDPMPipeline(unet=unet, scheduler=parts.noise_scheduler).save_pretrained(args.output_dir)
        record = {"settings": vars(args), "result": result, "mixed_precision": accelerator.mixed_precision,
                  "num_train_images": len(images), "unet_parameters": sum(p.numel() for p in unet.parameters())}
        with open(os.path.join(args.output_dir, RUN_RECORD_NAME), "w") as f:
            json.dump(record, f, indent=2)
        logger.info("saved the DDPMPipeline to %s", os.path.abspath(args.output_dir))
    accelerator.end_training()
    return args.output_dir


if __name__ == "__main__":
    main(parse_args())
