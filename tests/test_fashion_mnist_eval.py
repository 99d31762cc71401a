"""The Fashion-MNIST evaluation harness of issue #6 runs end to end on tiny untrained models (CPU)."""

import importlib
import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffusers_scorekit import ScoreSDEPipeline, VPEulerMaruyamaScheduler, metrics

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
FASHION_MNIST = Path(metrics.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))


@pytest.mark.skipif(not FASHION_MNIST.is_file(), reason=f"needs Debian's dataset-fashion-mnist ({FASHION_MNIST})")
def test_every_sampler_is_scored_and_the_best_grid_written(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    evaluation = importlib.import_module("eval_fashion_mnist")
    ddpm_config = DDPMScheduler().config
    ScoreSDEPipeline(tiny_unet(), VPEulerMaruyamaScheduler.from_config(ddpm_config)).save_pretrained(tmp_path / "ours")
    DDPMPipeline(tiny_unet(), DDPMScheduler()).save_pretrained(tmp_path / "ddpm")

    results = evaluation.main([
        "--scorekit_pipeline", str(tmp_path / "ours"), "--ddpm_pipeline", str(tmp_path / "ddpm"),
        "--nfe", "4", "--adaptive_tolerance", "0.1", "--ddpm_reference_steps", "6", "--num_samples", "12",
        "--batch_size", "6", "--bpd_examples", "0", "--device", "cpu", "--output_dir", str(tmp_path / "eval"),
    ])

    samplers = {(row["model"], row["sampler"]) for row in results["rows"]}
    assert len(samplers) == 1 + 4 + 1 + 4  # the data floor, 4 fixed-step + adaptive ODE, 4 on the DDPM model
    for row in results["rows"]:
        assert math.isfinite(row["frechet_distance"]) and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert row["num_generated"] == 12
    fixed_step = [row for row in results["rows"] if row["model"] != "data" and "adaptive" not in row["sampler"]]
    assert {row["nfe"] for row in fixed_step} <= {3, 4, 6}  # Heun takes the largest odd count below 4
    assert any(row["nfe"] == 6 and row["sampler"] == "diffusers DDPM" for row in results["rows"])
    assert results["bits_per_dim"] is None  # --bpd_examples 0; the likelihood path has its own tests
    assert Path(results["grid"]).is_file()
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["rows"] == results["rows"]
