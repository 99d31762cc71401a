"""Predictor-corrector sampling of the reverse-time SDE (Song et al. 2021, Algorithms 2 and 3)."""

from typing import Optional, Sequence

from diffusers.configuration_utils import register_to_config

from .scheduling_utils import ScoreSchedulerMixin, _fail

PREDICTORS = ("euler_maruyama", "reverse_diffusion", "ancestral", "none")
CORRECTORS = ("langevin", "annealed_langevin", "none")


class PredictorCorrectorScheduler(ScoreSchedulerMixin):
    """Predictor-corrector sampler for the VE, VP and sub-VP SDEs.

    ``set_timesteps(n)`` makes ``n`` levels from ``t = 1`` to ``sampling_eps``. At each level it runs
    ``num_corrector_steps`` corrector calls, then one predictor call that moves to the next level; at the last
    level the predictor call is replaced by Tweedie's denoising step if ``denoise_final``. NFE =
    ``n * num_corrector_steps + (n - 1) + denoise_final`` (the corrector term is 0 with ``corrector="none"``,
    the predictor term with ``predictor="none"``). ``order`` is the number of entries per level
    (``num_corrector_steps + 1``), so ``timesteps[k * order]`` is the first corrector call at level ``k``: where
    diffusers' img2img and inpainting pipelines begin for a ``strength``.

    ``from_config`` of a ``ScoreSdeVeScheduler`` config gives the same sampler as diffusers' ScoreSdeVe
    pipeline (reverse diffusion + Langevin); of a ``DDPMScheduler`` config, the VP SDE
    of that schedule, where ``predictor="ancestral"`` is DDPM's own step.

    Args:
        sde_type (`str`, defaults to `"ve"`): `"ve"`, `"vp"` or `"subvp"`.
        sigma_min (`float`, defaults to 0.01): VE: ``sigma(0)``.
        sigma_max (`float`, defaults to 50.0): VE: ``sigma(1)`` and the prior's std.
        beta_min (`float`, defaults to 0.1): VP/sub-VP: ``beta(0)`` of the continuous linear schedule.
        beta_max (`float`, defaults to 20.0): VP/sub-VP: ``beta(1)`` of the continuous linear schedule.
        beta_schedule (`str`, *optional*): VP/sub-VP: a diffusers DDPM schedule name (`"linear"`,
            `"scaled_linear"`, `"squaredcos_cap_v2"`, `"sigmoid"`) instead of the continuous schedule.
        beta_start (`float`, defaults to 0.0001): first beta of the DDPM schedule.
        beta_end (`float`, defaults to 0.02): last beta of the DDPM schedule.
        trained_betas (`list` of `float`, *optional*): explicit DDPM betas.
        num_train_timesteps (`int`, defaults to 1000): ``N``: the DDPM schedule's length, the ``"discrete"``
            timestep convention ``t (N - 1)``, and the ``1/N`` of the VP corrector's ``alpha``.
        prediction_type (`str`, defaults to `"score"`): `"score"`, `"epsilon"`, `"sample"` or `"v_prediction"`.
        timestep_type (`str`, defaults to `"sigma"`): `"sigma"`, `"log_sigma"`, `"continuous"` or `"discrete"`.
        sampling_eps (`float`, *optional*): last time of the grid (defaults: 1e-5 VE, 1e-3 continuous VP/sub-VP,
            0 on a DDPM schedule).
        predictor (`str`, defaults to `"reverse_diffusion"`): `"euler_maruyama"` (the reverse SDE in ``t``),
            `"reverse_diffusion"` (the discretised forward step run backwards), `"ancestral"` (sample the
            posterior ``q(x_lo | x_hi, x_0)``; DDPM on VP) or `"none"`.
        corrector (`str`, defaults to `"langevin"`): `"langevin"` (score_sde's step ``2 alpha (snr |z| / |score|)^2``
            with norms averaged over the batch, so samples of a batch are coupled), `"annealed_langevin"` (step
            ``2 alpha (snr sigma)^2``, NCSN's rule, independent of the batch) or `"none"`.
        snr (`float`, defaults to 0.16): the corrector's signal-to-noise ratio ``r``.
        num_corrector_steps (`int`, defaults to 1): corrector calls per level.
        time_spacing (`str`, defaults to `"uniform"`): `"uniform"` in ``t``, `"log_snr"` or `"edm"`.
        edm_rho (`float`, defaults to 7.0): ``rho`` of the `"edm"` spacing.
        denoise_final (`bool`, defaults to `True`): end with Tweedie's denoising step at the last level.
    """

    @register_to_config
    def __init__(
        self,
        sde_type: str = "ve",
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        beta_schedule: Optional[str] = None,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        trained_betas: Optional[Sequence[float]] = None,
        num_train_timesteps: int = 1000,
        prediction_type: str = "score",
        timestep_type: str = "sigma",
        sampling_eps: Optional[float] = None,
        predictor: str = "reverse_diffusion",
        corrector: str = "langevin",
        snr: float = 0.16,
        num_corrector_steps: int = 1,
        time_spacing: str = "uniform",
        edm_rho: float = 7.0,
        denoise_final: bool = True,
    ):
        if predictor not in PREDICTORS:
            _fail("predictor", predictor, f"choose one of {PREDICTORS}")
        if corrector not in CORRECTORS:
            _fail("corrector", corrector, f"choose one of {CORRECTORS}")
        if predictor == "none" and corrector == "none":
            _fail("predictor", predictor, "with corrector='none' too there is no step to take; choose a predictor")
        self._setup()
        # entries per level, so that timesteps[k * order] begins level k (img2img's strength slice)
        self.order = (num_corrector_steps if corrector != "none" else 0) + (predictor != "none")
