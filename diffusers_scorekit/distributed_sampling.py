"""Many samples over several processes (``accelerate launch``, ``torchrun``), the same however many made them.

Sample ``i`` starts from its own CPU generator, seeded with ``(seed, i)``, so its noise does not depend on which
process draws it or with which others. The samples go in fixed batches (batch ``b`` holds samples
``b * batch_size`` to ``(b + 1) * batch_size - 1``), batch ``b`` to process ``b % num_processes``, so every batch is
computed with the same companions too; the main process gathers them in order.

Two CPU processes (accelerate runs several CPU processes, over gloo, only with ``ACCELERATE_USE_CPU=1`` and
``--multi_gpu``: ``accelerate launch --cpu --num_processes 2`` starts one)::

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 -m diffusers_scorekit.cli \\
        sample my-model --num_images 1000 --output samples.npz
"""

import math
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from .training.data import seed_of


def sample_generators(seed: int, indices: range) -> List[torch.Generator]:
    """One CPU generator per sample index: sample ``i`` draws all its noise from ``(seed, i)``."""
    return [torch.Generator().manual_seed(seed_of(seed, 4, i)) for i in indices]


def process_batches(num_samples: int, batch_size: int, num_processes: int, process_index: int) -> List[range]:
    """The sample indices of each batch this process makes (batch ``b`` goes to process ``b % num_processes``)."""
    starts = range(process_index * batch_size, num_samples, num_processes * batch_size)
    return [range(start, min(start + batch_size, num_samples)) for start in starts]


def draw_across_processes(make_batch: Callable[[range], torch.Tensor], num_samples: int, batch_size: int,
                          accelerator) -> Optional[torch.Tensor]:
    """``make_batch(indices)`` (a CPU tensor, one row per index) for this process's batches, gathered: the main
    process gets all ``num_samples`` rows in index order, the others ``None``."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}.")
    from accelerate.utils import gather

    num_processes = accelerator.num_processes
    num_batches = math.ceil(num_samples / batch_size)
    per_process = math.ceil(num_batches / num_processes)
    mine = None
    for slot, indices in enumerate(process_batches(num_samples, batch_size, num_processes, accelerator.process_index)):
        batch = make_batch(indices)
        if mine is None:
            # every process sends the same shape: its batches, padded to the most any process makes
            mine = torch.zeros(per_process, batch_size, *batch.shape[1:], dtype=batch.dtype)
        mine[slot, :len(indices)] = batch
    if mine is None:  # more processes than batches: padding only, shaped by one sample that is thrown away
        example = make_batch(range(1))
        mine = torch.zeros(per_process, batch_size, *example.shape[1:], dtype=example.dtype)
    gathered = gather(mine.to(accelerator.device)).cpu()
    if not accelerator.is_main_process:
        return None
    # process p's slot s is gathered row p * per_process + s and holds batch s * num_processes + p
    order = [(b % num_processes) * per_process + b // num_processes for b in range(num_batches)]
    return gathered[order].flatten(0, 1)[:num_samples]


def sample_across_processes(pipe, num_samples: int, num_inference_steps: int, seed: int, batch_size: int,
                            accelerator, class_labels: Optional[torch.Tensor] = None,
                            sigmas: Optional[Sequence[float]] = None) -> Optional[np.ndarray]:
    """``num_samples`` samples of ``pipe`` (``output_type="np"``: images in [0, 1], NHWC, or vectors), sample
    ``i`` drawn from ``sample_generators``, made by this run's processes together (``draw_across_processes``);
    on the grid ``sigmas`` when given (see ``ScoreSDEPipeline.__call__``)."""
    pipe.to(accelerator.device)

    def make_batch(indices: range) -> torch.Tensor:
        labels = None if class_labels is None else class_labels[indices.start:indices.stop]
        output = pipe(len(indices), num_inference_steps, generator=sample_generators(seed, indices),
                      class_labels=labels, output_type="np", sigmas=sigmas)
        return torch.from_numpy(np.asarray(output.images if pipe.is_image_model else output.samples))

    samples = draw_across_processes(make_batch, num_samples, batch_size, accelerator)
    return None if samples is None else samples.numpy()
