"""Bad input to the pipeline, the likelihood and the loaders: an exception of a fitting type whose message names
the argument (or file) and what is allowed, raised before any sampling; never a silent wrong result."""

import json
import math

import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from safetensors.torch import load_file, save_file

from diffusers_scorekit import (
    NCSNScoreModel,
    PredictorCorrectorScheduler,
    ScoreMLP,
    ScoreModelOutput,
    ScoreSDEPipeline,
    VEEulerMaruyamaScheduler,
)
from diffusers_scorekit import likelihood as flows
from diffusers_scorekit.sde import default_sampling_eps

WEIGHTS = "diffusion_pytorch_model.safetensors"


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def vector_pipe(num_class_embeds=None):
    torch.manual_seed(0)
    unet = ScoreMLP(data_dim=2, hidden_dim=8, num_layers=1, embedding_dim=8, num_class_embeds=num_class_embeds)
    return quiet(ScoreSDEPipeline(unet=unet, scheduler=VEEulerMaruyamaScheduler()))


def image_pipe():
    torch.manual_seed(0)
    unet = NCSNScoreModel(in_channels=1, sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1)
    return quiet(ScoreSDEPipeline(unet=unet, scheduler=PredictorCorrectorScheduler()))


def sample(pipe, **kwargs):
    return pipe(**{"batch_size": 2, "num_inference_steps": 2, "output_type": "pt", **kwargs})


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"batch_size": 0}, ValueError, r"batch_size=0 .* >= 1"),
        ({"batch_size": -3}, ValueError, r"batch_size=-3 .* >= 1"),
        ({"batch_size": 2.0}, TypeError, r"batch_size must be an int, got float"),
        ({"batch_size": True}, TypeError, r"batch_size must be an int, got bool"),
        ({"num_inference_steps": True}, ValueError, r"num_inference_steps=True"),
        ({"guidance_scale": 3.0}, ValueError, r"guidance_scale=3.0 needs a class-conditional model"),
        ({"guidance_scale": math.nan}, ValueError, r"guidance_scale=nan .* finite"),
        ({"classifier_scale": 2.0}, ValueError, r"classifier_scale=2.0 has no effect without a classifier"),
        ({"classifier": lambda x, t: torch.zeros(len(x), 3)}, ValueError, r"classifier guidance needs class_labels"),
        ({"latents": torch.full((2, 2), math.nan)}, ValueError, r"latents contains NaN or Inf"),
        ({"latents": torch.zeros(3, 2)}, ValueError, r"latents must have shape \(2, 2\)"),
    ],
)
def test_unconditional_call_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        sample(vector_pipe(), **kwargs)


def test_sample_adaptive_checks_its_batch_size():
    with pytest.raises(ValueError, match=r"batch_size=0"):
        vector_pipe().sample_adaptive(0)


@pytest.mark.parametrize(
    "labels, error, message",
    [
        (torch.tensor([0.0, 1.0]), TypeError, r"class_labels must be integers .* torch.float32"),
        (torch.tensor([True, False]), TypeError, r"class_labels must be integers .* torch.bool"),
        (torch.tensor([0, 4]), ValueError, r"class_labels must lie in \[0, 3\] .* got values in \[0, 4\]"),
        (torch.tensor([-1, 0]), ValueError, r"class_labels must lie in \[0, 3\] .* got values in \[-1, 0\]"),
        (torch.tensor([0, 1, 2]), ValueError, r"class_labels must have shape \(2,\)"),
    ],
)
def test_class_labels_of_a_conditional_model(labels, error, message):
    with pytest.raises(error, match=message):
        sample(vector_pipe(num_class_embeds=3), class_labels=labels, guidance_scale=2.0)


def test_in_range_labels_and_the_null_label_sample():
    pipe = vector_pipe(num_class_embeds=3)
    assert sample(pipe, class_labels=[0, 3], guidance_scale=2.0).samples.shape == (2, 2)


