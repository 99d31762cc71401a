"""The training run: ``main`` trains with accelerate (logging, time budget, checkpoints, previews, resuming),
then ``save_final`` saves the pipeline, its run configuration, a sample image, the metrics and the model card."""

import argparse
import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .arguments import parse_args, resolve_args
from .checkpoints import (
    CorruptCheckpointError,
    RUN_CONFIG_NAME,
    RunLock,
    TrainingSetupError,
    check_resumable,
    checkpoints_dir,
    find_resume_checkpoint,
    load_checkpoint,
    run_config,
    save_checkpoint,
)
from .data import TrainingData, load_data, training_batches
from .evaluation import export_pipeline, measure, sample_figure, sample_pipeline
from .model_card import SAMPLE_IMAGE_NAME, check_hub_access, push_to_hub, training_length, write_model_card
from .models import build_model, training_sde
from .step import prepare_training, resolve_speed, train_step

logger = logging.getLogger(__name__)

# fault injection for the resume tests: the process SIGKILLs itself right after this optimizer step
KILL_AT_STEP_ENV = "SCOREKIT_KILL_AT_STEP"


class TimeBudget:
    """The wall-clock budget of a training loop, counted from construction (``minutes=None``: no budget).
    A single process reads the host clock after every step, which never waits for the device. Several processes
    must stop at the same step: there the main process's clock decides at logging steps (where the loop waits
    for the device anyway) and the decision is broadcast."""

    def __init__(self, minutes: Optional[float], accelerator):
        self.minutes, self.accelerator = minutes, accelerator
        self.start = time.monotonic()

    def elapsed_minutes(self) -> float:
        return (time.monotonic() - self.start) / 60

    def exhausted(self, at_logging: bool) -> bool:
        if self.minutes is None:
            return False
        if self.accelerator.num_processes == 1:
            return self.elapsed_minutes() >= self.minutes
        if not at_logging:
            return False
        from accelerate.utils import broadcast

        over = torch.tensor([float(self.elapsed_minutes() >= self.minutes)], device=self.accelerator.device)
        return bool(broadcast(over, from_process=0).item())

    def report(self, steps: int, max_train_steps: int, stopped: bool) -> Dict[str, object]:
        """How long the run trained, for the run configuration and the model card: ``steps`` counts from the
        start of the run, ``training_minutes`` from the start of this launch (a resumed run's last part)."""
        return {"steps": steps, "max_train_steps": max_train_steps, "time_budget_minutes": self.minutes,
                "training_minutes": round(self.elapsed_minutes(), 3),
                "stopped_by": "time_budget_minutes" if stopped else "max_train_steps"}


