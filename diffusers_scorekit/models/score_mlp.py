"""A noise-conditional residual MLP for low-dimensional data (toy distributions, tabular vectors)."""

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from ..parametrization import check_prediction_type
from .embeddings import (
    ConditioningEmbedding,
    TimestepLike,
    check_positive,
    divide_by_sigma,
    divides_output_by_sigma,
    per_sample,
)
from .outputs import ScoreModelOutput


class ResidualMLPBlock(nn.Module):
    """``h + W2 silu(W1 silu(norm(h)) + P silu(c))``: a pre-norm residual block with the conditioning ``c``
    added between its two layers."""

    def __init__(self, hidden_dim: int, conditioning_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.linear_1 = nn.Linear(hidden_dim, hidden_dim)
        self.conditioning_proj = nn.Linear(conditioning_dim, hidden_dim)
        self.linear_2 = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, hidden: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        residual = self.linear_1(F.silu(self.norm(hidden))) + self.conditioning_proj(F.silu(conditioning))
        return hidden + self.linear_2(F.silu(residual))


class ScoreMLP(ModelMixin, ConfigMixin):
    r"""
    A noise-conditional residual MLP for vectors of shape `(batch, data_dim)`.

    The input is lifted to `hidden_dim`, passed through `num_layers` residual blocks each conditioned on the
    timestep (and class) embedding, and projected back to `data_dim`.

    Parameters:
        data_dim (`int`, *optional*, defaults to 2):
            Dimension of the data vectors.
        hidden_dim (`int`, *optional*, defaults to 128):
            Width of the hidden layers and of the conditioning vector.
        num_layers (`int`, *optional*, defaults to 3):
            Number of residual blocks.
        embedding_dim (`int`, *optional*, defaults to 64):
            Number of sinusoidal timestep features (even).
        prediction_type (`str`, *optional*, defaults to `"score"`):
            What the model outputs: `"epsilon"`, `"score"`, `"sample"` or `"v_prediction"` (see
            `diffusers_scorekit.parametrization`). Metadata the pipeline checks against the scheduler; it only
            changes the network through `scale_output_by_sigma`.
        timestep_type (`str`, *optional*, defaults to `"sigma"`):
            What the model is told the noise level as: `"discrete"` (t (N - 1)), `"continuous"` (t in [0, 1]),
            `"sigma"` or `"log_sigma"`. Decides how the timestep is embedded.
        scale_output_by_sigma (`bool`, *optional*, defaults to `True`):
            For `prediction_type="score"` with a `"sigma"` or `"log_sigma"` timestep only: divide the network
            output by sigma, so the network itself predicts `-noise` (the NCSN parametrisation), which keeps its
            output of order one at every noise level. Ignored otherwise.
        num_class_embeds (`int`, *optional*, defaults to `None`):
            Number of classes for class conditioning; `None` for an unconditional model. Labels run from 0 to
            `num_class_embeds`, the last being the "null" class: `class_labels == num_class_embeds` means
            unconditional (for classifier-free guidance).
    """

    @register_to_config
    def __init__(
        self,
        data_dim: int = 2,
        hidden_dim: int = 128,
        num_layers: int = 3,
        embedding_dim: int = 64,
        prediction_type: str = "score",
        timestep_type: str = "sigma",
        scale_output_by_sigma: bool = True,
        num_class_embeds: Optional[int] = None,
    ):
        super().__init__()
        check_prediction_type(prediction_type)
        check_positive(data_dim=data_dim, hidden_dim=hidden_dim, num_layers=num_layers)
        self.conditioning = ConditioningEmbedding(timestep_type, embedding_dim, hidden_dim, num_class_embeds)
        self.divides_output_by_sigma = divides_output_by_sigma(prediction_type, timestep_type, scale_output_by_sigma)
        self.input_proj = nn.Linear(data_dim, hidden_dim)
        self.blocks = nn.ModuleList(ResidualMLPBlock(hidden_dim, hidden_dim) for _ in range(num_layers))
        self.output_norm = nn.LayerNorm(hidden_dim)
        self.output_proj = nn.Linear(hidden_dim, data_dim)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: TimestepLike,
        class_labels: Optional[TimestepLike] = None,
        return_dict: bool = True,
    ) -> Union[ScoreModelOutput, Tuple[torch.Tensor]]:
        r"""
        Args:
            sample (`torch.Tensor`): the noisy vectors, of shape `(batch, data_dim)`.
            timestep (`float`, `int` or `torch.Tensor`): the noise level in the config's `timestep_type`, one for
                the batch (a number or 0-d tensor) or one per sample (shape `(batch,)`).
            class_labels (`int` or `torch.Tensor`, *optional*): labels in `[0, num_class_embeds]` for a
                class-conditional model (`num_class_embeds` = unconditional); must be `None` otherwise.
            return_dict (`bool`, *optional*, defaults to `True`): return a `ScoreModelOutput` or a tuple.

        Returns:
            `ScoreModelOutput` or `tuple`: the prediction, of the shape of `sample`.
        """
        data_dim = self.config.data_dim
        if sample.ndim != 2 or sample.shape[1] != data_dim:
            raise ValueError(f"sample must have shape (batch, {data_dim}), got {tuple(sample.shape)}.")
        timestep = per_sample(timestep, sample.shape[0], sample.device, torch.float32, "timestep")
        conditioning = self.conditioning(timestep, class_labels)

        hidden = self.input_proj(sample.to(self.input_proj.weight.dtype))
        for block in self.blocks:
            hidden = block(hidden, conditioning)
        output = self.output_proj(F.silu(self.output_norm(hidden)))

        if self.divides_output_by_sigma:
            output = divide_by_sigma(output, timestep, self.config.timestep_type)
        return ScoreModelOutput(sample=output) if return_dict else (output,)
