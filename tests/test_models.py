"""The native score networks: shapes, conventions, conditioning, serialisation, errors, and that they learn."""

import json
import math

import pytest
import torch

from diffusers_scorekit.models import NCSNScoreModel, ScoreMLP, ScoreModelOutput

TINY_MLP = dict(data_dim=3, hidden_dim=16, num_layers=2, embedding_dim=8)
TINY_NCSN = dict(in_channels=2, sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, embedding_dim=8)
BATCH = 4


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These tiny models gain nothing from intra-op threads, and on a busy machine waiting for them dominates."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_mlp(**config) -> ScoreMLP:
    torch.manual_seed(0)
    return ScoreMLP(**{**TINY_MLP, **config}).eval()


def tiny_ncsn(**config) -> NCSNScoreModel:
    torch.manual_seed(0)
    return NCSNScoreModel(**{**TINY_NCSN, **config}).eval()


def mlp_input() -> torch.Tensor:
    return torch.randn(BATCH, 3, generator=torch.Generator().manual_seed(1))


def ncsn_input() -> torch.Tensor:
    return torch.randn(BATCH, 2, 8, 8, generator=torch.Generator().manual_seed(1))


def public_config(model) -> dict:
    """The config as config.json holds it (tuples as lists), without diffusers' bookkeeping entries."""
    return json.loads(json.dumps({key: value for key, value in model.config.items() if not key.startswith("_")}))


MODELS = [pytest.param(tiny_mlp, mlp_input, id="mlp"), pytest.param(tiny_ncsn, ncsn_input, id="ncsn")]
TIMESTEP_FORMS = [
    pytest.param(0.5, id="float"),
    pytest.param(3, id="int"),
    pytest.param(torch.tensor(0.5), id="0-d"),
    pytest.param(torch.tensor([0.5]), id="(1,)"),
    pytest.param(torch.linspace(0.1, 1.0, BATCH), id="(batch,)"),
    pytest.param(torch.linspace(0.1, 1.0, BATCH, dtype=torch.float64), id="(batch,) float64"),
]


@pytest.mark.parametrize("make_model, make_input", MODELS)
@pytest.mark.parametrize("timestep", TIMESTEP_FORMS)
@pytest.mark.parametrize("timestep_type", ["discrete", "continuous", "sigma", "log_sigma"])
def test_output_shape_for_every_timestep_form(make_model, make_input, timestep, timestep_type):
    model, sample = make_model(timestep_type=timestep_type), make_input()
    with torch.no_grad():
        output = model(sample, timestep)
        (tuple_output,) = model(sample, timestep, return_dict=False)
    assert isinstance(output, ScoreModelOutput)
    assert output.sample.shape == sample.shape
    assert torch.isfinite(output.sample).all()
    torch.testing.assert_close(tuple_output, output.sample)


def test_scalar_timestep_is_broadcast_to_the_batch():
    model, sample = tiny_ncsn(), ncsn_input()
    with torch.no_grad():
        torch.testing.assert_close(model(sample, 0.3).sample, model(sample, torch.full((BATCH,), 0.3)).sample)


def test_ncsn_out_channels_and_non_square_images():
    model = tiny_ncsn(out_channels=5, block_out_channels=(8, 16, 16))
    with torch.no_grad():
        output = model(torch.randn(2, 2, 8, 12), 1.0).sample
    assert output.shape == (2, 5, 8, 12)


@pytest.mark.parametrize("make_model, make_input", MODELS)
def test_output_depends_on_timestep(make_model, make_input):
    model, sample = make_model(prediction_type="epsilon"), make_input()
    with torch.no_grad():
        assert not torch.allclose(model(sample, 0.1).sample, model(sample, 1.0).sample)


@pytest.mark.parametrize("make_model, make_input", MODELS)
def test_save_and_load_round_trip(make_model, make_input, tmp_path):
    model, sample = make_model(num_class_embeds=3, timestep_type="log_sigma"), make_input()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "config.json").is_file()

    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert public_config(reloaded) == public_config(model)
    labels = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(sample, -1.0, class_labels=labels).sample, model(sample, -1.0, class_labels=labels).sample,
            rtol=0, atol=0,
        )


