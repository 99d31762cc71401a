"""The training script, its checkpoints and resuming, and the ``scorekit`` CLI (CPU, tiny runs)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

from diffusers_scorekit import ScoreSDEPipeline, cli, training
from diffusers_scorekit.variational_bound import bound_metric

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO_ROOT / "training" / "train_score_sde.py"
WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"

# the end-of-run evaluation of a tiny run: a few samples, a few steps, no likelihood
QUICK_EVAL = ["--num_inference_steps", "5", "--num_eval_samples", "64", "--eval_likelihood_samples", "0"]
TINY_TOY = ["--dataset", "two_moons", "--num_toy_samples", "2000", "--hidden_dim", "32", "--num_layers", "2",
            "--train_batch_size", "64", "--lr_warmup_steps", "5", *QUICK_EVAL]


def subprocess_env(**extra):
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", **extra)


def run_script(*args, env_extra=None, launcher=()):
    return subprocess.run(
        [sys.executable, *launcher, str(TRAIN_SCRIPT), *args], cwd=REPO_ROOT, capture_output=True, text=True,
        env=subprocess_env(**(env_extra or {})), timeout=300,
    )


@pytest.fixture(scope="module")
def toy_pipeline(tmp_path_factory):
    """A VE ScoreMLP trained for 40 steps on two moons through ``scorekit train``, with EMA."""
    output_dir = tmp_path_factory.mktemp("moons")
    cli.main(["train", *TINY_TOY, "--max_train_steps", "40", "--checkpointing_steps", "20", "--use_ema",
              "--eval_likelihood_samples", "20", "--output_dir", str(output_dir)])
    return output_dir


def test_toy_run_saves_a_loadable_pipeline_with_model_card(toy_pipeline):
    assert (toy_pipeline / WEIGHTS).is_file()
    # no pickles anywhere, and the checkpoints outside the pipeline folder
    checkpoints = training.checkpoints_dir(toy_pipeline)
    assert checkpoints == toy_pipeline.parent / f"{toy_pipeline.name}-checkpoints"
    assert not [p for folder in (toy_pipeline, checkpoints) for p in folder.rglob("*")
                if p.suffix in (".bin", ".pkl", ".pt", ".pth")]
    assert not list(toy_pipeline.rglob("checkpoint-*"))
    assert (toy_pipeline / training.SAMPLE_IMAGE_NAME).is_file()
    assert [p.name for p in training.list_checkpoints(toy_pipeline)] == ["checkpoint-20"]

    card = ModelCard.load(toy_pipeline / "README.md")
    assert card.data.library_name == "diffusers_scorekit"
    assert {"score-based", "sde", "diffusers", "diffusers_scorekit"} <= set(card.data.tags)
    assert card.data.license == "apache-2.0"
    assert "ScoreSDEPipeline.from_pretrained" in card.text
    assert "coverage" in card.text and "bits/dim" in card.text
    assert "| bits/dim | not measured" not in card.text

    pipe = ScoreSDEPipeline.from_pretrained(toy_pipeline)
    pipe.set_progress_bar_config(disable=True)
    samples = pipe(batch_size=32, num_inference_steps=5, generator=torch.Generator().manual_seed(0)).samples
    assert samples.shape == (32, 2) and np.isfinite(samples).all()


def card_table(card, heading: str) -> dict:
    """The rows of the two-column table under ``## heading`` of a model card."""
    section = card.text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return {key.strip().strip("`"): value.strip().strip("`") for key, value in rows[1:]}


