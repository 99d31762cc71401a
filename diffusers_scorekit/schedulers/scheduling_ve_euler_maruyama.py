"""Reverse-time VE SDE sampled with Euler-Maruyama."""

from typing import Optional

from diffusers.configuration_utils import register_to_config

from .scheduling_utils import ScoreSchedulerMixin


class VEEulerMaruyamaScheduler(ScoreSchedulerMixin):
    """Euler-Maruyama on the reverse-time variance-exploding SDE (Song et al. 2021, SMLD/NCSN models).

    ``set_timesteps(n)`` makes ``n`` levels, ``t`` uniform from 1 to ``sampling_eps`` (so ``sigma`` geometric from
    ``sigma_max``), and takes ``n - 1`` Euler-Maruyama steps between them, then one denoising step if
    ``denoise_final``: NFE = ``n`` (``n - 1`` without it).

    Args:
        sigma_min (`float`, defaults to 0.01): smallest noise level, ``sigma(0)``.
        sigma_max (`float`, defaults to 50.0): largest noise level, ``sigma(1)``; also the prior's std
            (``init_noise_sigma``).
        num_train_timesteps (`int`, defaults to 1000): ``N`` of the ``"discrete"`` timestep convention ``t (N - 1)``.
        prediction_type (`str`, defaults to `"score"`): what the model outputs: `"score"`, `"epsilon"`,
            `"sample"` or `"v_prediction"`.
        timestep_type (`str`, defaults to `"sigma"`): what the model is called with: `"sigma"`, `"log_sigma"`,
            `"continuous"` (``t``) or `"discrete"` (``t (N - 1)``).
        sampling_eps (`float`, *optional*): last time of the grid; defaults to 1e-5.
        time_spacing (`str`, defaults to `"uniform"`): `"uniform"` in ``t``, `"log_snr"` or `"edm"` (rho-spacing).
        edm_rho (`float`, defaults to 7.0): ``rho`` of the `"edm"` spacing.
        denoise_final (`bool`, defaults to `True`): end with Tweedie's denoising step ``x + sigma^2 score`` at the
            last level, which removes the residual noise ``sigma(sampling_eps)``.
    """

    _supported_sde_types = ("ve",)

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        num_train_timesteps: int = 1000,
        prediction_type: str = "score",
        timestep_type: str = "sigma",
        sampling_eps: Optional[float] = None,
        time_spacing: str = "uniform",
        edm_rho: float = 7.0,
        denoise_final: bool = True,
    ):
        self._setup()
