"""A few-step grid fitted to one model ("Align Your Steps"-like, Sabour et al. 2024).

Which noise levels a few-step ODE solver should visit depends on the model: on an exact-score mixture the best
grids skip most of the high-noise range, while a trained epsilon network, whose ``x_0`` estimate is poor there,
needs steps at high and middle noise (BENCHMARKS.md, issue #14). So instead of one fixed spacing, the levels are
fitted to the model itself: the ``num_inference_steps`` levels whose samples land closest to the model's own
many-level solution from the same initial noise, on a pilot batch. The cost is paid once per model and NFE; the
grid is then reused through ``set_timesteps(sigmas=...)`` or the pipeline's ``sigmas`` argument.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch

from .schedulers.scheduling_probability_flow_ode import ProbabilityFlowODEScheduler
from .schedulers.scheduling_utils import run_plain_loop


@dataclass
class StepCalibration:
    """What ``calibrate_sigmas`` found.

    Args:
        sigmas: the fitted levels' noise ``sigma / a``, decreasing (``set_timesteps(sigmas=...)``).
        distance: the fitted grid's mean distance to the reference on the pilot batch (see ``calibrate_sigmas``).
        default_distance: the same for the scheduler's own ``num_inference_steps`` grid, where the search began.
        grids_tried: how many grids the search ran (each costs the grid's model calls on the pilot batch).
    """

    sigmas: List[float]
    distance: float
    default_distance: float
    grids_tried: int


def _solve(scheduler, model, noise, **grid) -> torch.Tensor:
    scheduler.set_timesteps(**grid)
    return run_plain_loop(scheduler, model, noise * scheduler.init_noise_sigma)


def _mean_distance(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """The mean over draws of each draw's RMS distance to its reference. A mean of distances, not their RMS, so
    that the few draws near a boundary between modes, which a small error sends to the other mode, do not decide
    the grid for all the others."""
    per_draw = (samples - reference).double().flatten(1).pow(2).mean(1).sqrt()
    return per_draw.mean().item()


def _log_snr_levels(log_step_weights: np.ndarray, start: float, end: float) -> np.ndarray:
    """Levels from ``start`` to ``end`` in log-SNR whose steps are proportional to ``exp(log_step_weights)``."""
    weights = np.exp(log_step_weights - log_step_weights.max())
    levels = start + (end - start) * np.concatenate([[0.0], np.cumsum(weights) / weights.sum()])
    levels[-1] = end
    return levels


def calibrate_sigmas(
    scheduler: ProbabilityFlowODEScheduler,
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    num_inference_steps: int,
    reference_steps: int = 200,
    max_grids: Optional[int] = None,
    initial_step: float = 0.5,
    min_step: float = 0.03,
) -> StepCalibration:
    """Fit the ``num_inference_steps`` levels of a probability-flow ODE scheduler to ``model``.

    The levels are searched in log-SNR, starting from the scheduler's own ``num_inference_steps`` grid (a kept
    ``fitted_sigmas`` grid of that length, else ``time_spacing``'s), to minimise the mean distance
    (over the draws of ``noise``) between the grid's samples and the scheduler's ``reference_steps``-level solution
    from the same noise. The first level stays at the prior (``t = 1``). With ``denoise_final`` (the default) the
    last level is fitted too, anywhere above the scheduler's ``sampling_eps``: the final Tweedie step then jumps to
    clean data from there, as diffusers' ``final_sigmas_type="zero"`` does, instead of spending a model call at
    nearly clean data; without it the last level is the sample's and stays put.

    The search is a compass search over the logarithms of the step lengths (and, with ``denoise_final``, of the
    unused rest of the log-SNR range): each in turn is lengthened or shortened by ``initial_step`` (the others
    shrink or grow to keep the range), a change is kept when it brings the samples closer, and the change is
    halved when none does, down to ``min_step``.

    Args:
        scheduler: a `ProbabilityFlowODEScheduler` (deterministic: the same noise gives the same sample, which the
            comparison needs). On return it holds the fitted grid for this run; ``register_fitted_sigmas`` keeps it.
        model: ``model(x, timestep) -> model_output`` in the scheduler's ``prediction_type`` and timestep
            convention, as in the plain diffusers loop.
        noise: the pilot batch of standard normal draws, ``(batch, *sample_shape)``; the samples start from
            ``noise * init_noise_sigma``. 64-500 draws; draw it with another seed than the samples the grid will
            be judged on.
        num_inference_steps: the number of levels to fit (at least 2 with ``denoise_final``, else 3).
        reference_steps: levels of the reference solution (more than ``num_inference_steps``).
        max_grids: stop after trying this many grids (default: no limit; the search ends when the change falls
            below ``min_step``, after some 50-100 grids per level).
        initial_step: the first change of a log step length.
        min_step: the search ends when the change falls below it.

    Returns:
        `StepCalibration`, whose ``sigmas`` go to ``set_timesteps(sigmas=...)``.
    """
    if not isinstance(scheduler, ProbabilityFlowODEScheduler):
        raise TypeError(
            f"calibrate_sigmas needs a ProbabilityFlowODEScheduler, got {type(scheduler).__name__}: a stochastic "
            "sampler draws new noise on every run, so its samples cannot be compared with a reference from the "
            "same initial noise."
        )
    fit_last_level = scheduler.config.denoise_final
    min_levels = 2 if fit_last_level else 3
    if not (isinstance(num_inference_steps, int) and num_inference_steps >= min_levels):
        raise ValueError(
            f"num_inference_steps={num_inference_steps!r} is invalid: it must be an integer >= {min_levels} (the first "
            f"level is fixed{'' if fit_last_level else ', and so is the last without denoise_final'}: fewer levels "
            "leave nothing to fit)."
        )
    if not (isinstance(reference_steps, int) and reference_steps > num_inference_steps):
        raise ValueError(
            f"reference_steps={reference_steps!r} is invalid: it must be an integer larger than "
            f"num_inference_steps={num_inference_steps}."
        )
    if not (0 < min_step <= initial_step):
        raise ValueError(f"initial_step={initial_step!r}, min_step={min_step!r}: they must satisfy 0 < min_step <= initial_step.")
    if max_grids is not None and max_grids < 2:
        raise ValueError(f"max_grids={max_grids!r} is invalid: it must be at least 2, the default grid and one other "
                         "(or None: no limit).")

    with torch.no_grad():
        reference = _solve(scheduler, model, noise, num_inference_steps=reference_steps)
        scheduler.set_timesteps(num_inference_steps)
        default_sigmas = scheduler.sigmas.tolist()
        default_log_snr = -np.log(default_sigmas)
        start, end = default_log_snr[0], default_log_snr[-1]
        if fit_last_level:  # the range runs to sampling_eps even where a kept grid ends above it
            end = max(end, scheduler.sde.log_snr([scheduler.sampling_eps]).item())

        def distance(sigmas):
            return _mean_distance(_solve(scheduler, model, noise, sigmas=sigmas), reference)

        def grid(point):
            log_snr = _log_snr_levels(point, start, end)
            # the ends exactly as the scheduler has them (exp(-log) can round past the SDE's range)
            inner = np.exp(-log_snr[1:-1]).tolist()
            return [default_sigmas[0], *inner] if fit_last_level else [default_sigmas[0], *inner, default_sigmas[-1]]

        default_distance = distance(default_sigmas)
        point = np.log(np.diff(default_log_snr))
        if fit_last_level:
            # the rest of the range below the last level starts at a twentieth of the mean step
            point = np.append(point, point.mean() - 3.0)
        best = distance(grid(point))
        grids_tried = 2
        step = initial_step
        while step >= min_step and (max_grids is None or grids_tried < max_grids):
            improved = False
            for index in range(len(point)):
                for direction in (1.0, -1.0):
                    if max_grids is not None and grids_tried >= max_grids:
                        break
                    trial = point.copy()
                    trial[index] += direction * step
                    value = distance(grid(trial))
                    grids_tried += 1
                    if value < best:
                        point, best, improved = trial, value, True
                        break
            if not improved:
                step /= 2
        if default_distance <= best:
            sigmas, best = default_sigmas, default_distance
        else:
            sigmas = grid(point)
        scheduler.set_timesteps(sigmas=sigmas)
    return StepCalibration(sigmas=sigmas, distance=best, default_distance=default_distance, grids_tried=grids_tried)
