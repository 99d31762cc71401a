"""Loading by Hub repo id, offline, from the cache layout huggingface_hub itself writes."""

import json
import shutil

import numpy as np
import pytest
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, ScoreSdeVePipeline, ScoreSdeVeScheduler

from diffusers_scorekit import PredictorCorrectorScheduler, ScoreSDEPipeline, VEEulerMaruyamaScheduler
from test_pipeline import quiet, sample, tiny_unet

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def put_in_cache(folder, cache_dir, repo_id):
    """The layout of ``snapshot_download``: models--user--repo/snapshots/<rev>/... with refs/main -> <rev>."""
    repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo_dir / "snapshots" / REVISION)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(REVISION)


def test_scorekit_repo_by_id(tmp_path, offline):
    pipe = quiet(ScoreSDEPipeline(unet=tiny_unet(time_embedding_type="fourier"), scheduler=VEEulerMaruyamaScheduler()))
    expected = sample(pipe)
    pipe.save_pretrained(tmp_path / "saved")
    put_in_cache(tmp_path / "saved", tmp_path / "cache", "user/score-model")
    for loaded in (
        ScoreSDEPipeline.from_pretrained("user/score-model", cache_dir=tmp_path / "cache"),
        ScoreSDEPipeline.from_pretrained("user/score-model", cache_dir=tmp_path / "cache", revision=REVISION),
        DiffusionPipeline.from_pretrained("user/score-model", cache_dir=tmp_path / "cache"),
    ):
        assert type(loaded) is ScoreSDEPipeline and isinstance(loaded.scheduler, VEEulerMaruyamaScheduler)
        assert np.array_equal(sample(quiet(loaded)), expected)


def test_ddpm_and_score_sde_ve_repos_by_id(tmp_path, offline):
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    ScoreSdeVePipeline(unet=tiny_unet(time_embedding_type="fourier"), scheduler=ScoreSdeVeScheduler()).save_pretrained(tmp_path / "ve")
    put_in_cache(tmp_path / "ddpm", tmp_path / "cache", "google/ddpm-tiny")
    put_in_cache(tmp_path / "ve", tmp_path / "cache", "google/ncsnpp-tiny")
    ddpm = quiet(ScoreSDEPipeline.from_pretrained("google/ddpm-tiny", cache_dir=tmp_path / "cache"))
    ve = quiet(ScoreSDEPipeline.from_pretrained("google/ncsnpp-tiny", cache_dir=tmp_path / "cache"))
    assert ddpm.scheduler.sde_type == "vp" and ve.scheduler.sde_type == "ve"
    assert isinstance(ve.scheduler, PredictorCorrectorScheduler)
    for pipe in (ddpm, ve):
        assert np.isfinite(sample(pipe, steps=3)).all()


def test_missing_repo_offline_names_the_repo(tmp_path, offline):
    with pytest.raises(OSError, match="user/does-not-exist"):
        ScoreSDEPipeline.from_pretrained("user/does-not-exist", cache_dir=tmp_path)


def test_model_index_is_short_and_old_layouts_still_load(tmp_path):
    pipe = quiet(ScoreSDEPipeline(unet=tiny_unet(), scheduler=PredictorCorrectorScheduler.from_config(DDPMScheduler().config)))
    expected = sample(pipe)
    pipe.save_pretrained(tmp_path)
    index_path = tmp_path / "model_index.json"
    index = json.loads(index_path.read_text())
    assert index["scheduler"] == ["diffusers_scorekit", "PredictorCorrectorScheduler"]
    assert np.array_equal(sample(quiet(DiffusionPipeline.from_pretrained(tmp_path))), expected)
    # a layout that recorded the defining module, as diffusers does by default for outside classes
    index["scheduler"] = ["diffusers_scorekit.schedulers.scheduling_predictor_corrector", "PredictorCorrectorScheduler"]
    index_path.write_text(json.dumps(index))
    assert np.array_equal(sample(quiet(ScoreSDEPipeline.from_pretrained(tmp_path))), expected)


def test_generic_loader_error_on_a_bad_component(tmp_path):
    ScoreSDEPipeline(unet=tiny_unet(), scheduler=VEEulerMaruyamaScheduler()).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["scheduler"] = ["diffusers_scorekit", "NoSuchScheduler"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="NoSuchScheduler"):
        ScoreSDEPipeline.from_pretrained(tmp_path)
