"""What a network predicts, and what it is conditioned on: the one place that converts between them.

With ``x_t = a x_0 + sigma eps`` a network can predict

- ``"epsilon"``: the noise ``eps``;
- ``"score"``: ``grad log p_t(x_t) = -eps / sigma``;
- ``"sample"``: the clean data ``x_0``;
- ``"v_prediction"``: ``v = (a eps - sigma x_0) / sqrt(a^2 + sigma^2)``, which is diffusers' / Salimans & Ho's
  ``v = alpha eps - sigma x_0`` on VP (where ``a^2 + sigma^2 = 1``) and stays well scaled on VE and sub-VP.

and it can be told the time as

- ``"discrete"``: ``t (N - 1)`` for ``N = num_train_timesteps`` (DDPM's integer timesteps at the knots);
- ``"continuous"``: ``t`` itself;
- ``"sigma"``: ``sigma(t)`` (NCSN++, diffusers' ``ScoreSdeVeScheduler`` and ``UNet2DModel`` with Fourier time);
- ``"log_sigma"``: ``log sigma(t)``.

``a`` and ``sigma`` may be Python floats (one time for the whole batch, as in a sampler) or tensors that
broadcast against the sample (one time per sample, as in training).
"""

from typing import Tuple

import torch

from .sde import SDE, TimeLike, as_time

PREDICTION_TYPES = ("epsilon", "score", "sample", "v_prediction")
TIMESTEP_TYPES = ("discrete", "continuous", "sigma", "log_sigma")


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}.")


def check_timestep_type(timestep_type: str) -> None:
    if timestep_type not in TIMESTEP_TYPES:
        raise ValueError(f"timestep_type={timestep_type!r} is not supported; choose one of {TIMESTEP_TYPES}.")


def epsilon_and_sample(model_output, sample, a, sigma, prediction_type: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(eps, x_0)`` implied by ``model_output`` at ``x_t = sample`` with marginal coefficients ``(a, sigma)``."""
    if prediction_type == "epsilon":
        epsilon = model_output
        return epsilon, (sample - sigma * epsilon) / a
    if prediction_type == "score":
        epsilon = -sigma * model_output
        return epsilon, (sample - sigma * epsilon) / a
    if prediction_type == "sample":
        return (sample - a * model_output) / sigma, model_output
    if prediction_type == "v_prediction":
        norm_squared = a * a + sigma * sigma
        scaled_v = model_output * norm_squared**0.5
        return (sigma * sample + a * scaled_v) / norm_squared, (a * sample - sigma * scaled_v) / norm_squared
    check_prediction_type(prediction_type)


def model_output_from_epsilon(epsilon, sample, a, sigma, prediction_type: str) -> torch.Tensor:
    """Inverse of ``epsilon_and_sample``: the output of a ``prediction_type`` network that implies ``epsilon`` at
    ``x_t = sample`` (used to hand a modified estimate, e.g. a guided one, back to a scheduler)."""
    return model_target((sample - sigma * epsilon) / a, epsilon, a, sigma, prediction_type)


def score_from_epsilon(epsilon, sigma):
    return -epsilon / sigma


def model_target(sample_0, noise, a, sigma, prediction_type: str) -> torch.Tensor:
    """What a network of ``prediction_type`` should output for ``x_t = a sample_0 + sigma noise`` (training)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "score":
        return -noise / sigma
    if prediction_type == "sample":
        return sample_0
    if prediction_type == "v_prediction":
        return (a * noise - sigma * sample_0) / (a * a + sigma * sigma) ** 0.5
    check_prediction_type(prediction_type)


def timestep_from_t(t: TimeLike, sde: SDE, timestep_type: str, num_train_timesteps: int) -> torch.Tensor:
    """The value a network of ``timestep_type`` is called with at continuous time ``t`` (float64)."""
    t = as_time(t)
    if timestep_type == "discrete":
        return t * (num_train_timesteps - 1)
    if timestep_type == "continuous":
        return t
    if timestep_type == "sigma":
        return sde.sigma(t)
    if timestep_type == "log_sigma":
        return sde.sigma(t).log()
    check_timestep_type(timestep_type)


def t_from_timestep(timestep: TimeLike, sde: SDE, timestep_type: str, num_train_timesteps: int) -> torch.Tensor:
    """Inverse of ``timestep_from_t`` (float64)."""
    timestep = as_time(timestep)
    if timestep_type == "discrete":
        return timestep / (num_train_timesteps - 1)
    if timestep_type == "continuous":
        return timestep
    if timestep_type == "sigma":
        return sde.t_from_sigma(timestep)
    if timestep_type == "log_sigma":
        return sde.t_from_sigma(timestep.exp())
    check_timestep_type(timestep_type)
