from .score_sde import ScoreSDEPipeline, ScoreSDEPipelineOutput

__all__ = ["ScoreSDEPipeline", "ScoreSDEPipelineOutput"]
