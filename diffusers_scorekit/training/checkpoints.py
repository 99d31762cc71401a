"""Checkpoints: the run configuration saved with each (what a resume must match), finding the one to resume
from and checking it fits, and writing one atomically."""

import json
import logging
import os
import shutil
from pathlib import Path
from typing import List, Optional

from .arguments import SPEED_SWITCHES
from .data import TrainingData, write_data_state
from .models import sde_config

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
# written next to the weights of every checkpoint and of the final pipeline: what a resume must match, and the
# data normalisation the CLI needs to plot or score toy samples in data units
RUN_CONFIG_NAME = "scorekit_training_config.json"


def run_config(args, model, data: TrainingData) -> dict:
    """What a checkpoint was trained with: ``model`` and ``sde`` must match to resume; ``training`` should."""
    model_config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    return json.loads(json.dumps({
        "model": {"class": type(model).__name__, "config": model_config},
        "sde": sde_config(args),
        "data": {"description": data.description, "normalization": data.normalization,
                 "class_names": data.class_names},
        "training": {name: getattr(args, name) for name in (
            "dataset", "train_data_dir", "dataset_name", "dataset_config_name", "image_column", "num_toy_samples",
            "resolution", "center_crop", "random_crop", "random_flip", "streaming", "num_classes",
            "label_dropout", "loss", "time_sampling", "weighting", "importance_sampling", "num_projections",
            "sampling_eps", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
            "lr_warmup_steps", "max_grad_norm", "use_ema", "ema_decay", "seed") + SPEED_SWITCHES},
    }))


def list_checkpoints(output_dir: str) -> List[Path]:
    """Complete checkpoints, oldest first (a checkpoint is renamed into place only once fully written)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def find_resume_checkpoint(args) -> Optional[Path]:
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(args.output_dir)
        if not checkpoints:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting a new run.",
                           args.output_dir)
            return None
        return checkpoints[-1]
    path = Path(args.resume_from_checkpoint)
    if not (path / RUN_CONFIG_NAME).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {path} is not a checkpoint folder (no {RUN_CONFIG_NAME}).")
    return path


def check_resumable(checkpoint: Path, current: dict) -> None:
    """Raise if the checkpoint's model or SDE differs from this run's; warn on other training settings."""
    saved = json.loads((checkpoint / RUN_CONFIG_NAME).read_text())
    for section in ("model", "sde"):
        if saved[section] != current[section]:
            differences = _differences(saved[section], current[section])
            raise ValueError(f"cannot resume from {checkpoint}: its {section} differs from this run's "
                             f"({'; '.join(differences)}).")
    differences = _differences(saved["training"], current["training"])
    if differences:
        logger.warning("resuming from %s with different training settings (%s): the run will not reproduce an "
                       "uninterrupted one.", checkpoint, "; ".join(differences))


def _differences(saved: dict, current: dict, prefix: str = "") -> List[str]:
    lines = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            lines += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            lines.append(f"{prefix}{key}: checkpoint {old!r}, now {new!r}")
    return lines


def save_checkpoint(accelerator, args, step: int, config: dict, batches=None) -> None:
    """``accelerator.save_state`` (and where each process's ``batches`` stand, ``write_data_state``) into a
    temporary folder renamed into place when complete, so that a run killed while saving leaves no half-written
    "latest" checkpoint; keeps at most ``checkpoints_total_limit``."""
    final = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    partial = Path(args.output_dir) / f".{CHECKPOINT_PREFIX}{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        # every process writes its own random states into it
        partial.mkdir(parents=True)
        if args.checkpoints_total_limit:
            # make room for the new one
            existing = list_checkpoints(args.output_dir)
            for old in existing[:max(0, len(existing) - args.checkpoints_total_limit + 1)]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    write_data_state(partial, accelerator.process_index, batches)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / RUN_CONFIG_NAME).write_text(json.dumps(config, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
