"""A network together with its conventions, as a function of ``(x, t)`` with continuous ``t``.

The pipeline (guidance, inpainting), the likelihood ODE and the training losses all need "the score / noise /
clean-sample estimate at ``x`` and time ``t``" whatever the network outputs and whatever it is conditioned on;
this is where a network call is turned into that.
"""

from typing import Callable, Optional, Tuple

import torch

from .parametrization import (
    check_prediction_type,
    check_timestep_type,
    epsilon_and_sample,
    score_from_epsilon,
    timestep_from_t,
)
from .sde import SDE, TimeLike, as_time, broadcast_like


def call_model(model: Callable, x: torch.Tensor, timestep: torch.Tensor, **model_kwargs) -> torch.Tensor:
    """``model(x, timestep).sample`` for diffusers-style models, the tensor itself for plain functions."""
    output = model(x, timestep, **model_kwargs)
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


class ScoreFunction:
    """``model`` seen through ``sde`` and its ``prediction_type`` / ``timestep_type`` conventions.

    Args:
        model: a ``UNet2DModel``, a scorekit model or any callable ``(x, timestep, **kwargs)``.
        sde: the forward SDE the model was trained with.
        prediction_type: what the model outputs (see ``parametrization``).
        timestep_type: what the model is conditioned on (see ``parametrization``).
        num_train_timesteps: ``N`` of the ``"discrete"`` convention.
    """

    def __init__(
        self,
        model: Callable,
        sde: SDE,
        prediction_type: str,
        timestep_type: str,
        num_train_timesteps: int = 1000,
    ):
        check_prediction_type(prediction_type)
        check_timestep_type(timestep_type)
        self.model = model
        self.sde = sde
        self.prediction_type = prediction_type
        self.timestep_type = timestep_type
        self.num_train_timesteps = num_train_timesteps

    def _per_sample_time(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        t = as_time(t).to(x.device)
        return t.expand(x.shape[0]) if t.ndim == 0 else t.reshape(x.shape[0])

    def model_output(self, x: torch.Tensor, t: TimeLike, **model_kwargs) -> torch.Tensor:
        """The raw network output at ``x`` and time ``t`` (a number or one time per sample)."""
        t = self._per_sample_time(x, t)
        timestep = timestep_from_t(t, self.sde, self.timestep_type, self.num_train_timesteps)
        return call_model(self.model, x, timestep.to(torch.float32), **model_kwargs)

    def epsilon_and_sample(
        self, x: torch.Tensor, t: TimeLike, model_output: Optional[torch.Tensor] = None, **model_kwargs
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(eps, x_0)`` estimates at ``x`` and ``t``; pass ``model_output`` to reuse a call already made."""
        t = self._per_sample_time(x, t)
        if model_output is None:
            model_output = self.model_output(x, t, **model_kwargs)
        a, sigma = self.sde.marginal(t)
        return epsilon_and_sample(
            model_output.to(x.dtype), x, broadcast_like(a, x), broadcast_like(sigma, x), self.prediction_type
        )

    def score(self, x: torch.Tensor, t: TimeLike, **model_kwargs) -> torch.Tensor:
        """``grad_x log p_t(x)`` estimated by the model."""
        epsilon, _ = self.epsilon_and_sample(x, t, **model_kwargs)
        sigma = self.sde.sigma(self._per_sample_time(x, t))
        return score_from_epsilon(epsilon, broadcast_like(sigma, x))