def test_guidance_scale_without_labels_is_an_error():
    with pytest.raises(ValueError, match=r"guidance_scale=2.0 needs class_labels"):
        sample(vector_pipe(num_class_embeds=3), guidance_scale=2.0)


def test_class_labels_of_a_classifier():
    three_classes = lambda x, t: torch.stack([x[:, 0], x[:, 1], -x[:, 0]], dim=1)  # noqa: E731
    with pytest.raises(ValueError, match=r"class_labels go up to 5, but the classifier returns 3 logits"):
        sample(vector_pipe(), classifier=three_classes, class_labels=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"class_labels must be >= 0, got -1"):
        sample(vector_pipe(), classifier=three_classes, class_labels=torch.tensor([0, -1]))
    with pytest.raises(TypeError, match=r"class_labels must be integers"):
        sample(vector_pipe(), classifier=three_classes, class_labels=torch.tensor([0.0, 1.0]))
    assert sample(vector_pipe(), classifier=three_classes, class_labels=torch.tensor([0, 2])).samples.shape == (2, 2)


@pytest.mark.parametrize(
    "image, mask, message",
    [
        (torch.zeros(1, 1, 8, 8), torch.full((1, 1, 8, 8), 0.5), r"mask must hold only 0 \(keep\) and 1 \(repaint\), got 0.5"),
        (torch.zeros(1, 1, 8, 8), torch.full((1, 1, 8, 8), math.nan), r"mask must hold only 0 .* got nan"),
        (torch.full((1, 1, 8, 8), math.inf), torch.ones(1, 1, 8, 8), r"image contains NaN or Inf"),
        (torch.full((1, 1, 8, 8), 255.0), torch.ones(1, 1, 8, 8), r"image has values in \[255, 255\], far outside the model's data_range \(-1.0, 1.0\)"),
    ],
)
def test_inpainting_inputs(image, mask, message):
    with pytest.raises(ValueError, match=message):
        image_pipe().inpaint(image, mask, num_inference_steps=2)


def test_inpainting_accepts_boolean_masks_and_images_near_the_range():
    image = torch.linspace(-1.2, 1.2, 64).reshape(1, 1, 8, 8)
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    out = image_pipe().inpaint(image, mask, num_inference_steps=2, output_type="pt").images
    assert out.shape == (1, 1, 8, 8)


@pytest.mark.parametrize(
    "samples, message",
    [
        (torch.zeros(0, 2), r"samples must be a non-empty batch"),
        (torch.tensor([[0.0, math.nan]]), r"samples contains NaN or Inf"),
        (torch.zeros(2, 3), r"samples must have shape \(batch, 2\)"),
    ],
)
def test_log_likelihood_inputs(samples, message):
    with pytest.raises(ValueError, match=message):
        vector_pipe().log_likelihood(samples)


def test_flow_functions_reject_empty_and_nonfinite_batches():
    score_fn = vector_pipe().score_function()
    with pytest.raises(ValueError, match=r"x is an empty batch"):
        flows.log_likelihood(score_fn, torch.zeros(0, 2))
    with pytest.raises(ValueError, match=r"x contains NaN or Inf"):
        flows.encode(score_fn, torch.tensor([[math.inf, 0.0]]))