def main(args: argparse.Namespace) -> str:
    """Train, then save the pipeline and its model card to ``args.output_dir`` (returned)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    resolve_args(args)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        # accelerate joins the processes of a launcher (torchrun, `accelerate launch --multi_gpu`) on the CPU only
        # when told to use it; without a GPU it would otherwise run them as uncoordinated copies
        cpu=launched > 1 and not torch.cuda.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    if launched != accelerator.num_processes:
        raise TrainingSetupError(f"launched as {launched} processes (WORLD_SIZE) but accelerate joined "
                           f"{accelerator.num_processes}: they would train uncoordinated copies. Launch with "
                           "`torchrun --nproc_per_node N` or `accelerate launch --multi_gpu --num_processes N "
                           "--num_machines 1` (see --help).")
    lock = RunLock(args.output_dir).acquire() if accelerator.is_main_process else None
    threads = torch.get_num_threads()
    try:
        return _train(args, accelerator)
    finally:
        torch.set_num_threads(threads)
        if lock is not None:
            lock.release()


def _train(args: argparse.Namespace, accelerator) -> str:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    elif accelerator.device.type == "cpu" and args.model == "scorekit_mlp":
        # a small MLP gains nothing from several threads and loses much when the cores are shared
        # (benchmarks/bench_training_threads.py)
        torch.set_num_threads(1)
    if args.push_to_hub and accelerator.is_main_process:
        check_hub_access(args)
    resolve_speed(args, accelerator.device)
    data = load_data(args)
    set_seed(args.seed)
    model = build_model(args, data)
    config = run_config(args, model, data)
    checkpoint = find_resume_checkpoint(args)
    if checkpoint is not None:
        check_resumable(checkpoint.path, config)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    state = prepare_training(args, accelerator, model, training_sde(args))
    global_step = 0
    if checkpoint is not None:
        global_step = load_checkpoint(checkpoint, accelerator, state)
        logger.info("resumed from %s at step %d", checkpoint.path, global_step)
    batches = training_batches(args, data, accelerator.num_processes, accelerator.process_index,
                               global_step * args.gradient_accumulation_steps,
                               None if checkpoint is None else checkpoint.path)
    if accelerator.is_main_process:
        accelerator.init_trackers("score_sde", config={k: v for k, v in vars(args).items()
                                                       if isinstance(v, (int, float, str, bool))})
    logger.info("training %s (%.2fM parameters) on %s for %d steps%s, %d process(es) on %s, global batch %d "
                "(%d per process x %d process(es) x %d accumulation step(s)), %d torch thread(s) per process; "
                "checkpoints in %s",
                type(state.unwrapped).__name__, sum(p.numel() for p in state.unwrapped.parameters()) / 1e6,
                data.description, args.max_train_steps,
                "" if args.time_budget_minutes is None else f" or {args.time_budget_minutes:g} minutes",
                accelerator.num_processes, accelerator.device.type,
                args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
                args.train_batch_size, accelerator.num_processes, args.gradient_accumulation_steps,
                torch.get_num_threads(), checkpoints_dir(args.output_dir))
    kill_at_step = int(os.environ.get(KILL_AT_STEP_ENV, "0"))

    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    budget = TimeBudget(args.time_budget_minutes, accelerator)
    out_of_time = False
    # summed on the device and read only at logging, the one place the loop waits for the device
    unlogged_loss, unlogged_steps = 0, 0
    state.model.train()
    while global_step < args.max_train_steps and not out_of_time:
        unlogged_loss = unlogged_loss + train_step(args, accelerator, state, data, batches, global_step)
        unlogged_steps += 1
        global_step += 1
        progress.update(1)
        finished = global_step == args.max_train_steps
        at_logging = global_step % args.logging_steps == 0 or finished
        if at_logging:
            logs = {"loss": unlogged_loss.item() / (unlogged_steps * args.gradient_accumulation_steps),
                    "lr": state.lr_scheduler.get_last_lr()[0]}
            if state.ema is not None:
                logs["ema_decay"] = state.ema.cur_decay_value
            progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=global_step)
            unlogged_loss, unlogged_steps = 0, 0
        out_of_time = not finished and budget.exhausted(at_logging)
        if out_of_time:
            logger.info("time budget of %g minutes used up at step %d of %d", args.time_budget_minutes,
                        global_step, args.max_train_steps)

        if out_of_time or (global_step % args.checkpointing_steps == 0 and not finished):
            save_checkpoint(accelerator, args, global_step, config, state, batches)
        if args.sample_every and global_step % args.sample_every == 0 and accelerator.is_main_process:
            with ema_weights(state.ema, state.unwrapped):
                state.unwrapped.eval()
                export_pipeline(state.unwrapped, args, data, preview_step=global_step)
                state.unwrapped.train()
        if global_step == kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
    progress.close()
    config["result"] = budget.report(global_step, args.max_train_steps, out_of_time)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if state.ema is not None:
            state.ema.copy_to(state.unwrapped.parameters())
        state.unwrapped.eval()
        save_final(state.unwrapped, args, data, config)
    accelerator.end_training()
    return args.output_dir


def command_line(argv: Optional[List[str]] = None) -> str:
    """``main`` for ``train_score_sde.py`` and ``scorekit train``: a run that cannot start as asked ends with its
    message and exit status 1, without a traceback."""
    args = parse_args(argv)
    try:
        return main(args)
    except (TrainingSetupError, CorruptCheckpointError) as error:
        raise SystemExit(f"error: {error}") from None


@contextlib.contextmanager
def ema_weights(ema, model):
    """Inside the block the model holds the EMA weights; after it, its own again."""
    if ema is None:
        yield
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield
    finally:
        ema.restore(model.parameters())


def save_final(model, args, data: TrainingData, config: dict) -> None:
    """The pipeline (safetensors), its run configuration (with how long it trained, ``config["result"]``), a
    sample image and the model card; then the Hub."""
    pipe = export_pipeline(model, args, data)
    pipe.save_pretrained(args.output_dir)
    Path(args.output_dir, RUN_CONFIG_NAME).write_text(json.dumps(config, indent=2))
    # the end-of-run evaluation can take minutes: progress bars as diffusers' (TQDM_DISABLE=1 turns them off)
    pipe.set_progress_bar_config(desc=f"{args.num_eval_samples} samples for the model card")
    samples = sample_pipeline(pipe, args.num_eval_samples, args.num_inference_steps, args.seed, data.is_image)
    sample_figure(samples, data, f"{type(pipe.scheduler).__name__}, {args.num_inference_steps} steps").save(
        os.path.join(args.output_dir, SAMPLE_IMAGE_NAME))
    metrics = {"training length": training_length(config["result"]),
               **measure(pipe, args, data, samples, progress=True)}
    for name, value in metrics.items():
        logger.info("%s: %s", name, value)
    write_model_card(args, pipe, data, metrics, config["result"]["steps"])
    logger.info("saved the pipeline and its model card to %s", os.path.abspath(args.output_dir))
    if args.push_to_hub:
        logger.info("pushed to https://huggingface.co/%s", push_to_hub(args))
