"""Checkpoints: the run configuration saved with each (what a resume must match), writing one atomically without
pickles, and finding, checking and loading the one to resume from.

A checkpoint holds safetensors and JSON only, so resuming never unpickles anything:

* ``model.safetensors``: the model's weights (as trained, not the EMA);
* ``optimizer.safetensors``: AdamW's per-parameter tensors (``state.<parameter>.<name>``);
* ``ema.safetensors``: the EMA weights (``--use_ema``);
* ``random_states_<process>.safetensors``: each process's torch CPU (and CUDA) generator states;
* ``training_state.json``: the step, the optimizer's hyper-parameters, the learning-rate schedule, the EMA's
  counters, the fp16 gradient scaler and the SHA-256 of every other file (a damaged file is detected on load);
* ``scorekit_training_config.json``: the run configuration (``run_config``).

Checkpoints live in ``<output_dir>-checkpoints/`` next to the pipeline folder, never inside it, so uploading the
pipeline folder by hand cannot publish them; that folder also holds the run's lock file (``RunLock``).
"""

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .arguments import SPEED_SWITCHES
from .data import TrainingData, write_data_state
from .models import sde_config

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINTS_SUFFIX = "-checkpoints"
# written next to the weights of every checkpoint and of the final pipeline: what a resume must match, and the
# data normalisation the CLI needs to plot or score toy samples in data units
RUN_CONFIG_NAME = "scorekit_training_config.json"
TRAINING_STATE_NAME = "training_state.json"
CHECKPOINT_FORMAT = 1
LOCK_NAME = "train.lock"


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


def checkpoints_dir(output_dir) -> Path:
    """Where the checkpoints of a run writing ``output_dir`` go: the sibling folder ``<output_dir>-checkpoints``."""
    output = Path(os.path.abspath(output_dir))
    return output.parent / f"{output.name}{CHECKPOINTS_SUFFIX}"


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def list_checkpoints(folder) -> List[Path]:
    """The checkpoints in ``folder`` (a checkpoints folder, or the pipeline folder of a run, whose checkpoints
    folder is then used), oldest first by step number. Each was renamed into place only once fully written."""
    folder = Path(folder)
    if not folder.name.endswith(CHECKPOINTS_SUFFIX):
        folder = checkpoints_dir(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=checkpoint_step)


class TrainingSetupError(RuntimeError):
    """A run that cannot start as asked (another run holds the output folder, no intact checkpoint to resume, the
    Hub unreachable for --push_to_hub, an uncoordinated launch); the CLI prints it without a traceback."""


class CorruptCheckpointError(ValueError):
    """A checkpoint folder whose files are missing, damaged or not in this package's format."""


