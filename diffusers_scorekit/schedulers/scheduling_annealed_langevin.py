"""Annealed Langevin dynamics (Song & Ermon 2019, NCSN; 2020, NCSNv2)."""

from typing import List

import numpy as np
from diffusers.configuration_utils import register_to_config

from ..parametrization import score_from_epsilon
from .scheduling_utils import ScoreSchedulerMixin, Stage
from .sde_updates import langevin


class AnnealedLangevinScheduler(ScoreSchedulerMixin):
    """NCSN's annealed Langevin dynamics over a geometric ladder of noise levels.

    ``set_timesteps(n)`` makes the ladder ``sigma_1 = sigma_max > ... > sigma_n = sigma_min`` (geometric) and
    runs ``num_annealed_steps`` Langevin steps at each level,

        x <- x + alpha_i score(x, sigma_i) + sqrt(2 alpha_i) z,    alpha_i = step_lr sigma_i^2 / sigma_n^2,

    as NCSN's reference code does (its paper writes the same step as ``alpha_i / 2`` and ``sqrt(alpha_i)``),
    then, if ``denoise_final``, NCSNv2's denoising step ``x + sigma_n^2 score(x, sigma_n)``.
    NFE = ``n * num_annealed_steps + denoise_final``; ``order = num_annealed_steps`` (entries per level).
    With ``step_lr = 2 snr^2 sigma_min^2`` it equals
    ``PredictorCorrectorScheduler(sde_type="ve", predictor="none", corrector="annealed_langevin", snr=snr,
    sampling_eps=0)``.

    Args:
        sigma_min (`float`, defaults to 0.01): the last (smallest) noise level.
        sigma_max (`float`, defaults to 1.0): the first noise level and the prior's std (``init_noise_sigma``).
        num_annealed_steps (`int`, defaults to 100): Langevin steps per level (NCSN's ``n_steps_each``).
        step_lr (`float`, defaults to 2e-5): ``epsilon`` of the step size (NCSN's ``step_lr``).
        num_train_timesteps (`int`, defaults to 1000): ``N`` of the ``"discrete"`` timestep convention.
        prediction_type (`str`, defaults to `"score"`): `"score"`, `"epsilon"`, `"sample"` or `"v_prediction"`.
        timestep_type (`str`, defaults to `"sigma"`): `"sigma"`, `"log_sigma"`, `"continuous"` or `"discrete"`;
            the ladder sits at ``t`` uniform in [0, 1] of the VE SDE with this sigma range.
        denoise_final (`bool`, defaults to `True`): end with the denoising step.
        noise_scale (`float`, defaults to 1.0): scales the Langevin noise ``sqrt(2 alpha_i) z``. 1 is Langevin
            dynamics (samples the distribution); 0 is noise-free score ascent, ``x + alpha_i score``, which climbs
            to the modes of the smoothed density instead (draws no noise; ``generator`` has no effect).
    """

    _supported_sde_types = ("ve",)

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.01,
        sigma_max: float = 1.0,
        num_annealed_steps: int = 100,
        step_lr: float = 2e-5,
        num_train_timesteps: int = 1000,
        prediction_type: str = "score",
        timestep_type: str = "sigma",
        denoise_final: bool = True,
        noise_scale: float = 1.0,
    ):
        self._setup()
        # entries per level, so that timesteps[k * order] begins level k (img2img's strength slice)
        self.order = num_annealed_steps

    def _level_times(self, num_levels: int) -> np.ndarray:
        # the geometric ladder from sigma_max to exactly sigma_min, whatever sampling_eps would say
        return np.linspace(1.0, 0.0, num_levels)

    def _make_stages(self, num_levels: int) -> List[Stage]:
        stages = []
        for level in range(num_levels):
            stages += [Stage("langevin", level)] * self.config.num_annealed_steps
        if self.config.denoise_final:
            stages.append(Stage("denoise", num_levels - 1))
        return stages

    def _update(self, stage, x, epsilon, sample_0, noise):
        if stage.kind == "denoise":
            return sample_0
        sigma = self._levels[stage.level].sigma
        step_size = self.config.step_lr * (sigma / self._levels[-1].sigma) ** 2
        return langevin(x, score_from_epsilon(epsilon, sigma), step_size, self.config.noise_scale * noise)
