"""What a user meets outside the test-suite's usual paths: package data of an installed package, the demo's labels."""

import fnmatch
from pathlib import Path

import pytest

import diffusers_scorekit
from diffusers_scorekit import ProbabilityFlowODEScheduler, cli
from diffusers_scorekit.model_card_template import MODEL_CARD_TEMPLATE

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(diffusers_scorekit.__file__).resolve().parent
SOLVER_NAMES = {"euler": "Euler", "heun": "Heun", "dpm_solver_2m": "DPM-Solver++ 2M"}


def test_model_card_template_is_package_data_and_model_cards_links_to_it():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    assert MODEL_CARD_TEMPLATE.is_file() and PACKAGE in MODEL_CARD_TEMPLATE.parents
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    relative = MODEL_CARD_TEMPLATE.relative_to(PACKAGE).as_posix()
    assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns["diffusers_scorekit"]), patterns
    # one copy of the text: the file readers find in model_cards/ is the packaged one
    assert (ROOT / "model_cards" / MODEL_CARD_TEMPLATE.name).resolve() == MODEL_CARD_TEMPLATE


def test_demo_titles_name_the_solver_that_runs():
    solver = ProbabilityFlowODEScheduler().config.solver
    titles = [title for title, scheduler, *_ in cli.DEMO_SAMPLERS if scheduler == "ProbabilityFlowODEScheduler"]
    assert titles and all(SOLVER_NAMES[solver] in title for title in titles), (solver, titles)
