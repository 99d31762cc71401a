"""One optimizer update, exactly reproducible: the micro-batches come from ``data.training_batches`` (their order
and augmentation a function of the seed, process and micro-batch) and every other random draw of a micro-batch
(``step_generator``) is a function of the seed, process and step only; ``prepare_training`` sets up
the model, AdamW, the learning-rate schedule and the EMA with the speed switches ``resolve_speed`` decides, and
``train_step`` runs one update without waiting for the device."""

import logging
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch

from ..losses import denoising_score_matching_loss, sample_time, sliced_score_matching_loss
from ..score_function import ScoreFunction
from .arguments import SPEED_SWITCHES
from .data import TrainingData, seed_of

logger = logging.getLogger(__name__)


def step_generator(seed: int, process_index: int, step: int, micro_batch: int) -> torch.Generator:
    """The CPU generator of every draw in one micro-batch (the losses draw on the CPU and move the result)."""
    return torch.Generator().manual_seed(seed_of(seed, 2, process_index, step, micro_batch))


def resolve_speed(args, device: torch.device) -> None:
    """Turn every unset speed switch into a bool for a run on ``device`` (``--speed auto``: all on for CUDA, but
    channels_last and torch_compile only for image models; none elsewhere) and apply the process-wide one, TF32.

    With the switch off, float32 matmuls keep PyTorch's default full precision; cuDNN convolutions use TF32 by
    PyTorch's default either way, so on means TF32 matmuls (and, explicitly, cuDNN)."""
    image_model = args.model != "scorekit_mlp"
    auto = args.speed == "auto" and device.type == "cuda"
    for name in SPEED_SWITCHES:
        if getattr(args, name) is None:
            setattr(args, name, auto and (image_model or name not in ("channels_last", "torch_compile")))
    torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
    if args.allow_tf32:
        torch.backends.cudnn.allow_tf32 = True


