"""What the scorekit networks return."""

from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput


@dataclass
class ScoreModelOutput(BaseOutput):
    """Output of a scorekit network.

    Args:
        sample (`torch.Tensor` of the input's shape):
            The network's prediction, in the convention its config's `prediction_type` declares.
    """

    sample: torch.Tensor
