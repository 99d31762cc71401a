from .diffusers_registration import register_with_diffusers
from .score_sde import ScoreSDEPipeline, ScoreSDEPipelineOutput

register_with_diffusers(ScoreSDEPipeline)

__all__ = ["ScoreSDEPipeline", "ScoreSDEPipelineOutput"]