@dataclass
class CheckpointContents:
    """A checkpoint read into memory (on the CPU) and verified against its checksums."""

    path: Path
    step: int
    state: dict  # training_state.json
    tensors: Dict[str, Dict[str, torch.Tensor]]  # file stem -> tensors


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path: Path) -> CheckpointContents:
    """Read and verify a checkpoint: every file listed in its ``training_state.json`` must be present with its
    recorded SHA-256. Raises ``CorruptCheckpointError`` naming the file and what is wrong with it."""
    from safetensors.torch import load_file

    state_file = path / TRAINING_STATE_NAME
    if not state_file.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".pkl", ".bin", ".pt"))
        raise CorruptCheckpointError(
            f"{state_file} is missing" + (f"; {', '.join(pickles)} are pickles, which are never loaded" if pickles
                                          else ""))
    try:
        state = json.loads(state_file.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptCheckpointError(f"{state_file} is not valid JSON ({error})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "files" not in state:
        raise CorruptCheckpointError(f"{state_file} is not a checkpoint description of format {CHECKPOINT_FORMAT}")
    tensors = {}
    for name, expected in state["files"].items():
        file = path / name
        if not file.is_file():
            raise CorruptCheckpointError(f"{file} is missing")
        if _sha256(file) != expected:
            raise CorruptCheckpointError(f"{file} is damaged (its SHA-256 differs from the recorded one)")
        if name.endswith(".safetensors"):
            tensors[name[:-len(".safetensors")]] = load_file(file)
    if state.get("step") != checkpoint_step(path):
        raise CorruptCheckpointError(f"{state_file} records step {state.get('step')}, not {checkpoint_step(path)}")
    return CheckpointContents(path, state["step"], state, tensors)


def find_resume_checkpoint(args) -> Optional[CheckpointContents]:
    """The checkpoint ``--resume_from_checkpoint`` names, read and verified. With ``latest``, the newest one that
    reads back intact: damaged newer ones are skipped with a warning saying why; when checkpoints exist and none
    is intact, a ``RuntimeError`` (a silent restart from step 0 would throw the run away)."""
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint != "latest":
        path = Path(args.resume_from_checkpoint)
        if not (path / RUN_CONFIG_NAME).is_file():
            raise FileNotFoundError(f"--resume_from_checkpoint {path} is not a checkpoint folder "
                                    f"(no {RUN_CONFIG_NAME}).")
        try:
            return read_checkpoint(path)
        except CorruptCheckpointError as error:
            raise CorruptCheckpointError(f"--resume_from_checkpoint {path}: {error}.") from None
    checkpoints = list_checkpoints(args.output_dir)
    if not checkpoints:
        logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting a new run.",
                       checkpoints_dir(args.output_dir))
        return None
    reasons = []
    for path in reversed(checkpoints):
        try:
            contents = read_checkpoint(path)
        except CorruptCheckpointError as error:
            logger.warning("skipping checkpoint %s: %s.", path, error)
            reasons.append(f"{path.name}: {error}")
            continue
        if reasons:
            logger.warning("resuming from %s, the newest intact checkpoint.", path)
        return contents
    raise TrainingSetupError(f"--resume_from_checkpoint latest: none of the {len(checkpoints)} checkpoints in "
                       f"{checkpoints_dir(args.output_dir)} can be loaded ({'; '.join(reasons)}). Delete them to "
                       "start over, or resume from a copy with --resume_from_checkpoint PATH.")


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


# --- writing and loading -------------------------------------------------------------------------------------


def _split_optimizer_state(optimizer) -> Tuple[Dict[str, torch.Tensor], dict]:
    """AdamW's state dict as tensors (``state.<parameter>.<name>``) and the JSON rest (hyper-parameters)."""
    state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: Dict[str, torch.Tensor], saved: dict, optimizer) -> dict:
    state = {int(index): dict(values) for index, values in saved["scalars"].items()}
    # the optimizer numbers the parameters of its groups in order
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        parameter = parameters[int(index)]
        if value.shape == parameter.shape:
            # in the parameter's memory format (channels-last weights): the fused AdamW kernel needs the moments
            # laid out as their parameter
            value = torch.empty_like(parameter, dtype=value.dtype).copy_(value)
        state.setdefault(int(index), {})[name] = value
    current_groups = optimizer.state_dict()["param_groups"]
    groups = [{key: tuple(value) if isinstance(current.get(key), tuple) else value for key, value in group.items()}
              for group, current in zip(saved["param_groups"], current_groups)]
    return {"state": state, "param_groups": groups}


def _random_states() -> Dict[str, torch.Tensor]:
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"torch_cuda_{device}"] = state
    return states