def test_model_card_figures_are_those_of_the_saved_pipeline(toy_pipeline):
    """Every figure of the card recomputed from the saved pipeline: the samples (same seed and steps), their
    coverage and precision against the held-out points, the bits/dim; and its usage code and settings."""
    card = ModelCard.load(toy_pipeline / "README.md")
    metrics = card_table(card, "Metrics")
    args = training.parse_args([*TINY_TOY, "--max_train_steps", "40", "--use_ema", "--eval_likelihood_samples", "20",
                                "--output_dir", str(toy_pipeline)])
    data = training.load_data(args)
    pipe = ScoreSDEPipeline.from_pretrained(toy_pipeline)
    pipe.set_progress_bar_config(disable=True)
    samples = training.sample_pipeline(pipe, 64, 5, 0, is_image=False)
    scores = training.knn_coverage(data.held_out, samples)
    assert metrics["coverage (5-NN, 2000 held-out points)"] == f"{scores['coverage']:.3f}"
    assert metrics["precision (5-NN)"] == f"{scores['precision']:.3f}"
    assert metrics["bits/dim"] == training.likelihood_metric(pipe, data, 20, 0)
    assert metrics["bits/dim, variational bound"] == bound_metric(
        pipe, data.held_out[:20], normalization=data.normalization, seed=0)
    assert "(continuous, in data units, 20 examples, continuous-time bound, " in metrics["bits/dim, variational bound"]
    assert metrics["training length"].startswith("40 of 40 steps, ")

    # the usage code loads by name (no local absolute path) and passes the generator it makes
    assert f'ScoreSDEPipeline.from_pretrained("{toy_pipeline.name}")' in card.text
    assert str(toy_pipeline.parent) not in card.text
    assert "samples = pipe(batch_size=2000, num_inference_steps=5, generator=generator).samples" in card.text
    # settings that applied, and only those
    settings = card_table(card, "Training")
    assert settings["dataset"] == "two_moons" and settings["num_toy_samples"] == "2000"
    assert settings["ema_decay"] == "0.999" and settings["weighting"] == "sigma2"
    for absent in ("resolution", "center_crop", "random_flip", "image_column", "label_dropout", "num_projections",
                   "train_data_dir", "gradient_accumulation_steps", "sample quality"):
        assert absent not in settings and absent not in metrics, absent


