"""The pipeline's sampling loop replayed by hand: the same generator, dtype, timesteps and callback arguments give
the same tensors, bit for bit.

Each test drives ``ScoreSDEPipeline`` with its own ``torch.Generator`` (never the global one, which the replay
would share) and compares against diffusers' plain loop written out here, so a dropped generator, dtype or sign
in the loop changes the numbers and fails.
"""

from types import SimpleNamespace

import pytest
import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.utils.torch_utils import randn_tensor

from diffusers_scorekit import PredictorCorrectorScheduler, ScoreMLP, ScoreSDEPipeline


def _model():
    torch.manual_seed(0)
    return ScoreMLP(data_dim=3, hidden_dim=16, num_layers=1, embedding_dim=16, prediction_type="epsilon",
                    timestep_type="continuous").double()


def _scheduler():
    # a corrector, so that ``step`` draws noise twice per level from the generator
    return PredictorCorrectorScheduler(sde_type="vp", prediction_type="epsilon", timestep_type="continuous",
                                       corrector="langevin", snr=0.1)


def _pipeline(model, scheduler):
    pipe = ScoreSDEPipeline(unet=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _replay(model, scheduler, steps, generator, latents, known=None, keep_mask=None):
    """diffusers' loop, with score_sde's imputation of the known entries at every level."""
    scheduler.set_timesteps(steps)
    x = latents
    for i, t in enumerate(scheduler.timesteps):
        if known is not None:
            level = scheduler.level_of(i)
            noise = randn_tensor(x.shape, generator=generator, dtype=x.dtype)
            x = torch.where(keep_mask, level.a * known + level.sigma * noise, x)
        with torch.no_grad():
            output = model(x, t.expand(x.shape[0])).sample
        x = scheduler.step(output, t, x, generator=generator).prev_sample
    return x if known is None else torch.where(keep_mask, known, x)


def test_sampling_is_the_plain_loop_in_the_model_dtype_with_the_given_generator():
    model, scheduler = _model(), _scheduler()
    samples = _pipeline(model, scheduler)(batch_size=4, num_inference_steps=5, output_type="pt",
                                          generator=torch.Generator().manual_seed(3)).samples

    generator = torch.Generator().manual_seed(3)
    latents = randn_tensor((4, 3), generator=generator, dtype=torch.float64) * scheduler.init_noise_sigma
    expected = _replay(model, _scheduler(), 5, generator, latents)
    assert samples.dtype == torch.float64
    assert torch.equal(samples, expected)


def test_given_latents_are_cast_to_the_model_dtype():
    model, scheduler = _model(), _scheduler()
    latents = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))  # float32
    samples = _pipeline(model, scheduler)(batch_size=2, num_inference_steps=3, output_type="pt", latents=latents,
                                          generator=torch.Generator().manual_seed(4)).samples

    expected = _replay(model, _scheduler(), 3, torch.Generator().manual_seed(4), latents.double())
    assert samples.dtype == torch.float64
    assert torch.equal(samples, expected)


def test_inpainting_noises_the_known_entries_with_the_given_generator():
    model, scheduler = _model(), _scheduler()
    known = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1], [1, 0, 1]])  # 1 = repaint
    filled = _pipeline(model, scheduler).inpaint(known, mask, num_inference_steps=4, output_type="pt",
                                                 generator=torch.Generator().manual_seed(5)).samples

    generator = torch.Generator().manual_seed(5)
    latents = randn_tensor(known.shape, generator=generator, dtype=torch.float64) * scheduler.init_noise_sigma
    expected = _replay(model, _scheduler(), 4, generator, latents, known, mask == 0)
    assert torch.equal(filled, expected)
    assert torch.equal(filled[mask == 0], known[mask == 0])


def test_the_callback_sees_the_pipeline_the_step_index_and_the_timestep():
    model, scheduler = _model(), _scheduler()
    pipe = _pipeline(model, scheduler)
    seen = []

    def callback(pipeline, step_index, timestep, tensors):
        seen.append((pipeline, step_index, timestep, tensors["latents"].clone()))
        return {"latents": tensors["latents"] * 0.5} if step_index == 1 else {}

    samples = pipe(batch_size=2, num_inference_steps=3, output_type="pt", callback_on_step_end=callback,
                   generator=torch.Generator().manual_seed(2)).samples
    calls = len(scheduler.timesteps)  # a predictor and a corrector entry per level
    assert calls == 6
    assert [entry[0] for entry in seen] == [pipe] * calls
    assert [entry[1] for entry in seen] == list(range(calls))
    assert torch.equal(torch.stack([entry[2] for entry in seen]), scheduler.timesteps)

    # the replacement at step 1 is what step 2 continues from
    generator = torch.Generator().manual_seed(2)
    latents = randn_tensor((2, 3), generator=generator, dtype=torch.float64) * scheduler.init_noise_sigma
    replay = _scheduler()
    replay.set_timesteps(3)
    x = latents
    for i, t in enumerate(replay.timesteps):
        x = replay.step(model(x, t.expand(2)).sample.detach(), t, x, generator=generator).prev_sample
        assert torch.equal(x, seen[i][3])
        x = x * 0.5 if i == 1 else x
    assert torch.equal(samples, x)


class _CountingClassModel:
    """A class-conditional stub that records the batch size of every call."""

    def __init__(self):
        self.config = FrozenDict(data_dim=3, num_class_embeds=4, prediction_type="epsilon", timestep_type="continuous")
        self.dtype, self.device = torch.float32, torch.device("cpu")
        self.batch_sizes = []

    def __call__(self, x, timestep, class_labels=None):
        self.batch_sizes.append(x.shape[0])
        return SimpleNamespace(sample=0.5 * x + class_labels.to(x.dtype).reshape(-1, 1) / 10)


@pytest.mark.parametrize("guidance_scale, batch_per_call", [(1.0, 2), (3.0, 4)])
def test_guidance_scale_one_is_one_conditional_pass(guidance_scale, batch_per_call):
    """``w = 1`` is plain conditional sampling: one pass over the batch, not a conditional and a null one."""
    model = _CountingClassModel()
    pipe = _pipeline(model, PredictorCorrectorScheduler(sde_type="vp", prediction_type="epsilon",
                                                        timestep_type="continuous", corrector="none"))
    pipe(batch_size=2, num_inference_steps=3, class_labels=torch.tensor([0, 2]), guidance_scale=guidance_scale,
         output_type="pt", generator=torch.Generator().manual_seed(0))
    assert model.batch_sizes == [batch_per_call] * len(pipe.scheduler.timesteps)
