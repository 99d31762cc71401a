"""The real-data benchmark of issue #14 (benchmarks/bench_real_data.py) on a tiny untrained model: every sampler
makes the model calls it is asked for, the diffusers schedule is the model's SDE, and the Fréchet distance of a set to
itself is 0."""

import importlib
import json
import math
from pathlib import Path

import pytest
import torch

from diffusers_scorekit import NCSNScoreModel, ProbabilityFlowODEScheduler, ScoreSDEPipeline
from diffusers_scorekit.training import arguments

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("bench_real_data")


def test_digits_split_is_disjoint_and_8_bit(bench):
    train, train_labels, held_out, held_out_labels = bench.digits_split()
    assert train.shape == (1500, 1, 8, 8) and held_out.shape == (297, 1, 8, 8)
    assert train.dtype == torch.uint8 and int(train.max()) == 255 and int(train.min()) == 0
    assert sorted(set(train_labels.tolist())) == list(range(10)) and len(held_out_labels) == 297
    # no held-out image is a training image (load_digits has a handful of exact duplicates; none straddle the split)
    train_rows = {bytes(image.flatten().tolist()) for image in train}
    assert not any(bytes(image.flatten().tolist()) in train_rows for image in held_out)


def test_diffusers_schedule_is_the_models_sde(bench):
    config = dict(ProbabilityFlowODEScheduler().config)  # continuous VP, beta 0.1 .. 20
    alphas_cumprod = bench.DDPMScheduler.from_config(bench.diffusers_config(config)).alphas_cumprod.double()
    t = torch.arange(1, 1000, dtype=torch.float64) / 999
    # alpha_bar(t) = exp(-(beta_min t + (beta_max - beta_min) t^2 / 2)), at the model's timestep i = t * 999
    torch.testing.assert_close(alphas_cumprod[1:], torch.exp(-(0.1 * t + 9.95 * t**2)), rtol=1e-4, atol=0)
    assert alphas_cumprod[0].item() == pytest.approx(math.exp(-(0.1e-3 + 9.95e-6)), rel=1e-6)  # t = sampling_eps


def test_training_command_trains_the_vp_epsilon_model(bench, tmp_path):
    command = bench.training_command(tmp_path / "images", tmp_path / "model", 7, 1.5)
    assert command[1:4] == ["-m", "diffusers_scorekit.cli", "train"]
    args = arguments.parse_args(command[4:])
    assert (args.model, args.resolution, args.sde, args.prediction_type, args.timestep_type) == (
        "ncsn", 8, "vp", "epsilon", "discrete")
    assert (args.max_train_steps, args.time_budget_minutes, args.checkpointing_steps) == (7, 1.5, 7)


def test_every_sampler_makes_the_requested_model_calls(bench, tmp_path):
    torch.manual_seed(0)
    unet = NCSNScoreModel(sample_size=8, block_out_channels=(8, 8), prediction_type="epsilon", timestep_type="discrete")
    ScoreSDEPipeline(unet, ProbabilityFlowODEScheduler(time_spacing="uniform")).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / bench.TRAINING_RECORD).write_text(json.dumps(
        {"command": "none", "wall_time_s": 0.0, "steps": 0, "stopped_by": "max_train_steps"}))

    results = bench.main(["--model_dir", str(tmp_path / "model"), "--nfe", "3", "--reference_steps", "4",
                          "--num_samples", "6", "--batch_size", "3", "--classifier_epochs", "1",
                          "--out", str(tmp_path / "results.json")])

    # 3 calls per image is reachable by every sampler (Heun: 2 levels = 3 calls), and the counter says so
    assert len(results["runs"]) == 15
    for row in results["runs"]:
        assert row["nfe"] == 3, row["sampler"]
        assert row["num_inference_steps"] == (2 if row["sampler"] == "ode_heun_edm" else 3)
        assert row["num_samples"] == 6 and not row["nan"]
    for name, reference in results["references"].items():
        assert reference["nfe"] == 4
        assert reference[f"fd_{name}"] == pytest.approx(0.0, abs=1e-10)  # a set against itself
        assert reference[f"fd_{'ode' if name == 'ddpm_reference' else 'ddpm'}_reference"] > 0
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == results["runs"]


@pytest.mark.slow
def test_the_training_subprocess_records_its_run(bench, tmp_path):
    train_images = bench.digits_split()[0]
    record = bench.train_model(train_images, tmp_path / "model", 2, 1.0)
    assert (record["steps"], record["stopped_by"]) == (2, "max_train_steps")
    pipe = ScoreSDEPipeline.from_pretrained(tmp_path / "model")
    assert (pipe.unet.config.sample_size, pipe.scheduler.config.sde_type) == (8, "vp")
    assert json.loads((tmp_path / "model" / bench.TRAINING_RECORD).read_text()) == json.loads(json.dumps(record))
