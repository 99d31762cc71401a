"""Where the model-card template of ``scorekit train`` lives.

It is package data (``assets/``), so an installed package finds it; the repository's top-level ``model_cards/``
links to this same file for readers, so the text exists once.
"""

from pathlib import Path

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent / "assets" / "score_sde_model_card.md"