def save_checkpoint(accelerator, args, step: int, config: dict, state, batches=None) -> Path:
    """Write ``checkpoint-<step>`` (see the module's docstring) into a temporary folder renamed into place when
    complete, so that a run killed while saving leaves no half-written checkpoint; only then remove the oldest
    beyond ``--checkpoints_total_limit``, so a kill at any moment leaves at least one complete checkpoint.
    ``batches``: where this process's data stream stands (``write_data_state``), for streamed data."""
    from safetensors.torch import save_file

    folder = checkpoints_dir(args.output_dir)
    final = folder / f"{CHECKPOINT_PREFIX}{step}"
    partial = folder / f".{CHECKPOINT_PREFIX}{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # every process writes its own random states; the model, optimizer and EMA are the same on every process
    save_file(_random_states(), partial / f"random_states_{accelerator.process_index}.safetensors")
    write_data_state(partial, accelerator.process_index, batches)
    if accelerator.is_main_process:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.unwrapped.state_dict().items()},
                  partial / "model.safetensors")
        optimizer_tensors, optimizer_json = _split_optimizer_state(state.optimizer)
        save_file(optimizer_tensors, partial / "optimizer.safetensors")
        training_state = {"format": CHECKPOINT_FORMAT, "step": step, "num_processes": accelerator.num_processes,
                          "optimizer": optimizer_json, "lr_scheduler": state.lr_scheduler.state_dict()}
        if state.ema is not None:
            ema_state = state.ema.state_dict()
            save_file({f"shadow.{i}": p.detach().contiguous().cpu()
                       for i, p in enumerate(ema_state.pop("shadow_params"))}, partial / "ema.safetensors")
            training_state["ema"] = ema_state
        if accelerator.scaler is not None:
            training_state["grad_scaler"] = accelerator.scaler.state_dict()
        (partial / RUN_CONFIG_NAME).write_text(json.dumps(config, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        training_state["files"] = {p.name: _sha256(p) for p in sorted(partial.iterdir())}
        # written last: a checkpoint without it is incomplete
        (partial / TRAINING_STATE_NAME).write_text(json.dumps(training_state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        logger.info("saved %s", final)
        if args.checkpoints_total_limit:
            prune_checkpoints(folder, args.checkpoints_total_limit)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(folder: Path, limit: int) -> None:
    """Remove the oldest checkpoints in ``folder`` beyond the newest ``limit``."""
    existing = list_checkpoints(folder)
    for old in existing[:max(0, len(existing) - limit)]:
        shutil.rmtree(old)


def load_checkpoint(contents: CheckpointContents, accelerator, state) -> int:
    """Put a checkpoint read by ``read_checkpoint`` into the training state; returns its step."""
    tensors, saved = contents.tensors, contents.state
    state.unwrapped.load_state_dict(tensors["model"])
    state.optimizer.load_state_dict(_join_optimizer_state(tensors["optimizer"], saved["optimizer"],
                                                          state.optimizer))
    state.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if state.ema is not None:
        if "ema" not in tensors:
            raise CorruptCheckpointError(f"{contents.path} has no EMA weights (it was trained without --use_ema)")
        state.ema.load_state_dict(saved["ema"])
        with torch.no_grad():
            for i, shadow in enumerate(state.ema.shadow_params):
                shadow.copy_(tensors["ema"][f"shadow.{i}"])
    if accelerator.scaler is not None and "grad_scaler" in saved:
        accelerator.scaler.load_state_dict(saved["grad_scaler"])
    random_states = tensors.get(f"random_states_{accelerator.process_index}")
    if random_states is None or saved["num_processes"] != accelerator.num_processes:
        logger.warning("%s was written by %d process(es), this run has %d: the random states are not restored.",
                       contents.path, saved["num_processes"], accelerator.num_processes)
    else:
        torch.set_rng_state(random_states["torch_cpu"])
        for name, value in random_states.items():
            if name.startswith("torch_cuda_") and torch.cuda.is_available():
                torch.cuda.set_rng_state(value, int(name[len("torch_cuda_"):]))
    return contents.step


class RunLock:
    """An exclusive lock on ``<output_dir>-checkpoints/train.lock``, held by the main process for the whole run:
    a second run writing the same output_dir (another launch, or copies started without a launcher) stops with a
    clear error instead of racing. The operating system releases it when the process ends, even on SIGKILL."""

    def __init__(self, output_dir):
        self.output_dir = os.path.abspath(output_dir)
        self.path = checkpoints_dir(output_dir) / LOCK_NAME
        self.file = None

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            self.file = None
            raise TrainingSetupError(
                f"another training run is writing {self.output_dir} (it holds {self.path}). Use another "
                "--output_dir, or wait for it to end; to run several processes on one model, start them with a "
                "launcher (see --help).") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def release(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
