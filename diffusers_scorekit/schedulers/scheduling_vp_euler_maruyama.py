"""Reverse-time VP or sub-VP SDE sampled with Euler-Maruyama."""

from typing import Optional, Sequence

from diffusers.configuration_utils import register_to_config

from .scheduling_utils import ScoreSchedulerMixin


class VPEulerMaruyamaScheduler(ScoreSchedulerMixin):
    """Euler-Maruyama on the reverse-time variance-preserving (DDPM) or sub-VP SDE (Song et al. 2021).

    Swaps into a ``DDPMPipeline``: ``VPEulerMaruyamaScheduler.from_config(ddpm_scheduler.config)`` gives the VP SDE
    whose marginals are that DDPM schedule, with epsilon output and discrete timesteps.

    ``set_timesteps(n)`` makes ``n`` levels from ``t = 1`` to ``sampling_eps`` and takes ``n - 1`` Euler-Maruyama
    steps between them, then one denoising step if ``denoise_final``: NFE = ``n`` (``n - 1`` without it). With a
    DDPM schedule and ``n = num_train_timesteps`` the levels are exactly the training timesteps.

    Args:
        sde_type (`str`, defaults to `"vp"`): `"vp"` or `"subvp"`.
        beta_min (`float`, defaults to 0.1): ``beta(0)`` of the continuous linear schedule.
        beta_max (`float`, defaults to 20.0): ``beta(1)`` of the continuous linear schedule.
        beta_schedule (`str`, *optional*): a diffusers DDPM schedule (`"linear"`, `"scaled_linear"`,
            `"squaredcos_cap_v2"`, `"sigmoid"`) to use instead of the continuous one; its ``alphas_cumprod`` are
            reproduced at ``t = i / (N - 1)`` and interpolated smoothly in between.
        beta_start (`float`, defaults to 0.0001): first beta of the DDPM schedule.
        beta_end (`float`, defaults to 0.02): last beta of the DDPM schedule.
        trained_betas (`list` of `float`, *optional*): explicit DDPM betas, instead of ``beta_schedule``.
        num_train_timesteps (`int`, defaults to 1000): ``N``: the DDPM schedule's length and the ``"discrete"``
            timestep convention ``t (N - 1)``.
        prediction_type (`str`, defaults to `"epsilon"`): `"epsilon"`, `"score"`, `"sample"` or `"v_prediction"`.
        timestep_type (`str`, defaults to `"discrete"`): `"discrete"`, `"continuous"`, `"sigma"` or `"log_sigma"`.
        sampling_eps (`float`, *optional*): last time of the grid; defaults to 1e-3 on the continuous schedule
            and 0 (the last training step) on a DDPM schedule.
        time_spacing (`str`, defaults to `"uniform"`): `"uniform"` in ``t``, `"log_snr"` or `"edm"`.
        edm_rho (`float`, defaults to 7.0): ``rho`` of the `"edm"` spacing.
        denoise_final (`bool`, defaults to `True`): end with Tweedie's denoising step at the last level.
    """

    _supported_sde_types = ("vp", "subvp")

    @register_to_config
    def __init__(
        self,
        sde_type: str = "vp",
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        beta_schedule: Optional[str] = None,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        trained_betas: Optional[Sequence[float]] = None,
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        timestep_type: str = "discrete",
        sampling_eps: Optional[float] = None,
        time_spacing: str = "uniform",
        edm_rho: float = 7.0,
        denoise_final: bool = True,
    ):
        self._setup()