def test_killed_run_resumes_to_identical_weights(tmp_path):
    """SIGKILL between checkpoints, resume from the latest: bit-for-bit the weights of an uninterrupted run
    (EMA and gradient accumulation included)."""
    options = [*TINY_TOY, "--max_train_steps", "30", "--checkpointing_steps", "10", "--use_ema",
               "--gradient_accumulation_steps", "2", "--checkpoints_total_limit", "2"]
    uninterrupted = run_script(*options, "--output_dir", str(tmp_path / "straight"))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    interrupted_dir = tmp_path / "interrupted"
    killed = run_script(*options, "--output_dir", str(interrupted_dir), env_extra={training.KILL_AT_STEP_ENV: "25"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [p.name for p in training.list_checkpoints(interrupted_dir)] == ["checkpoint-10", "checkpoint-20"]
    assert not (interrupted_dir / WEIGHTS).exists()

    resumed = run_script(*options, "--output_dir", str(interrupted_dir), "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "checkpoint-20" in resumed.stderr

    expected, actual = load_file(tmp_path / "straight" / WEIGHTS), load_file(interrupted_dir / WEIGHTS)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_checkpoints_total_limit_and_atomic_rename(tmp_path):
    args = training.parse_args([*TINY_TOY, "--max_train_steps", "7", "--checkpointing_steps", "2",
                                "--checkpoints_total_limit", "2", "--output_dir", str(tmp_path)])
    training.main(args)
    assert [p.name for p in training.list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert not list(training.checkpoints_dir(tmp_path).glob(".checkpoint-*"))
    saved = json.loads((training.checkpoints_dir(tmp_path) / "checkpoint-6" / training.RUN_CONFIG_NAME).read_text())
    assert saved["model"]["class"] == "ScoreMLP" and saved["sde"]["sde_type"] == "ve"


def test_resume_with_a_different_model_is_refused(tmp_path):
    training.main(training.parse_args([*TINY_TOY, "--max_train_steps", "3", "--checkpointing_steps", "2",
                                       "--output_dir", str(tmp_path)]))
    args = training.parse_args([*TINY_TOY, "--hidden_dim", "16", "--max_train_steps", "3",
                                "--resume_from_checkpoint", "latest", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"cannot resume .*checkpoint-2.*hidden_dim: checkpoint 32, now 16"):
        training.main(args)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "two_moons", "--sde", "ou"], "invalid choice: 'ou'"),
        (["--dataset", "two_moons", "--loss", "nce"], "invalid choice: 'nce'"),
        (["--dataset", "fashion_mnist", "--resolution", "30"], "use 28 or 32"),
        (["--dataset", "fashion_mnist", "--model", "unet2d", "--resolution", "28", "--prediction_type", "epsilon"],
         "NCSN\\+\\+ layout"),
        (["--train_data_dir", "x", "--model", "unet2d", "--resolution", "48"], "presets for --resolution"),
        (["--train_data_dir", "x", "--resolution", "30"], "divisible by 4"),
        (["--dataset", "two_moons", "--model", "ncsn"], "use scorekit_mlp for the 2-D toys"),
        (["--dataset", "two_moons", "--sde", "vp", "--sampler", "ald"], "VE SDE only"),
        (["--dataset", "two_moons", "--loss", "ssm", "--num_classes", "2"], "unconditional models only"),
        (["--dataset", "two_moons", "--train_data_dir", "x"], "exactly one of"),
    ],
)
def test_bad_arguments_are_rejected_before_training(argv, message, capsys):
    with pytest.raises(SystemExit):
        training.parse_args(argv)
    assert re.search(message, capsys.readouterr().err)


def test_bad_data_is_rejected_before_training(tmp_path):
    missing = training.parse_args(["--train_data_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        training.main(missing)

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (12, 10), "red").save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"not a png")
    broken = training.parse_args(["--train_data_dir", str(folder), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        training.main(broken)

    no_fashion = training.parse_args(["--dataset", "fashion_mnist", "--fashion_mnist_dir", str(tmp_path),
                                      "--output_dir", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        training.main(no_fashion)

    unlabelled = training.parse_args([*TINY_TOY, "--num_classes", "1", "--output_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="too small: the data has 2 labels"):
        training.main(unlabelled)
    assert not (tmp_path / "out" / WEIGHTS).exists()


def test_class_conditional_image_folder_run(tmp_path):
    """An image folder with one subfolder per class, random flips, label dropout, an NCSN model and its card."""
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / label / f"{i}.png")
    output_dir = tmp_path / "out"
    training.main(training.parse_args([
        "--train_data_dir", str(tmp_path / "data"), "--resolution", "8", "--center_crop", "--random_flip",
        "--block_out_channels", "8,8", "--num_classes", "2", "--train_batch_size", "4", "--max_train_steps", "3",
        "--num_eval_samples", "4", "--num_inference_steps", "3", "--output_dir", str(output_dir),
    ]))
    pipe = ScoreSDEPipeline.from_pretrained(output_dir)
    assert pipe.unet.config.num_class_embeds == 2 and pipe.sample_shape == (3, 8, 8)
    card = ModelCard.load(output_dir / "README.md")
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert "`0` cats, `1` dogs" in card.text and "class_labels=labels" in card.text
    assert "generator=generator, class_labels=labels, guidance_scale=2.0" in card.text
    # no quality figure was measured, and the card says so
    assert card_table(card, "Metrics")["sample quality"].startswith(training.NO_QUALITY_FIGURE + " (bits/dim: ")
    settings = card_table(card, "Training")
    assert settings["label_dropout"] == "0.1" and settings["resolution"] == "8" and settings["random_flip"] == "True"
    assert "num_toy_samples" not in settings and "ema_decay" not in settings
    assert Image.open(output_dir / training.SAMPLE_IMAGE_NAME).size == (16, 16)


@pytest.mark.skipif(not Path(training.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").is_file(),
                    reason="needs Debian's dataset-fashion-mnist package")
def test_fashion_mnist_is_read_and_padded():
    args = training.parse_args(["--dataset", "fashion_mnist", "--resolution", "32"])
    data = training.load_data(args)
    assert data.examples.shape == (60000, 1, 32, 32) and data.examples.dtype == torch.uint8
    assert data.held_out.shape == (10000, 1, 32, 32) and data.num_classes == 10
    assert data.examples[:, :, :2].max() == 0  # the padding is background
    x = data.to_model_space(data.examples[:8])
    assert x.min() >= -1 and x.max() <= 1


def test_push_to_hub_failure_says_where_the_files_are(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    args = training.parse_args([*TINY_TOY, "--push_to_hub", "--hub_model_id", "someone/moons",
                                "--output_dir", str(tmp_path)])
    with pytest.raises(RuntimeError, match=f"Nothing is lost: .* are in {tmp_path}") as error:
        training.push_to_hub(args)
    assert (f'`hf upload someone/moons {tmp_path} --exclude "samples/*" --exclude "logs/*" '
            f'--exclude "checkpoint-*" --exclude ".*"`') in str(error.value)


def test_cli_sample_writes_scatter_and_npy(toy_pipeline, tmp_path):
    png, npy = tmp_path / "points.png", tmp_path / "points.npy"
    cli.main(["sample", str(toy_pipeline), "--scheduler", "ProbabilityFlowODEScheduler",
              "--num_inference_steps", "4", "--num_samples", "100", "--output", str(png)])
    assert Image.open(png).size[0] > 0
    cli.main(["sample", str(toy_pipeline), "--num_inference_steps", "4", "--num_samples", "10", "--output", str(npy)])
    assert np.load(npy).shape == (10, 2)
    with pytest.raises(SystemExit):
        cli.main(["sample", str(toy_pipeline), "--scheduler", "VPEulerMaruyamaScheduler", "--output", str(png)])


def test_cli_sample_calibrate_runs_as_a_command(toy_pipeline, tmp_path):
    """`scorekit sample --calibrate` as a process: it fits the grid on its pilot draws and samples on that grid,
    the same samples as the pipeline called on the fitted grid with the CLI's seeds."""
    from diffusers_scorekit.distributed_sampling import sample_generators
    from diffusers_scorekit.training.data import seed_of

    npy = tmp_path / "points.npy"
    result = subprocess.run(
        [sys.executable, "-m", "diffusers_scorekit.cli", "sample", str(toy_pipeline), "--scheduler",
         "ProbabilityFlowODEScheduler", "--calibrate", "--num_inference_steps", "4", "--num_samples", "10", "--output", str(npy)],
        cwd=REPO_ROOT, capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fitted 4 levels to the model" in result.stdout and "4 model evaluations" in result.stdout
    pipe = cli.load_pipeline(str(toy_pipeline), "ProbabilityFlowODEScheduler")
    calibration = pipe.calibrate_sigmas(4, generator=torch.Generator().manual_seed(seed_of(0, cli.PILOT_SEED_STREAM, 0)))
    assert calibration.distance < calibration.default_distance
    expected = pipe(10, sigmas=calibration.sigmas, generator=sample_generators(0, range(10)), output_type="np").samples
    np.testing.assert_allclose(np.load(npy), expected, rtol=0, atol=1e-6)
    with pytest.raises(SystemExit, match="--calibrate fits the levels of a ProbabilityFlowODEScheduler; this pipeline's "
                                         "scheduler is VEEulerMaruyamaScheduler: add --scheduler ProbabilityFlowODEScheduler"):
        cli.main(["sample", str(toy_pipeline), "--scheduler", "VEEulerMaruyamaScheduler", "--calibrate", "--output", str(npy)])


def test_cli_likelihood(toy_pipeline, capsys):
    cli.main(["likelihood", str(toy_pipeline), "--num_examples", "10"])
    assert "bits/dim" in capsys.readouterr().out


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path):
    result = run_script(
        *TINY_TOY, "--max_train_steps", "6", "--checkpointing_steps", "3", "--gradient_accumulation_steps", "2",
        "--output_dir", str(tmp_path),
        launcher=("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no"),
        # accelerate runs several processes on the CPU (gloo) only when told to use the CPU
        env_extra={"ACCELERATE_USE_CPU": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) on cpu, global batch 256 (64 per process x 2 process(es) x 2 accumulation" in result.stderr
    assert {p.name for p in (training.checkpoints_dir(tmp_path) / "checkpoint-3").iterdir()} >= {
        "random_states_0.safetensors", "random_states_1.safetensors"}
    assert (tmp_path / WEIGHTS).is_file()


@pytest.mark.slow
def test_cli_demo(tmp_path, capsys):
    cli.main(["demo", "--output_dir", str(tmp_path), "--max_train_steps", "30", "--num_samples", "100"])
    out = capsys.readouterr().out
    for title, *_ in cli.DEMO_SAMPLERS:
        assert title in out
    assert (tmp_path / "demo_samplers.png").is_file() and (tmp_path / "README.md").is_file()
    assert (tmp_path / "vp" / WEIGHTS).is_file()
