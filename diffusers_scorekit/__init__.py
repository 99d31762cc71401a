"""diffusers-scorekit: score-based generative models (NCSN, score SDEs) as first-class diffusers citizens."""

__version__ = "0.1.0"

from .calibration import StepCalibration, calibrate_sigmas
from .models import NCSNScoreModel, ScoreMLP, ScoreModelOutput
from .pipelines import ScoreSDEPipeline, ScoreSDEPipelineOutput
from .parametrization import PREDICTION_TYPES, TIMESTEP_TYPES, epsilon_and_sample, model_target
from .schedulers import (
    AnnealedLangevinScheduler,
    PredictorCorrectorScheduler,
    ProbabilityFlowODEScheduler,
    ScoreSchedulerMixin,
    ScoreSchedulerOutput,
    VEEulerMaruyamaScheduler,
    VPEulerMaruyamaScheduler,
)
from .score_function import ScoreFunction
from .sde import SDE, VESDE, VPSDE, SubVPSDE, build_sde

# diffusers resolves a component saved as ("diffusers_scorekit", "SomeClass") by importing this package and
# finding the base classes it knows as names on it
from diffusers import ModelMixin, SchedulerMixin  # noqa: E402,F401