@pytest.mark.parametrize("make_model, make_input", MODELS)
@pytest.mark.parametrize("timestep_type, sigma", [("sigma", 0.25), ("log_sigma", math.log(0.25))])
def test_score_output_is_the_raw_output_over_sigma(make_model, make_input, timestep_type, sigma):
    sample = make_input()
    scaled = make_model(timestep_type=timestep_type)
    raw = make_model(timestep_type=timestep_type, scale_output_by_sigma=False)
    raw.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(scaled(sample, sigma).sample * 0.25, raw(sample, sigma).sample)


@pytest.mark.parametrize("make_model, make_input", MODELS)
@pytest.mark.parametrize(
    "prediction_type, timestep_type", [("epsilon", "sigma"), ("score", "continuous"), ("score", "discrete")]
)
def test_sigma_scaling_only_applies_to_score_models_told_sigma(make_model, make_input, prediction_type, timestep_type):
    sample = make_input()
    flag_on = make_model(prediction_type=prediction_type, timestep_type=timestep_type)
    flag_off = make_model(prediction_type=prediction_type, timestep_type=timestep_type, scale_output_by_sigma=False)
    flag_off.load_state_dict(flag_on.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(flag_on(sample, 0.25).sample, flag_off(sample, 0.25).sample)


def test_sigma_is_clamped_away_from_zero():
    model, sample = tiny_mlp(), mlp_input()
    with torch.no_grad():
        output = model(sample, 0.0).sample
    assert not torch.isnan(output).any()


@pytest.mark.parametrize("make_model, make_input", MODELS)
def test_class_conditioning(make_model, make_input):
    num_classes = 3
    model, sample = make_model(num_class_embeds=num_classes), make_input()
    with torch.no_grad():
        outputs = [model(sample, 0.5, class_labels=label).sample for label in range(num_classes + 1)]
        per_sample_labels = model(sample, 0.5, class_labels=torch.tensor([0, 1, 2, num_classes])).sample
    for i in range(num_classes + 1):
        for j in range(i):
            assert not torch.allclose(outputs[i], outputs[j])
    torch.testing.assert_close(per_sample_labels[-1], outputs[num_classes][-1])
    torch.testing.assert_close(per_sample_labels[0], outputs[0][0])

    with pytest.raises(ValueError, match="class-conditional"):
        model(sample, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        model(sample, 0.5, class_labels=num_classes + 1)
    with pytest.raises(ValueError, match="class_labels"):
        model(sample, 0.5, class_labels=torch.zeros(BATCH + 1, dtype=torch.long))


@pytest.mark.parametrize("make_model, make_input", MODELS)
def test_class_labels_to_an_unconditional_model_raise(make_model, make_input):
    with pytest.raises(ValueError, match="unconditional"):
        make_model()(make_input(), 0.5, class_labels=0)


@pytest.mark.parametrize("make_model", [tiny_mlp, tiny_ncsn])
@pytest.mark.parametrize(
    "config, message",
    [
        (dict(prediction_type="noise"), "prediction_type.*epsilon"),
        (dict(timestep_type="time"), "timestep_type.*log_sigma"),
        (dict(embedding_dim=0), "embedding_dim"),
        (dict(embedding_dim=7), "embedding_dim must be even"),
        (dict(num_class_embeds=0), "num_class_embeds"),
    ],
)
def test_invalid_shared_config_raises(make_model, config, message):
    with pytest.raises(ValueError, match=message):
        make_model(**config)


@pytest.mark.parametrize(
    "config, message",
    [(dict(data_dim=0), "data_dim"), (dict(hidden_dim=-4), "hidden_dim"), (dict(num_layers=0), "num_layers")],
)
def test_invalid_mlp_config_raises(config, message):
    with pytest.raises(ValueError, match=message):
        tiny_mlp(**config)


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(in_channels=0), "in_channels"),
        (dict(out_channels=0), "out_channels"),
        (dict(block_out_channels=()), "block_out_channels"),
        (dict(block_out_channels=(8, 0)), "block_out_channels"),
        (dict(block_out_channels=(8, 10)), "norm_num_groups"),
        (dict(layers_per_block=0), "layers_per_block"),
        (dict(sample_size=7), "sample_size.*divisible by 2"),
        (dict(sample_size=(8, 8, 8)), "sample_size"),
    ],
)
def test_invalid_ncsn_config_raises(config, message):
    with pytest.raises(ValueError, match=message):
        tiny_ncsn(**config)