class StandardGaussianScore(ModelMixin, ConfigMixin):
    """A custom vector model whose config declares its conventions but no ``data_dim``: the exact score of
    N(0, I) data perturbed by a VE SDE, ``-x / (1 + sigma^2)``."""

    @register_to_config
    def __init__(self, prediction_type: str = "score", timestep_type: str = "sigma"):
        super().__init__()
        self.variance = torch.nn.Parameter(torch.ones((), dtype=torch.float64))  # the data's

    def forward(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return ScoreModelOutput(sample=-x / (self.variance + sigma**2))


def test_a_custom_model_without_data_dim_gets_its_likelihood_and_a_clear_sampling_error():
    pipe = quiet(ScoreSDEPipeline(unet=StandardGaussianScore(), scheduler=VEEulerMaruyamaScheduler()))
    x = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.3, -0.2]], dtype=torch.float64)
    result = pipe.log_likelihood(x, divergence="exact", rtol=1e-8, atol=1e-8)
    # the flow scales N(0, I) data perturbed to sampling_eps onto its marginal at t = 1, which the likelihood then
    # scores under the prior N(0, sigma_max^2 I): both in closed form
    sde = pipe.scheduler.sde
    sigma_eps, sigma_max = sde.sigma(default_sampling_eps(sde)).item(), sde.sigma(1.0).item()
    scale = math.sqrt((1 + sigma_max**2) / (1 + sigma_eps**2))
    exact = (-0.5 * (scale * x) ** 2 / sigma_max**2 - 0.5 * math.log(2 * math.pi * sigma_max**2)).sum(1) + 3 * math.log(scale)
    torch.testing.assert_close(result.latent, scale * x, rtol=0, atol=1e-5)
    torch.testing.assert_close(result.log_likelihood, exact, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"declares neither data_dim .* register data_dim"):
        pipe(batch_size=2, num_inference_steps=2)


def test_damaged_model_index_names_the_file(tmp_path):
    vector_pipe().save_pretrained(tmp_path)
    index = tmp_path / "model_index.json"
    text = index.read_text()
    index.write_text(text[: len(text) // 2])
    with pytest.raises(OSError, match=r"model_index.json is not valid JSON"):
        ScoreSDEPipeline.from_pretrained(tmp_path)
    index.write_text(json.dumps([["diffusers_scorekit", "ScoreMLP"]]))
    with pytest.raises(OSError, match=r"model_index.json must hold a JSON object .* got a list"):
        ScoreSDEPipeline.from_pretrained(tmp_path)


def test_weights_file_missing_a_tensor_is_an_error(tmp_path):
    vector_pipe().save_pretrained(tmp_path)
    weights = tmp_path / "unet" / WEIGHTS
    state = load_file(weights)
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, weights)
    # ours names the file and the keys; diffusers < 0.33 refuses by itself (wrapped, naming the file, then the keys)
    with pytest.raises(OSError, match=rf"(?s){WEIGHTS}.* missing.*{dropped}"):
        ScoreSDEPipeline.from_pretrained(tmp_path)


def test_weights_of_the_wrong_shape_are_an_error(tmp_path):
    vector_pipe().save_pretrained(tmp_path)
    weights = tmp_path / "unet" / WEIGHTS
    state = load_file(weights)
    name = "output_proj.bias"
    state[name] = torch.zeros(5)
    save_file(state, weights)
    with pytest.raises(OSError, match=rf"{WEIGHTS}"):
        ScoreSDEPipeline.from_pretrained(tmp_path)


def test_channels_last_weights_are_saved_contiguous_and_stay_channels_last(tmp_path, monkeypatch):
    """diffusers < 0.33 hands the weights to safetensors as they are, and safetensors refuses non-contiguous ones."""
    import safetensors.torch

    written = []
    real_save_file = safetensors.torch.save_file

    def strict_save_file(tensors, *args, **kwargs):
        written.extend(name for name, tensor in tensors.items() if not tensor.is_contiguous())
        return real_save_file(tensors, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", strict_save_file)
    pipe = image_pipe()
    pipe.unet.to(memory_format=torch.channels_last)
    expected = {name: tensor.clone() for name, tensor in pipe.unet.state_dict().items()}
    assert any(not tensor.is_contiguous() for tensor in pipe.unet.parameters())
    pipe.save_pretrained(tmp_path)
    assert written == []
    channels_last = [p for p in pipe.unet.parameters() if p.ndim == 4 and not p.is_contiguous()]
    assert channels_last and all(p.is_contiguous(memory_format=torch.channels_last) for p in channels_last)
    reloaded = ScoreSDEPipeline.from_pretrained(tmp_path).unet.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(reloaded[name], tensor, rtol=0, atol=0)
