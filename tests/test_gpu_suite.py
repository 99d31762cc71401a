"""The one-command GPU suite (benchmarks/gpu_suite.py): its smoke mode runs every part on the CPU and writes every
figure, and a part that runs out of time or fails keeps what it finished without costing the others."""

import importlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffusers_scorekit import metrics

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO_ROOT / "benchmarks"
HAS_FASHION_MNIST = Path(metrics.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file()
# per part: the row keys that must hold a number in every row (training: the rows that were not skipped)
NUMBERS = {
    "scheduler": ("us_per_step", "ratio_to_diffusers_euler"),
    "pipeline": ("seconds", "ratio_to_nfe_forwards"),
    "training": ("images_per_second", "ratio_to_reference", "ms_per_step"),
    "likelihood": ("scorekit_bits_per_dim", "score_sde_bits_per_dim", "scorekit_seconds", "score_sde_seconds",
                   "speed_up"),
    "fashion_mnist": ("frechet_distance", "precision", "recall", "nfe"),
}
ROW_COUNTS = {"scheduler": 11, "pipeline": 7, "training": 8, "likelihood": 2, "fashion_mnist": 1 + 5 + 5}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run of the whole suite, as the command line runs it (the Fashion-MNIST part only where Debian's
    dataset-fashion-mnist is installed)."""
    output = tmp_path_factory.mktemp("gpu_suite")
    parts = ["scheduler", "pipeline", "training", "likelihood"] + (["fashion_mnist"] if HAS_FASHION_MNIST else [])
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_suite.py"), "--smoke", "--output_dir", str(output),
         "--work_dir", str(output / "work"), "--parts", *parts],
        env=environment, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return output, parts, time.monotonic() - started


def test_smoke_run_writes_every_part_with_numbers(smoke):
    output, parts, seconds = smoke
    results = json.loads((output / "gpu_suite.json").read_text())
    assert results["mode"] == "smoke" and list(results["parts"]) == parts
    assert results["machine"]["device"] and results["seconds"] < seconds + 1
    table = (output / "gpu_suite.md").read_text()
    for name in parts:
        part = results["parts"][name]
        assert part["status"] == "complete", (name, part.get("error"), part.get("traceback"))
        assert len(part["rows"]) == ROW_COUNTS[name], name
        measured = [row for row in part["rows"] if not row.get("skipped")]
        for row in measured:
            for key in NUMBERS[name]:
                assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (name, key, row)
        # every measured row is a line of the part's table
        first_column = {"scheduler": "scheduler", "pipeline": "sampler", "training": "config", "likelihood": "model",
                        "fashion_mnist": "sampler"}[name]
        for row in measured:
            assert f"| {row[first_column]} |" in table
    training = results["parts"]["training"]["rows"]
    # on the CPU, TF32 and torch.compile alone are skipped; the reference is timed first and last
    assert [row["config"] for row in training if row.get("skipped")] == ["allow_tf32", "torch_compile"]
    assert [row["step"] for row in training].count("reference") == 2
    references = [row["images_per_second"] for row in training if row["step"] == "reference"]
    for row in training:
        if not row.get("skipped"):
            assert row["ratio_to_reference"] == pytest.approx(row["images_per_second"] / (sum(references) / 2))
    for row in results["parts"]["likelihood"]["rows"]:
        assert row["speed_up"] == pytest.approx(row["score_sde_seconds"] / row["scorekit_seconds"])
        difference = row["scorekit_bits_per_dim"] - row["score_sde_bits_per_dim"]
        assert row["bits_per_dim_difference"] == pytest.approx(difference)
    if HAS_FASHION_MNIST:
        part = results["parts"]["fashion_mnist"]
        assert part["info"]["scorekit_training"]["steps"] == part["info"]["ddpm_training"]["steps"] == 3
        assert math.isfinite(part["info"]["test_bits_per_dim"])
        assert (output / "fashion_mnist_grid.png").is_file()
        ddpm_reference = [row for row in part["rows"] if row["sampler"] == "diffusers DDPM" and row["nfe"] == 4]
        assert [row["num_generated"] for row in ddpm_reference] == [8]  # the 1000-step stand-in, on a subset


@pytest.fixture
def suite(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("gpu_suite")
    monkeypatch.setattr(module, "GRACE_SECONDS", 0.5)
    return module


def fake_part(behaviour):
    """A part that records one row, then stops at its budget, overruns it, or fails."""

    def part(args, record):
        record.add({"value": 1.0})
        if behaviour == "fail":
            raise ValueError("broken part")
        while not record.out_of_time():
            time.sleep(0.01)
        if behaviour == "overrun":
            time.sleep(60)
        record.add({"value": 2.0})

    return part


@pytest.mark.parametrize("behaviour, status, rows", [
    ("stop", "out of time", [1.0, 2.0]),  # stops by itself at its budget
    ("overrun", "out of time (killed)", [1.0]),  # killed GRACE_SECONDS after its budget
    ("fail", "failed", [1.0]),
])
def test_a_part_keeps_what_it_finished(suite, tmp_path, monkeypatch, behaviour, status, rows):
    monkeypatch.setitem(suite.PART_FUNCTIONS, "likelihood", fake_part(behaviour))
    args = suite.parse_args(["--smoke", "--output_dir", str(tmp_path)])
    started = time.monotonic()
    record = suite.run_child("likelihood", 0.3, args, tmp_path)
    assert time.monotonic() - started < 10
    assert record["status"] == status
    assert [row["value"] for row in record["rows"]] == rows
    assert record["budget_seconds"] == 0.3
    if behaviour == "fail":
        assert record["error"] == "ValueError: broken part"


def test_a_failed_part_does_not_stop_the_others(suite, tmp_path, monkeypatch):
    monkeypatch.setitem(suite.PART_FUNCTIONS, "scheduler", fake_part("fail"))
    monkeypatch.setitem(suite.PART_FUNCTIONS, "likelihood", fake_part("stop"))
    args = suite.parse_args(["--smoke", "--output_dir", str(tmp_path / "out"), "--work_dir", str(tmp_path / "work"),
                             "--parts", "scheduler", "likelihood", "--budget", "likelihood=0.2"])
    results = suite.run_suite(args)
    assert [part["status"] for part in results["parts"].values()] == ["failed", "out of time"]
    saved = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    assert [len(part["rows"]) for part in saved["parts"].values()] == [1, 2]
    table = (tmp_path / "out" / "gpu_suite.md").read_text()
    assert "Error: `ValueError: broken part`" in table and "out of time (" in table


def test_budget_argument_is_checked(suite, tmp_path):
    with pytest.raises(SystemExit):
        suite.parse_args(["--output_dir", str(tmp_path), "--budget", "nonsense=3"])
    with pytest.raises(SystemExit):
        suite.parse_args(["--output_dir", str(tmp_path), "--budget", "training=0"])
