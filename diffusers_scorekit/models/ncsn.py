"""A small noise-conditional U-Net for images, in the NCSN tradition."""

from typing import Optional, Sequence, Tuple, Union

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


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the conditioning vector added to the channels in between, plus a skip."""

    def __init__(self, in_channels: int, out_channels: int, conditioning_dim: int, norm_num_groups: int):
        super().__init__()
        self.norm_1 = nn.GroupNorm(norm_num_groups, in_channels)
        self.conv_1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conditioning_proj = nn.Linear(conditioning_dim, out_channels)
        self.norm_2 = nn.GroupNorm(norm_num_groups, out_channels)
        self.conv_2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        hidden = self.conv_1(F.silu(self.norm_1(x)))
        hidden = hidden + self.conditioning_proj(F.silu(conditioning))[:, :, None, None]
        hidden = self.conv_2(F.silu(self.norm_2(hidden)))
        return self.skip(x) + hidden


class Upsample(nn.Module):
    """Nearest-neighbour doubling followed by a 3x3 conv (avoids the checkerboard of transposed convs)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class NCSNScoreModel(ModelMixin, ConfigMixin):
    r"""
    A small noise-conditional U-Net for images of shape `(batch, in_channels, height, width)`.

    A 3x3 conv lifts the image to `block_out_channels[0]` channels; each resolution level then runs
    `layers_per_block` residual blocks (GroupNorm, SiLU, conditioned on the timestep and class embedding) and halves
    the resolution with a strided conv; the decoder mirrors it, concatenating each level's encoder features (skip
    connections) and upsampling by nearest neighbour + conv; a GroupNorm-SiLU-conv maps back to `out_channels`.
    Height and width must be divisible by `2 ** (len(block_out_channels) - 1)`.

    Parameters:
        in_channels (`int`, *optional*, defaults to 1):
            Number of channels of the input image.
        out_channels (`int`, *optional*, defaults to `None`):
            Number of channels of the output; `None` for `in_channels`.
        sample_size (`int` or `Tuple[int, int]`, *optional*, defaults to 28):
            Height and width of the training images: what a pipeline samples. Other sizes (divisible as above)
            are accepted too.
        block_out_channels (`Tuple[int]`, *optional*, defaults to `(32, 64, 64)`):
            Channels of each resolution level, finest first; their number sets the number of levels.
        layers_per_block (`int`, *optional*, defaults to 1):
            Residual blocks per level in the encoder and in the decoder.
        norm_num_groups (`int`, *optional*, defaults to 8):
            Groups of the GroupNorms; must divide every entry of `block_out_channels`.
        embedding_dim (`int`, *optional*, defaults to 64):
            Number of sinusoidal timestep features (even). The conditioning vector has `4 * block_out_channels[0]`
            entries.
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
        in_channels: int = 1,
        out_channels: Optional[int] = None,
        sample_size: Union[int, Tuple[int, int]] = 28,
        block_out_channels: Sequence[int] = (32, 64, 64),
        layers_per_block: int = 1,
        norm_num_groups: int = 8,
        embedding_dim: int = 64,
        prediction_type: str = "score",
        timestep_type: str = "sigma",
        scale_output_by_sigma: bool = True,
        num_class_embeds: Optional[int] = None,
    ):
        super().__init__()
        check_prediction_type(prediction_type)
        out_channels = in_channels if out_channels is None else out_channels
        check_positive(
            in_channels=in_channels,
            out_channels=out_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
        )
        block_out_channels = tuple(block_out_channels)
        if not block_out_channels:
            raise ValueError("block_out_channels must list at least one level's channels, got ().")
        for channels in block_out_channels:
            check_positive(block_out_channels=channels)
            if channels % norm_num_groups:
                raise ValueError(
                    f"norm_num_groups={norm_num_groups} must divide every entry of block_out_channels, "
                    f"got {block_out_channels}."
                )
        self.size_multiple = 2 ** (len(block_out_channels) - 1)
        sizes = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        if len(sizes) != 2:
            raise ValueError(f"sample_size must be an int or a (height, width) pair, got {sample_size!r}.")
        for size in sizes:
            check_positive(sample_size=size)
            if size % self.size_multiple:
                raise ValueError(
                    f"sample_size={sample_size} must be divisible by {self.size_multiple} "
                    f"(2 ** (len(block_out_channels) - 1)) to go through the U-Net's resolution levels."
                )

        conditioning_dim = 4 * block_out_channels[0]
        self.conditioning = ConditioningEmbedding(timestep_type, embedding_dim, conditioning_dim, num_class_embeds)
        self.divides_output_by_sigma = divides_output_by_sigma(prediction_type, timestep_type, scale_output_by_sigma)

        def resnet_block(block_in: int, block_out: int) -> ResnetBlock:
            return ResnetBlock(block_in, block_out, conditioning_dim, norm_num_groups)

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        channels = block_out_channels[0]
        for level, level_channels in enumerate(block_out_channels):
            blocks = [
                resnet_block(channels if i == 0 else level_channels, level_channels) for i in range(layers_per_block)
            ]
            self.down_blocks.append(nn.ModuleList(blocks))
            channels = level_channels
            if level < len(block_out_channels) - 1:
                self.downsamplers.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1))

        self.mid_block = resnet_block(channels, channels)

        self.up_blocks = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for level in reversed(range(len(block_out_channels))):
            level_channels = block_out_channels[level]
            # the first block also takes the encoder's features of this level
            blocks = [
                resnet_block(channels + level_channels if i == 0 else level_channels, level_channels)
                for i in range(layers_per_block)
            ]
            self.up_blocks.append(nn.ModuleList(blocks))
            channels = level_channels
            if level > 0:
                self.upsamplers.append(Upsample(channels))

        self.norm_out = nn.GroupNorm(norm_num_groups, channels)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: TimestepLike,
        class_labels: Optional[TimestepLike] = None,
        return_dict: bool = True,
    ) -> Union[ScoreModelOutput, Tuple[torch.Tensor]]:
        r"""
        Args:
            sample (`torch.Tensor`): the noisy images, of shape `(batch, in_channels, height, width)` with height
                and width divisible by `2 ** (len(block_out_channels) - 1)`.
            timestep (`float`, `int` or `torch.Tensor`): the noise level in the config's `timestep_type`, one for
                the batch (a number or 0-d tensor) or one per sample (shape `(batch,)`).
            class_labels (`int` or `torch.Tensor`, *optional*): labels in `[0, num_class_embeds]` for a
                class-conditional model (`num_class_embeds` = unconditional); must be `None` otherwise.
            return_dict (`bool`, *optional*, defaults to `True`): return a `ScoreModelOutput` or a tuple.

        Returns:
            `ScoreModelOutput` or `tuple`: the prediction, of shape `(batch, out_channels, height, width)`.
        """
        in_channels = self.config.in_channels
        if sample.ndim != 4 or sample.shape[1] != in_channels:
            raise ValueError(
                f"sample must have shape (batch, {in_channels}, height, width), got {tuple(sample.shape)}."
            )
        if sample.shape[2] % self.size_multiple or sample.shape[3] % self.size_multiple:
            raise ValueError(
                f"sample height and width must be divisible by {self.size_multiple} "
                f"(2 ** (len(block_out_channels) - 1)), got {tuple(sample.shape[2:])}."
            )
        timestep = per_sample(timestep, sample.shape[0], sample.device, torch.float32, "timestep")
        conditioning = self.conditioning(timestep, class_labels)

        hidden = self.conv_in(sample.to(self.conv_in.weight.dtype))
        encoder_features = []
        for level, blocks in enumerate(self.down_blocks):
            for block in blocks:
                hidden = block(hidden, conditioning)
            encoder_features.append(hidden)
            if level < len(self.downsamplers):
                hidden = self.downsamplers[level](hidden)

        hidden = self.mid_block(hidden, conditioning)

        for level, blocks in enumerate(self.up_blocks):
            hidden = torch.cat([hidden, encoder_features.pop()], dim=1)
            for block in blocks:
                hidden = block(hidden, conditioning)
            if level < len(self.upsamplers):
                hidden = self.upsamplers[level](hidden)

        output = self.conv_out(F.silu(self.norm_out(hidden)))
        if self.divides_output_by_sigma:
            output = divide_by_sigma(output, timestep, self.config.timestep_type)
        return ScoreModelOutput(sample=output) if return_dict else (output,)