@pytest.mark.parametrize(
    "sample, message",
    [(torch.randn(BATCH, 2), r"\(batch, 3\)"), (torch.randn(BATCH, 4), r"\(batch, 3\)"), (torch.randn(3), "batch")],
)
def test_mlp_wrong_input_shape_raises(sample, message):
    with pytest.raises(ValueError, match=message):
        tiny_mlp()(sample, 0.5)


@pytest.mark.parametrize(
    "sample, message",
    [
        (torch.randn(BATCH, 3, 8, 8), r"\(batch, 2, height, width\)"),
        (torch.randn(2, 8, 8), r"\(batch, 2, height, width\)"),
        (torch.randn(BATCH, 2, 8, 7), "divisible by 2"),
    ],
)
def test_ncsn_wrong_input_shape_raises(sample, message):
    with pytest.raises(ValueError, match=message):
        tiny_ncsn()(sample, 0.5)


@pytest.mark.parametrize("make_model, make_input", MODELS)
def test_timestep_of_wrong_shape_raises(make_model, make_input):
    with pytest.raises(ValueError, match=rf"shape \({BATCH},\)"):
        make_model()(make_input(), torch.ones(BATCH + 1))


@pytest.mark.parametrize("make_model, make_input", MODELS)
def test_bf16_autocast_and_bf16_weights(make_model, make_input):
    model, sample = make_model(num_class_embeds=2), make_input()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(sample, 0.5, class_labels=1).sample
        assert output.shape == sample.shape and torch.isfinite(output).all()
        model = model.to(torch.bfloat16)
        assert model.dtype == torch.bfloat16
        output = model(sample.bfloat16(), 0.5, class_labels=1).sample
    assert output.dtype == torch.bfloat16 and torch.isfinite(output).all()


def test_score_mlp_learns_a_gaussian_by_denoising_score_matching():
    """On N(mu, 0.5^2 I) the exact noisy score is -(x - mu) / (0.25 + sigma^2), so the best denoising loss is known:
    training must take the loss most of the way from where it starts down to that floor."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    mu, data_std = torch.tensor([1.0, -2.0]), 0.5
    model = ScoreMLP(hidden_dim=64, num_layers=2, embedding_dim=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def batch(size):
        clean = mu + data_std * torch.randn(size, 2, generator=generator)
        sigma = torch.exp(torch.empty(size).uniform_(math.log(0.05), math.log(2.0), generator=generator))
        noise = torch.randn(size, 2, generator=generator)
        return clean + sigma[:, None] * noise, sigma, noise

    def loss_of(noisy, sigma, noise):
        # sigma^2-weighted denoising score matching: |sigma s(x, sigma) + noise|^2
        return (sigma[:, None] * model(noisy, sigma).sample + noise).pow(2).sum(1).mean()

    eval_batch = batch(4096)
    noisy, sigma, noise = eval_batch
    exact_score = -(noisy - mu) / (data_std**2 + sigma[:, None] ** 2)
    floor = (sigma[:, None] * exact_score + noise).pow(2).sum(1).mean().item()
    with torch.no_grad():
        initial = loss_of(*eval_batch).item()
    for _ in range(200):
        loss = loss_of(*batch(256))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = loss_of(*eval_batch).item()

    assert initial - floor > 0.5, "the untrained model should be far from the optimum"
    assert final - floor < 0.1 * (initial - floor), (initial, final, floor)
