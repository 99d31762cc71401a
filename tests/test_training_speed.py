"""The training script's speed switches, its time budget, and the DDPM baseline of issue #6 (CPU, tiny runs)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

from diffusers_scorekit import ScoreSDEPipeline, training

REPO_ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"
QUICK_EVAL = ["--num_inference_steps", "3", "--num_eval_samples", "4", "--eval_likelihood_samples", "0"]
TINY_TOY = ["--dataset", "two_moons", "--num_toy_samples", "512", "--hidden_dim", "16", "--num_layers", "1",
            "--train_batch_size", "64", "--lr_warmup_steps", "2", "--report_to", "none", *QUICK_EVAL]
# the training script's 32-px UNet2DModel with a few channels
TINY_UNET = ["--model", "unet2d", "--sde", "vp", "--resolution", "32", "--block_out_channels", "8,16,16,16",
             "--layers_per_block", "1", "--train_batch_size", "4", "--report_to", "none", *QUICK_EVAL]
FASHION_MNIST = Path(training.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def public_config(model) -> dict:
    """The model's config as saved (tuples become lists), without diffusers' bookkeeping keys."""
    return json.loads(json.dumps({key: value for key, value in dict(model.config).items()
                                  if not key.startswith("_")}))


def load_baseline_script():
    spec = importlib.util.spec_from_file_location("train_ddpm_baseline",
                                                  REPO_ROOT / "benchmarks" / "train_ddpm_baseline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def restore_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("argv, device, expected", [
    (TINY_UNET, "cpu", dict.fromkeys(training.SPEED_SWITCHES, False)),
    (TINY_UNET, "cuda", dict.fromkeys(training.SPEED_SWITCHES, True)),
    (TINY_UNET + ["--speed", "none", "--channels_last"], "cuda",
     {"channels_last": True, "allow_tf32": False, "fused_optimizer": False, "torch_compile": False}),
    (TINY_UNET + ["--no-torch_compile"], "cuda",
     {"channels_last": True, "allow_tf32": True, "fused_optimizer": True, "torch_compile": False}),
    (TINY_TOY, "cuda", {"channels_last": False, "allow_tf32": True, "fused_optimizer": True, "torch_compile": False}),
])
def test_speed_auto_turns_on_what_fits_the_device_and_model(argv, device, expected, image_folder, restore_tf32):
    args = training.parse_args(argv + ([] if "--dataset" in argv else ["--train_data_dir", str(image_folder)]))
    training.resolve_speed(args, torch.device(device))
    assert {name: getattr(args, name) for name in training.SPEED_SWITCHES} == expected
    assert torch.backends.cuda.matmul.allow_tf32 == expected["allow_tf32"]


def test_fused_optimizer_falls_back_to_foreach_where_the_device_has_no_fused_adamw():
    args = training.parse_args([*TINY_TOY, "--fused_optimizer"])
    parameters = [torch.nn.Parameter(torch.zeros(3))]
    optimizer, name = training.build_optimizer(args, parameters, torch.device("cpu"))
    assert optimizer.defaults["fused"] and name == "AdamW (fused)"
    optimizer, name = training.build_optimizer(args, parameters, torch.device("meta"))
    assert optimizer.defaults["foreach"] and "foreach: no fused AdamW on meta" in name
    args = training.parse_args([*TINY_TOY, "--no-fused_optimizer"])
    optimizer, name = training.build_optimizer(args, parameters, torch.device("cpu"))
    assert not optimizer.defaults["fused"] and not optimizer.defaults["foreach"] and "default" in name


@pytest.mark.parametrize("argv, message", [
    (["--time_budget_minutes", "0"], "--time_budget_minutes must be > 0"),
    (["--logging_steps", "0"], "--logging_steps must be >= 1"),
    (["--channels_last"], "2-D toys have none"),
    (["--speed", "max"], "invalid choice: 'max'"),
])
def test_bad_speed_and_budget_arguments_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit):
        training.parse_args(["--dataset", "two_moons", *argv])
    assert message in capsys.readouterr().err


def test_channels_last_and_fused_adamw_resume_to_identical_weights(image_folder, tmp_path, caplog):
    """A UNet2DModel run with channels-last batches, fused AdamW and a foreach EMA, the loss read every 4 steps:
    resumed from its step-3 checkpoint it ends with bit-for-bit the weights of the uninterrupted run."""
    options = [*TINY_UNET, "--train_data_dir", str(image_folder), "--random_flip", "--use_ema", "--channels_last",
               "--fused_optimizer", "--logging_steps", "4", "--max_train_steps", "6", "--checkpointing_steps", "3"]
    caplog.set_level("INFO", logger="diffusers_scorekit.training")
    training.main(training.parse_args([*options, "--output_dir", str(tmp_path / "straight")]))
    assert "channels_last on" in caplog.text and "AdamW (fused) and foreach EMA" in caplog.text

    args = training.parse_args([*options, "--output_dir", str(tmp_path / "resumed")])
    data = training.load_data(args)
    examples, labels = next(training.training_batches(args, data, 1, 0, start=0))
    x0, _ = training.make_batch(args, data, examples, labels, torch.Generator().manual_seed(0), "cpu")
    assert x0.is_contiguous(memory_format=torch.channels_last) and not x0.is_contiguous()

    training.main(training.parse_args([*options, "--output_dir", str(tmp_path / "resumed"),
                                       "--resume_from_checkpoint",
                                       str(training.checkpoints_dir(tmp_path / "straight") / "checkpoint-3")]))
    expected, actual = load_file(tmp_path / "straight" / WEIGHTS), load_file(tmp_path / "resumed" / WEIGHTS)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    saved = json.loads((tmp_path / "resumed" / training.RUN_CONFIG_NAME).read_text())
    assert saved["training"]["channels_last"] and saved["training"]["fused_optimizer"]
    assert not saved["training"]["torch_compile"]


def test_time_budget_stops_early_with_a_checkpoint_and_a_loadable_pipeline(tmp_path):
    # the budget is read on the host after every step, not only at logging (every 3 steps here)
    training.main(training.parse_args([*TINY_TOY, "--max_train_steps", "100000", "--time_budget_minutes", "1e-5",
                                       "--logging_steps", "3", "--output_dir", str(tmp_path)]))
    assert [p.name for p in training.list_checkpoints(tmp_path)] == ["checkpoint-1"]
    result = json.loads((tmp_path / training.RUN_CONFIG_NAME).read_text())["result"]
    assert result["steps"] == 1 and result["stopped_by"] == "time_budget_minutes"
    assert result["time_budget_minutes"] == 1e-5 and result["max_train_steps"] == 100000
    card = ModelCard.load(tmp_path / "README.md")
    assert "1 optimizer updates" in card.text and "1 of 100000 steps" in card.text
    assert "stopped by the 1e-05-min time budget" in card.text

    pipe = ScoreSDEPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    samples = pipe(batch_size=8, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).samples
    assert samples.shape == (8, 2) and torch.isfinite(torch.as_tensor(samples)).all()


@pytest.mark.slow
def test_torch_compile_keeps_state_dict_keys_clean(tmp_path):
    """torch.compile wraps only the training forward: checkpoint and pipeline keys have no ``_orig_mod.``, and
    the run resumes from its checkpoint (a toy model: inductor compiles a UNet for minutes on a CPU)."""
    options = [*TINY_TOY, "--torch_compile", "--use_ema", "--max_train_steps", "2", "--checkpointing_steps", "1",
               "--output_dir", str(tmp_path)]
    training.main(training.parse_args(options))
    for path in (training.checkpoints_dir(tmp_path) / "checkpoint-1" / "model.safetensors", tmp_path / WEIGHTS):
        assert not [key for key in load_file(path) if "_orig_mod" in key], path
    assert ScoreSDEPipeline.from_pretrained(tmp_path).unet.config.hidden_dim == 16
    training.main(training.parse_args([*options, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"]))
    assert json.loads((tmp_path / training.RUN_CONFIG_NAME).read_text())["result"]["steps"] == 3


@pytest.mark.skipif(not FASHION_MNIST.is_file(), reason="needs Debian's dataset-fashion-mnist package "
                    f"({FASHION_MNIST} is absent)")
def test_ddpm_baseline_trains_the_training_scripts_unet_and_saves_a_ddpm_pipeline(tmp_path):
    baseline = load_baseline_script()
    args = baseline.parse_args(["--block_out_channels", "8,16,16,16", "--layers_per_block", "1",
                                "--max_train_samples", "16", "--train_batch_size", "8", "--max_train_steps", "3",
                                "--output_dir", str(tmp_path)])
    baseline.main(args)

    record = json.loads((tmp_path / baseline.RUN_RECORD_NAME).read_text())
    assert record["result"]["steps"] == 3 and record["num_train_images"] == 16
    pipe = DDPMPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    # the network a `--dataset fashion_mnist --resolution 32 --model unet2d --sde vp` run of the training script
    # trains with the same channel options
    ours = training.parse_args(["--dataset", "fashion_mnist", "--resolution", "32", "--model", "unet2d", "--sde",
                                "vp", "--block_out_channels", "8,16,16,16", "--layers_per_block", "1"])
    one_image = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    trained_by_script = training.build_model(ours, training.TrainingData(one_image, None, one_image, "one image"))
    assert public_config(pipe.unet) == public_config(trained_by_script)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 32, 32, 1) and np.isfinite(images).all()


def test_ddpm_baseline_rejects_a_subset_smaller_than_a_batch(capsys):
    baseline = load_baseline_script()
    with pytest.raises(SystemExit):
        baseline.parse_args(["--max_train_samples", "4", "--train_batch_size", "8"])
    assert "at least --train_batch_size (8)" in capsys.readouterr().err