def build_optimizer(args, parameters, device: torch.device) -> Tuple[torch.optim.AdamW, str]:
    """AdamW with the run's hyper-parameters, on parameters already on ``device``, and the name of the
    implementation for the log: with ``--fused_optimizer`` the fused kernel where ``device`` has one (else
    foreach kernels), without it PyTorch's default (foreach on CUDA, a loop over the parameters on the CPU)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    implementation, name = {}, f"AdamW (PyTorch's default implementation on {device.type})"
    if args.fused_optimizer:
        if device.type in _get_fused_kernels_supported_devices():
            implementation, name = {"fused": True}, "AdamW (fused)"
        else:
            implementation, name = {"foreach": True}, f"AdamW (foreach: no fused AdamW on {device.type})"
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, **implementation)
    return optimizer, name


def build_ema(args, model: torch.nn.Module, device: torch.device):
    """diffusers' ``EMAModel`` of ``model``'s parameters with the run's decay, on ``device`` (foreach updates with
    ``--fused_optimizer``). It is saved and restored through its ``state_dict`` (checkpoints) and copied into the
    model for previews and the saved pipeline, so it needs no model class or config of its own."""
    from diffusers.training_utils import EMAModel

    ema = EMAModel(model.parameters(), decay=args.ema_decay, foreach=args.fused_optimizer)
    ema.to(device)
    return ema


@dataclass
class TrainingState:
    """What one optimizer update works on (see ``prepare_training``)."""

    model: torch.nn.Module  # as accelerate prepared it (DDP-wrapped with several processes); checkpointed
    unwrapped: torch.nn.Module  # the plain model: the EMA, previews and the saved pipeline use it
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: Optional[object]  # diffusers' EMAModel with --use_ema
    score_fn: ScoreFunction  # the training forward, compiled with --torch_compile


def prepare_training(args, accelerator, model, sde) -> TrainingState:
    """Put ``model`` on the device with the speed switches (already resolved by ``resolve_speed``), build its
    optimizer, schedule and EMA, prepare them with ``accelerator`` and register everything an exact resume needs
    (model, optimizer, schedule, EMA) for its checkpoints. The log says which switches are on.

    ``torch.compile`` wraps only the forward the loss calls: accelerate checkpoints, the EMA and the saved
    pipeline see the uncompiled module, so its state-dict keys never get compile's ``_orig_mod.`` prefix, and
    sampling the pipeline does not recompile."""
    from diffusers.optimization import get_scheduler

    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # on the device before the optimizer is built, so that the fused implementation is chosen for that device
    model = model.to(accelerator.device)
    optimizer, optimizer_name = build_optimizer(args, model.parameters(), accelerator.device)
    # stepped once per optimizer update by us rather than prepared, so warm-up counts updates whatever the
    # number of processes; saved with the checkpoint as a registered object
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)
    ema = build_ema(args, unwrapped, accelerator.device) if args.use_ema else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    forward = torch.compile(model) if args.torch_compile else model
    score_fn = ScoreFunction(forward, sde, args.prediction_type, args.timestep_type, args.num_train_timesteps)
    # pragma: no mutate start (a log line)
    logger.info("speed on %s: channels_last %s, TF32 %s, %s%s, torch.compile %s, %s", accelerator.device,
                *("on" if getattr(args, name) else "off" for name in ("channels_last", "allow_tf32")), optimizer_name,
                " and foreach EMA" if ema is not None and args.fused_optimizer else "",
                "on" if args.torch_compile else "off", f"{accelerator.mixed_precision} mixed precision")
    # pragma: no mutate end
    return TrainingState(model, unwrapped, optimizer, lr_scheduler, ema, score_fn)


def to_device(tensor: torch.Tensor, device, channels_last: bool = False) -> torch.Tensor:
    """A host tensor on ``device`` (channels-last if asked). To CUDA it goes through pinned memory without
    blocking: a blocking copy waits for everything queued on the device, which would leave the device idle while
    the host prepares each step."""
    if channels_last:
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def training_loss(args, score_fn: ScoreFunction, x0, class_labels, generator) -> torch.Tensor:
    """The loss of one micro-batch. Denoising score matching gets its times and noise drawn here on the host
    from ``generator``, as the loss would draw them itself, and copied with ``to_device`` (without waiting)."""
    if args.loss == "ssm":
        return sliced_score_matching_loss(score_fn, x0, num_projections=args.num_projections,
                                          sampling_eps=args.sampling_eps, generator=generator)
    t = sample_time(score_fn, len(x0), time_sampling=args.time_sampling, sampling_eps=args.sampling_eps,
                    importance_sampling=args.importance_sampling, generator=generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    return denoising_score_matching_loss(
        score_fn, x0, time_sampling=args.time_sampling, weighting=args.weighting,
        importance_sampling=args.importance_sampling, sampling_eps=args.sampling_eps, class_labels=class_labels,
        t=to_device(t, x0.device), noise=to_device(noise, x0.device, channels_last=bool(args.channels_last)),
    )


def make_batch(args, data: TrainingData, examples: torch.Tensor, labels: Optional[torch.Tensor], generator, device):
    """A micro-batch (as ``training_batches`` gives it) in model space, with labels dropped to the null label at
    random (drawn from this micro-batch's ``generator``), on ``device`` (see ``to_device``)."""
    x0 = data.to_model_space(examples)
    if args.num_classes is not None:
        labels = labels.clone()
        labels[torch.rand(len(labels), generator=generator) < args.label_dropout] = args.num_classes
        labels = to_device(labels, device)
    else:
        labels = None
    return to_device(x0, device, channels_last=bool(args.channels_last)), labels


def train_step(args, accelerator, state: TrainingState, data: TrainingData, batches: Iterator,
               step: int) -> torch.Tensor:
    """Optimizer update number ``step`` (from 0): its micro-batches with gradient accumulation, clipping, AdamW,
    the learning-rate schedule and the EMA. Returns the sum of the micro-batch losses on the device, without
    waiting for it."""
    loss_sum = 0
    for micro_batch in range(args.gradient_accumulation_steps):
        generator = step_generator(args.seed, accelerator.process_index, step, micro_batch)
        x0, labels = make_batch(args, data, *next(batches), generator, accelerator.device)
        with accelerator.accumulate(state.model):
            with accelerator.autocast():
                loss = training_loss(args, state.score_fn, x0, labels, generator)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(state.model.parameters(), args.max_grad_norm)
            state.optimizer.step()
            state.optimizer.zero_grad()
        loss_sum = loss_sum + loss.detach()
    if not accelerator.sync_gradients:
        raise RuntimeError("gradients were not synchronised after a full accumulation: accelerate's step "
                           "counter is out of line with this loop.")
    state.lr_scheduler.step()
    if state.ema is not None:
        state.ema.step(state.unwrapped.parameters())
    return loss_sum
