"""Native noise-conditional score networks: ``ScoreMLP`` for vectors, ``NCSNScoreModel`` for images."""

from .embeddings import ConditioningEmbedding
from .ncsn import NCSNScoreModel
from .outputs import ScoreModelOutput
from .score_mlp import ScoreMLP

__all__ = ["ConditioningEmbedding", "NCSNScoreModel", "ScoreMLP", "ScoreModelOutput"]
