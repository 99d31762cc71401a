"""The networks the script trains (``ScoreMLP``, ``NCSNScoreModel``, a ``UNet2DModel`` preset), the forward SDE,
and the sampling scheduler saved with the pipeline."""

import math
from typing import Optional, Tuple

from ..models import NCSNScoreModel, ScoreMLP
from ..schedulers import (
    AnnealedLangevinScheduler,
    PredictorCorrectorScheduler,
    ProbabilityFlowODEScheduler,
    VEEulerMaruyamaScheduler,
    VPEulerMaruyamaScheduler,
)
from ..sde import build_sde
from .data import TrainingData

# UNet2DModel layouts per resolution: every resolution level but the last halves the size
UNET2D_PRESETS = {
    28: {
        "block_out_channels": (32, 64, 128),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    },
    32: {
        "block_out_channels": (64, 128, 128, 256),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    },
    64: {
        "block_out_channels": (128, 128, 256, 256, 512, 512),
        "down_block_types": ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    },
}


def build_model(args, data: TrainingData):
    if args.model == "scorekit_mlp":
        return ScoreMLP(
            data_dim=data.example_shape[0], hidden_dim=args.hidden_dim, num_layers=args.num_layers,
            prediction_type=args.prediction_type, timestep_type=args.timestep_type, num_class_embeds=args.num_classes,
        )
    channels = data.example_shape[0]
    if args.model == "ncsn":
        options = {"block_out_channels": args.block_out_channels, "layers_per_block": args.layers_per_block}
        return NCSNScoreModel(
            in_channels=channels, sample_size=args.resolution,
            prediction_type=args.prediction_type, timestep_type=args.timestep_type,
            num_class_embeds=args.num_classes, **{k: v for k, v in options.items() if v is not None},
        )
    return build_unet2d(args.resolution, channels, block_out_channels=args.block_out_channels,
                        layers_per_block=args.layers_per_block, fourier_time=args.sde == "ve",
                        num_classes=args.num_classes)


def build_unet2d(resolution: int, channels: int, *, block_out_channels: Optional[Tuple[int, ...]] = None,
                 layers_per_block: Optional[int] = None, fourier_time: bool = False,
                 num_classes: Optional[int] = None):
    """The ``UNet2DModel`` of ``UNET2D_PRESETS[resolution]`` (channels per level replaceable, 2 layers per block
    by default), with positional time embeddings (DDPM's) or Fourier ones (NCSN++'s, for the VE SDE). Shared with
    ``benchmarks/train_ddpm_baseline.py`` so that the DDPM baseline trains exactly this network."""
    from diffusers import UNet2DModel

    preset = dict(UNET2D_PRESETS[resolution])
    if block_out_channels is not None:
        if len(block_out_channels) != len(preset["block_out_channels"]):
            raise ValueError(f"--block_out_channels for unet2d at {resolution} px needs "
                             f"{len(preset['block_out_channels'])} entries, got {block_out_channels}.")
        preset["block_out_channels"] = tuple(block_out_channels)
    return UNet2DModel(
        sample_size=resolution, in_channels=channels, out_channels=channels,
        layers_per_block=layers_per_block or 2,
        norm_num_groups=math.gcd(32, *preset["block_out_channels"]),
        time_embedding_type="fourier" if fourier_time else "positional",
        # diffusers' convention for classifier-free guidance: the null label is the last embedding
        num_class_embeds=None if num_classes is None else num_classes + 1,
        **preset,
    )


def training_sde(args):
    """The forward SDE of ``--sde`` with the run's parameters."""
    return build_sde(args.sde, sigma_min=args.sigma_min, sigma_max=args.sigma_max, beta_min=args.beta_min,
                     beta_max=args.beta_max, num_train_timesteps=args.num_train_timesteps)


def sde_config(args) -> dict:
    """The SDE fields every scorekit scheduler config shares."""
    return {
        "sde_type": args.sde, "sigma_min": args.sigma_min, "sigma_max": args.sigma_max, "beta_min": args.beta_min,
        "beta_max": args.beta_max, "num_train_timesteps": args.num_train_timesteps,
        "prediction_type": args.prediction_type, "timestep_type": args.timestep_type,
    }


def build_sampling_scheduler(args):
    """The scheduler of ``--sampler`` on the training SDE, with the model's output and time conventions."""
    reference = PredictorCorrectorScheduler(**sde_config(args))
    if args.sampler == "pc":
        return reference
    if args.sampler == "ode":
        return ProbabilityFlowODEScheduler.from_config(reference.config)
    if args.sampler == "ald":
        # NCSN's 100 Langevin steps per level is for images; a few per level do for the toys
        return AnnealedLangevinScheduler.from_config(reference.config, num_annealed_steps=5)
    euler_maruyama = VEEulerMaruyamaScheduler if args.sde == "ve" else VPEulerMaruyamaScheduler
    return euler_maruyama.from_config(reference.config)
