from .scheduling_annealed_langevin import AnnealedLangevinScheduler
from .scheduling_predictor_corrector import PredictorCorrectorScheduler
from .scheduling_probability_flow_ode import ProbabilityFlowODEScheduler
from .scheduling_utils import ScoreSchedulerMixin, ScoreSchedulerOutput
from .scheduling_ve_euler_maruyama import VEEulerMaruyamaScheduler
from .scheduling_vp_euler_maruyama import VPEulerMaruyamaScheduler

__all__ = [
    "AnnealedLangevinScheduler",
    "PredictorCorrectorScheduler",
    "ProbabilityFlowODEScheduler",
    "ScoreSchedulerMixin",
    "ScoreSchedulerOutput",
    "VEEulerMaruyamaScheduler",
    "VPEulerMaruyamaScheduler",
]
