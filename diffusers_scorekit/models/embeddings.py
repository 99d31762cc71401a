"""Noise-level conventions and the conditioning embedding shared by the scorekit networks.

A network is told the noise level in its config's ``timestep_type`` (see ``diffusers_scorekit.parametrization``)
and, when class-conditional, a class label. ``ConditioningEmbedding`` turns both into the one vector every block
of the network is conditioned on.
"""

import math
from typing import Optional, Union

import torch
from torch import nn

from ..parametrization import check_timestep_type

#: sigma is clamped to this before its log is taken or the output is divided by it
MIN_SIGMA = 1e-12
#: longest period of the sinusoidal features (as in DDPM / the Transformer)
MAX_PERIOD = 10000.0
# The sinusoidal features resolve values spread over about [0, 1000], the range of DDPM's integer timesteps. The
# other conventions are stretched to a similar spread: t in [0, 1] by 1000, log sigma (about [-7, 6] for the
# usual VE and VP noise ranges) by 100.
CONTINUOUS_TIME_SCALE = 1000.0
LOG_SIGMA_SCALE = 100.0

TimestepLike = Union[float, int, torch.Tensor]


def check_positive(**sizes) -> None:
    """Raise a ValueError naming the first size that is not a positive integer."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def divides_output_by_sigma(prediction_type: str, timestep_type: str, scale_output_by_sigma: bool) -> bool:
    """Whether the raw network output is divided by sigma: the NCSN convention for a score model told sigma, where
    the network predicts ``-noise`` and the score is ``-noise / sigma``."""
    return scale_output_by_sigma and prediction_type == "score" and timestep_type in ("sigma", "log_sigma")


def per_sample(value: TimestepLike, batch_size: int, device: torch.device, dtype: torch.dtype, name: str):
    """``value`` (a number, a 0-d tensor, or one entry per sample) as a tensor of shape ``(batch_size,)``."""
    value = torch.as_tensor(value, dtype=dtype, device=device)
    if value.ndim == 0 or value.shape == (1,):
        return value.reshape(()).expand(batch_size)
    if value.shape != (batch_size,):
        raise ValueError(
            f"{name} must be a number, a 0-d tensor or a tensor of shape ({batch_size},) (one per sample), "
            f"got shape {tuple(value.shape)}."
        )
    return value


def sigma_from_timestep(timestep: torch.Tensor, timestep_type: str) -> torch.Tensor:
    """The noise level ``sigma`` of a ``"sigma"`` or ``"log_sigma"`` timestep."""
    if timestep_type == "sigma":
        return timestep.clamp_min(MIN_SIGMA)
    if timestep_type == "log_sigma":
        return timestep.exp()
    raise ValueError(f"a timestep_type={timestep_type!r} timestep does not carry sigma.")


def divide_by_sigma(output: torch.Tensor, timestep: torch.Tensor, timestep_type: str) -> torch.Tensor:
    """``output / sigma`` with one sigma per sample (``timestep`` has shape ``(batch,)``)."""
    sigma = sigma_from_timestep(timestep, timestep_type)
    return output / sigma.to(output.dtype).reshape(-1, *([1] * (output.ndim - 1)))


def sinusoidal_features(value: torch.Tensor, num_features: int) -> torch.Tensor:
    """``[cos(f_k value), sin(f_k value)]`` for ``num_features // 2`` frequencies from 1 down to ``1 / MAX_PERIOD``."""
    half = num_features // 2
    frequencies = torch.exp(-math.log(MAX_PERIOD) / half * torch.arange(half, device=value.device))
    angles = value.float()[:, None] * frequencies[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class ConditioningEmbedding(nn.Module):
    """``(timestep, class_labels)`` -> the vector of size ``out_dim`` a scorekit network's blocks are conditioned on.

    The timestep is read in its ``timestep_type``: ``"sigma"`` is embedded as ``log(max(sigma, 1e-12))``,
    ``"log_sigma"`` as is, ``"continuous"`` t in [0, 1] as ``1000 t`` and ``"discrete"`` as is; the value goes
    through sinusoidal features and a two-layer SiLU MLP. A class embedding, when there is one, is added.

    Args:
        timestep_type (`str`): what the network is told the noise level as.
        embedding_dim (`int`): number of sinusoidal features (even).
        out_dim (`int`): size of the conditioning vector.
        num_class_embeds (`int`, *optional*): number of classes. The embedding holds one more row, label
            ``num_class_embeds``, the "null" class meaning "unconditional" (for classifier-free guidance).
    """

    def __init__(self, timestep_type: str, embedding_dim: int, out_dim: int, num_class_embeds: Optional[int] = None):
        super().__init__()
        check_timestep_type(timestep_type)
        check_positive(embedding_dim=embedding_dim, out_dim=out_dim)
        if embedding_dim % 2:
            raise ValueError(f"embedding_dim must be even (cos and sin of each frequency), got {embedding_dim}.")
        if num_class_embeds is not None:
            check_positive(num_class_embeds=num_class_embeds)
        self.timestep_type = timestep_type
        self.embedding_dim = embedding_dim
        self.num_class_embeds = num_class_embeds
        self.time_mlp = nn.Sequential(nn.Linear(embedding_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        self.class_embedding = None if num_class_embeds is None else nn.Embedding(num_class_embeds + 1, out_dim)

    def embedding_input(self, timestep: torch.Tensor) -> torch.Tensor:
        """The value whose sinusoidal features are taken, on a scale where they resolve it."""
        if self.timestep_type == "sigma":
            return LOG_SIGMA_SCALE * timestep.clamp_min(MIN_SIGMA).log()
        if self.timestep_type == "log_sigma":
            return LOG_SIGMA_SCALE * timestep
        if self.timestep_type == "continuous":
            return CONTINUOUS_TIME_SCALE * timestep
        return timestep

    def forward(self, timestep: torch.Tensor, class_labels: Optional[TimestepLike] = None) -> torch.Tensor:
        """``timestep``: float tensor of shape ``(batch,)``; ``class_labels``: an int or one label per sample."""
        features = sinusoidal_features(self.embedding_input(timestep), self.embedding_dim)
        # the MLP runs in the model's dtype (features are computed in float32 for accuracy)
        embedding = self.time_mlp(features.to(self.time_mlp[0].weight.dtype))
        if self.class_embedding is None:
            if class_labels is not None:
                raise ValueError("class_labels were given, but the model is unconditional (num_class_embeds=None).")
            return embedding
        if class_labels is None:
            raise ValueError(
                f"the model is class-conditional (num_class_embeds={self.num_class_embeds}): pass class_labels, "
                f"using label {self.num_class_embeds} for unconditional."
            )
        labels = per_sample(class_labels, timestep.shape[0], timestep.device, torch.long, "class_labels")
        if labels.min() < 0 or labels.max() > self.num_class_embeds:
            raise ValueError(
                f"class_labels must lie in [0, {self.num_class_embeds}] ({self.num_class_embeds} = unconditional), "
                f"got values in [{labels.min().item()}, {labels.max().item()}]."
            )
        return embedding + self.class_embedding(labels)
