"""Every rule of a scheduler config, at its boundary: the last value allowed passes, the first value past it
raises the exact message (field, value, what is allowed). ``validate_config`` checks only the fields a config
has, so each rule is tried on a config holding that field alone (plus what the rule compares it with). Then how
a partial or foreign config translates, and the grids a config describes, against their closed forms."""

import math
import re

import diffusers
import numpy as np
import pytest
import torch

from diffusers_scorekit.schedulers import (
    AnnealedLangevinScheduler,
    PredictorCorrectorScheduler,
    ProbabilityFlowODEScheduler,
    VEEulerMaruyamaScheduler,
    VPEulerMaruyamaScheduler,
)
from diffusers_scorekit.schedulers.scheduling_utils import (
    BETA_SCHEDULES,
    TIME_SPACINGS,
    level_times,
    translate_config,
    validate_config,
)
from diffusers_scorekit.sde import VESDE, VPSDE

ALL_SDES = ("ve", "vp", "subvp")


def rejects(config, message, error=ValueError, supported=ALL_SDES):
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        validate_config(config, supported)


# the last allowed values of each rule: every one passes
ALLOWED = [
    {},
    {"sde_type": "subvp"},
    {"sigma_min": 1e-300},
    {"sigma_min": 0.5, "sigma_max": 0.5000001},
    {"sigma_max": 1e-3},  # no sigma_min to compare with
    {"sigma_min": 2.0},  # no sigma_max to compare with
    {"beta_min": 0},
    {"beta_min": 0.0, "beta_max": 1e-12},
    {"beta_max": 0.0},
    {"beta_schedule": None},
    *({"beta_schedule": name} for name in BETA_SCHEDULES),
    {"num_train_timesteps": 2},
    {"prediction_type": "v_prediction"},
    {"timestep_type": "log_sigma"},
    {"sampling_eps": 0},
    {"sampling_eps": 0.999},
    {"sampling_eps": None, "sde_type": "vp"},
    {"sampling_eps": 0.0, "sde_type": "vp", "beta_schedule": "linear"},  # discrete: sigma(0) > 0
    {"sampling_eps": 0.0, "sde_type": "subvp", "trained_betas": [0.1, 0.2]},
    *({"time_spacing": name} for name in TIME_SPACINGS),
    {"snr": 1e-12, "step_lr": 1e-12, "edm_rho": 1e-12},
    {"noise_scale": 0.0},
    {"num_corrector_steps": 1, "num_annealed_steps": 1},
    # the types each field accepts
    {"sigma_min": np.float32(0.1), "sigma_max": np.int64(3), "snr": 1},
    {"num_train_timesteps": np.int32(10)},
    {"denoise_final": np.bool_(False), "predictor": "none", "beta_schedule": None},
    {"trained_betas": (0.5,)},
    {"trained_betas": np.array([1e-6, 0.999999])},
    {"trained_betas": torch.tensor([0.25, 0.5])},
]


@pytest.mark.parametrize("config", ALLOWED, ids=repr)
def test_the_last_allowed_value_of_each_rule_passes(config):
    validate_config(config, ALL_SDES)


def test_an_absent_sde_type_is_ve():
    validate_config({}, ("ve",))
    rejects({}, "sde_type='ve' is invalid: choose one of ('vp', 'subvp').", supported=("vp", "subvp"))
    rejects({"sde_type": "vp"}, "sde_type='vp' is invalid: choose one of ('ve',).", supported=("ve",))


@pytest.mark.parametrize(
    "config, message",
    [
        ({"sde_type": "edm"}, "sde_type='edm' is invalid: choose one of ('ve', 'vp', 'subvp')."),
        ({"sigma_min": 0.0}, "sigma_min=0.0 is invalid: it must be positive."),
        ({"sigma_min": -1e-300}, "sigma_min=-1e-300 is invalid: it must be positive."),
        ({"sigma_min": 0.5, "sigma_max": 0.5}, "sigma_max=0.5 is invalid: it must be greater than sigma_min=0.5."),
        ({"beta_min": -1e-12}, "beta_min=-1e-12 is invalid: it must be >= 0."),
        ({"beta_min": 0.1, "beta_max": 0.1}, "beta_max=0.1 is invalid: it must be greater than beta_min=0.1."),
        ({"beta_schedule": "cosine"}, "beta_schedule='cosine' is invalid: choose None (continuous linear beta) or "
         "one of ('linear', 'scaled_linear', 'squaredcos_cap_v2', 'sigmoid')."),
        ({"num_train_timesteps": 1}, "num_train_timesteps=1 is invalid: it must be an integer >= 2."),
        ({"prediction_type": "noise"}, "prediction_type='noise' is invalid: choose one of "
         "('epsilon', 'score', 'sample', 'v_prediction')."),
        ({"timestep_type": "log_snr"}, "timestep_type='log_snr' is invalid: choose one of "
         "('discrete', 'continuous', 'sigma', 'log_sigma')."),
        ({"sampling_eps": 1.0}, "sampling_eps=1.0 is invalid: it must lie in [0, 1)."),
        ({"sampling_eps": -1e-12}, "sampling_eps=-1e-12 is invalid: it must lie in [0, 1)."),
        ({"sampling_eps": 0.0, "sde_type": "vp"},
         "sampling_eps=0.0 is invalid: a continuous VP/sub-VP SDE has sigma(0) = 0, so it must be > 0."),
        ({"sampling_eps": 0, "sde_type": "subvp", "beta_schedule": None, "trained_betas": None},
         "sampling_eps=0 is invalid: a continuous VP/sub-VP SDE has sigma(0) = 0, so it must be > 0."),
        ({"time_spacing": "karras"}, "time_spacing='karras' is invalid: choose one of ('uniform', 'log_snr', 'edm')."),
        ({"snr": 0.0}, "snr=0.0 is invalid: it must be positive."),
        ({"step_lr": -1e-12}, "step_lr=-1e-12 is invalid: it must be positive."),
        ({"edm_rho": 0}, "edm_rho=0 is invalid: it must be positive."),
        ({"noise_scale": -1e-12}, "noise_scale=-1e-12 is invalid: it must be >= 0."),
        ({"num_corrector_steps": 0}, "num_corrector_steps=0 is invalid: it must be an integer >= 1."),
        ({"num_annealed_steps": 0}, "num_annealed_steps=0 is invalid: it must be an integer >= 1."),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_the_first_value_past_each_rule_raises_naming_it(config, message):
    rejects(config, message)


@pytest.mark.parametrize(
    "config, error, message",
    [
        ({"sigma_max": "50"}, TypeError, "sigma_max='50' is invalid: it must be a number, not str."),
        ({"beta_start": True}, TypeError, "beta_start=True is invalid: it must be a number, not bool."),
        ({"noise_scale": np.bool_(True)}, TypeError, "noise_scale=np.True_ is invalid: it must be a number, not bool."),
        ({"edm_rho": math.inf}, ValueError, "edm_rho=inf is invalid: it must be a finite number."),
        ({"beta_end": -math.inf}, ValueError, "beta_end=-inf is invalid: it must be a finite number."),
        ({"step_lr": math.nan}, ValueError, "step_lr=nan is invalid: it must be a finite number."),
        ({"num_train_timesteps": 10.0}, TypeError, "num_train_timesteps=10.0 is invalid: it must be an integer."),
        ({"num_corrector_steps": True}, TypeError, "num_corrector_steps=True is invalid: it must be an integer."),
        ({"num_annealed_steps": None}, TypeError, "num_annealed_steps=None is invalid: it must be an integer."),
        ({"time_spacing": 1}, TypeError, "time_spacing=1 is invalid: it must be a string."),
        ({"solver": b"euler"}, TypeError, "solver=b'euler' is invalid: it must be a string."),
        ({"denoise_final": 1}, TypeError, "denoise_final=1 is invalid: it must be true or false."),
        ({"denoise_final": None}, TypeError, "denoise_final=None is invalid: it must be true or false."),
        ({"trained_betas": [0.5, 1.0]}, TypeError,
         "trained_betas=[0.5, 1.0] is invalid: it must be a list of numbers in (0, 1)."),
        ({"trained_betas": [0.0, 0.5]}, TypeError,
         "trained_betas=[0.0, 0.5] is invalid: it must be a list of numbers in (0, 1)."),
        ({"trained_betas": [0.5, "0.5"]}, TypeError,
         "trained_betas=[0.5, '0.5'] is invalid: it must be a list of numbers in (0, 1)."),
        ({"trained_betas": "0.5"}, TypeError, "trained_betas='0.5' is invalid: it must be a list of numbers in (0, 1)."),
        ({"trained_betas": [True]}, TypeError, "trained_betas=[True] is invalid: it must be a list of numbers in (0, 1)."),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_a_value_of_the_wrong_type_raises_naming_it(config, error, message):
    rejects(config, message, error)


def test_types_are_checked_before_values_and_fields_in_order():
    # a bad type anywhere is reported before a bad value, and the first bad field of each kind is named
    rejects({"sde_type": "edm", "snr": "1"}, "snr='1' is invalid: it must be a number, not str.", TypeError)
    rejects({"sigma_min": "1", "num_train_timesteps": 1.5},
            "sigma_min='1' is invalid: it must be a number, not str.", TypeError)
    rejects({"num_train_timesteps": 1.5, "prediction_type": 3},
            "num_train_timesteps=1.5 is invalid: it must be an integer.", TypeError)
    rejects({"prediction_type": 3, "denoise_final": 0}, "prediction_type=3 is invalid: it must be a string.", TypeError)
    rejects({"denoise_final": 0, "trained_betas": [2.0]},
            "denoise_final=0 is invalid: it must be true or false.", TypeError)
    rejects({"sigma_min": -1.0, "beta_min": -1.0}, "sigma_min=-1.0 is invalid: it must be positive.")
    rejects({"snr": 0.0, "step_lr": 0.0}, "snr=0.0 is invalid: it must be positive.")
    rejects({"num_corrector_steps": 0, "num_annealed_steps": 0},
            "num_corrector_steps=0 is invalid: it must be an integer >= 1.")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: PredictorCorrectorScheduler(sde_type="vp", beta_max=0.1),
         "beta_max=0.1 is invalid: it must be greater than beta_min=0.1."),
        (lambda: ProbabilityFlowODEScheduler(sampling_eps=0.0),
         "sampling_eps=0.0 is invalid: a continuous VP/sub-VP SDE has sigma(0) = 0, so it must be > 0."),
        (lambda: AnnealedLangevinScheduler(num_annealed_steps=0),
         "num_annealed_steps=0 is invalid: it must be an integer >= 1."),
        (lambda: PredictorCorrectorScheduler(sde_type="ve", sigma_min=1.0, sigma_max=1.0),
         "sigma_max=1.0 is invalid: it must be greater than sigma_min=1.0."),
    ],
)
def test_every_scheduler_checks_its_config_when_built(make, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        make()


def test_annealed_langevin_has_no_sde_type_and_runs_ve():
    scheduler = AnnealedLangevinScheduler()
    assert "sde_type" not in scheduler.config and scheduler.sde_type == "ve"
    # the discrete VP schedule allows t = 0 exactly: its sigma(0) is that of beta_1
    ProbabilityFlowODEScheduler(sampling_eps=0.0, beta_schedule="linear").set_timesteps(3)


# --- translation of partial and foreign configs ----------------------------------------------------------------

DDPM_DEFAULTS = {k: diffusers.DDPMScheduler().config[k]
                 for k in ("beta_start", "beta_end", "num_train_timesteps", "prediction_type", "trained_betas")}


@pytest.mark.parametrize(
    "partial, expected",
    [
        # a field only DDPM-family configs have makes a partial dict one: diffusers' DDPM defaults fill the rest
        ({"beta_schedule": "scaled_linear"}, {**DDPM_DEFAULTS, "beta_schedule": "scaled_linear"}),
        ({"trained_betas": [0.1, 0.2]}, {**DDPM_DEFAULTS, "beta_schedule": "linear", "trained_betas": [0.1, 0.2]}),
        # a saved config naming its class gets that class's defaults
        ({"_class_name": "DDPMScheduler"}, {**DDPM_DEFAULTS, "beta_schedule": "linear"}),
    ],
)
def test_a_partial_ddpm_config_gets_diffusers_defaults(partial, expected):
    translated = translate_config(partial, PredictorCorrectorScheduler)
    assert {k: translated[k] for k in expected} == expected
    assert (translated["sde_type"], translated["timestep_type"], translated["time_spacing"]) == ("vp", "discrete", "uniform")
    assert translated["_class_name"] == "PredictorCorrectorScheduler"


def test_a_partial_scorekit_config_stays_a_scorekit_one():
    assert translate_config({"sigma_max": 10.0}, PredictorCorrectorScheduler) == {
        "sigma_max": 10.0, "sde_type": "ve", "_class_name": "PredictorCorrectorScheduler"}
    # an in-memory scorekit config names no class but has beta fields: it is still scorekit's, sigma range and all
    source = ProbabilityFlowODEScheduler(sde_type="subvp", beta_schedule="linear", sigma_min=0.5, sigma_max=2.0)
    assert "_class_name" not in source.config
    translated = translate_config(source.config, PredictorCorrectorScheduler)
    assert {k: translated[k] for k in ("sde_type", "sigma_min", "sigma_max", "beta_schedule")} == {
        "sde_type": "subvp", "sigma_min": 0.5, "sigma_max": 2.0, "beta_schedule": "linear"}


def test_fields_left_from_a_round_trip_come_back_unless_the_diffusers_class_owns_them(tmp_path):
    source = PredictorCorrectorScheduler(sde_type="subvp", beta_schedule="linear", timestep_type="continuous")
    # a saved DDPMScheduler config: DDPMScheduler has no timestep_type, so scorekit's comes back
    diffusers.DDPMScheduler.from_config(source.config).save_config(tmp_path / "ddpm")
    through_ddpm = PredictorCorrectorScheduler.from_pretrained(tmp_path / "ddpm")
    assert (through_ddpm.config.sde_type, through_ddpm.config.timestep_type) == ("subvp", "continuous")
    # EulerDiscreteScheduler has a timestep_type of its own: there the field is Euler's, which must be discrete
    diffusers.EulerDiscreteScheduler.from_config(source.config).save_config(tmp_path / "euler")
    with pytest.raises(ValueError, match=r"^timestep_type='continuous' in the EulerDiscreteScheduler config is not"):
        PredictorCorrectorScheduler.from_pretrained(tmp_path / "euler")
    # in memory no class is named: any field a DDPM-family class owns is that class's
    with pytest.raises(ValueError, match=r"^timestep_type='continuous' in the DDPM-family config is not supported"):
        PredictorCorrectorScheduler.from_config(diffusers.DDPMScheduler.from_config(source.config).config)
    # a VE sde_type left in a DDPM-family config cannot make its VP schedule VE
    ve_left = {**diffusers.DDPMScheduler().config, "sde_type": "ve"}
    assert translate_config(ve_left, PredictorCorrectorScheduler)["sde_type"] == "vp"
    # Karras sigmas are rho 7, whatever edm_rho a round trip left
    karras = {**diffusers.EulerDiscreteScheduler(use_karras_sigmas=True).config, "edm_rho": 3.0}
    translated = translate_config(karras, ProbabilityFlowODEScheduler)
    assert (translated["time_spacing"], translated["edm_rho"]) == ("edm", 7.0)


def test_dynamic_shifting_alone_is_refused():
    config = {**diffusers.DDPMScheduler().config, "use_dynamic_shifting": True}
    with pytest.raises(ValueError, match=r"^use_dynamic_shifting=True in the DDPM-family config is not supported: "
                                         r"flow-matching models are not score models\.$"):
        translate_config(config, PredictorCorrectorScheduler)


@pytest.mark.parametrize(
    "target, config, message",
    [
        (VEEulerMaruyamaScheduler, diffusers.DDPMScheduler().config,
         "VEEulerMaruyamaScheduler runs sde_type in ('ve',), but the config (from an in-memory config) describes "
         "sde_type='vp'; use one of PredictorCorrectorScheduler, ProbabilityFlowODEScheduler, "
         "VPEulerMaruyamaScheduler, which run it."),
        (VPEulerMaruyamaScheduler, {"_class_name": "ScoreSdeVeScheduler"},
         "VPEulerMaruyamaScheduler runs sde_type in ('vp', 'subvp'), but the config (from ScoreSdeVeScheduler) "
         "describes sde_type='ve'; use one of PredictorCorrectorScheduler, ProbabilityFlowODEScheduler, "
         "VEEulerMaruyamaScheduler, AnnealedLangevinScheduler, which run it."),
    ],
)
def test_a_config_of_the_other_sde_names_the_classes_that_run_it(target, config, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        target.from_config(config)


def test_from_config_returns_the_unused_keyword_arguments():
    scheduler, unused = ProbabilityFlowODEScheduler.from_config(
        diffusers.DDPMScheduler().config, return_unused_kwargs=True, not_a_field=3)
    # as diffusers' own from_config does, the unused keys include the class name
    assert isinstance(scheduler, ProbabilityFlowODEScheduler)
    assert unused == {"not_a_field": 3, "_class_name": "ProbabilityFlowODEScheduler"}


# --- grids: each spacing against its closed form ----------------------------------------------------------------


@pytest.mark.parametrize("sde", [VESDE(0.01, 50.0), VPSDE(0.1, 20.0)], ids=["ve", "vp"])
def test_level_times_are_uniform_in_t_in_log_snr_or_in_sigma_to_the_one_over_rho(sde):
    t_start, t_end, n = 1.0, 1e-3, 6
    uniform = level_times(sde, n, t_start, t_end, "uniform", 7.0)
    np.testing.assert_array_equal(uniform, np.linspace(t_start, t_end, n))
    log_snr = sde.log_snr(torch.as_tensor(level_times(sde, n, t_start, t_end, "log_snr", 7.0))).double().numpy()
    ends = sde.log_snr(torch.tensor([t_start, t_end], dtype=torch.float64)).numpy()
    np.testing.assert_allclose(log_snr, np.linspace(ends[0], ends[1], n), rtol=0, atol=1e-6)
    rho = 3.0
    edm = level_times(sde, n, t_start, t_end, "edm", rho)
    noise_ratio = np.exp(-sde.log_snr(torch.as_tensor(edm)).double().numpy())  # sigma / a
    high, low = np.exp(-ends)
    karras = (high ** (1 / rho) + np.linspace(0, 1, n) * (low ** (1 / rho) - high ** (1 / rho))) ** rho
    np.testing.assert_allclose(noise_ratio, karras, rtol=1e-5)
    assert (edm[0], edm[-1], log_snr.size) == (t_start, t_end, n)


def test_a_scheduler_grid_is_level_times_with_its_config():
    for spacing, rho in (("edm", 3.0), ("log_snr", 7.0), ("uniform", 7.0)):
        scheduler = ProbabilityFlowODEScheduler(time_spacing=spacing, edm_rho=rho, sampling_eps=2e-3)
        scheduler.set_timesteps(5)
        expected = level_times(scheduler.sde, 5, 1.0, 2e-3, spacing, rho)
        assert [scheduler.level_of(i).t for i in range(4)] == expected[:4].tolist()  # the fifth call denoises


def test_the_sde_is_built_from_every_schedule_field():
    scheduler = PredictorCorrectorScheduler(sde_type="vp", beta_min=0.3, beta_max=5.0)
    torch.testing.assert_close(scheduler.sde.marginal(0.4), VPSDE(0.3, 5.0).marginal(0.4), rtol=0, atol=0)
    betas = [0.01, 0.05, 0.1, 0.2]
    ddpm = diffusers.DDPMScheduler(num_train_timesteps=4, trained_betas=betas)
    ours = ProbabilityFlowODEScheduler.from_config(ddpm.config)
    assert ours.config.trained_betas == betas
    x_0, noise, timesteps = torch.ones(4, 2), torch.full((4, 2), 0.5), torch.arange(4)
    torch.testing.assert_close(ours.add_noise(x_0, noise, timesteps), ddpm.add_noise(x_0, noise, timesteps))


def test_before_set_timesteps_there_is_no_grid():
    scheduler = ProbabilityFlowODEScheduler()
    assert (scheduler.timesteps, scheduler.num_inference_steps, scheduler.begin_index) == (None, None, None)
    assert scheduler.step_index == 0
    scheduler.raise_if_nonfinite()  # nothing stepped: nothing to report


def test_one_level_without_denoising_cannot_step():
    for kwargs in ({"num_inference_steps": 1}, {"timesteps": [500]}):
        field = next(iter(kwargs))
        with pytest.raises(ValueError, match="^" + re.escape(
                f"{field}=1 is invalid: with denoise_final=False this scheduler needs 2 levels to take a step.")):
            ProbabilityFlowODEScheduler(denoise_final=False).set_timesteps(**kwargs)


@pytest.mark.parametrize("spacing", TIME_SPACINGS)
def test_a_one_level_grid_is_its_start(spacing):
    np.testing.assert_array_equal(level_times(VPSDE(0.1, 20.0), 1, 1.0, 1e-3, spacing, 7.0), [1.0])
    scheduler = ProbabilityFlowODEScheduler(time_spacing=spacing)
    scheduler.set_timesteps(1)
    assert scheduler.level_of(0).t == 1.0


# --- custom grids -----------------------------------------------------------------------------------------------


def test_custom_grids_from_arrays_and_tensors_are_the_list_grid():
    scheduler = ProbabilityFlowODEScheduler.from_config(diffusers.DDPMScheduler(num_train_timesteps=500).config)
    scheduler.set_timesteps(timesteps=[400, 200, 5])
    expected = [scheduler.level_of(i).t for i in range(3)]
    for values in (np.array([400, 200, 5]), torch.tensor([400.0, 200.0, 5.0])):
        scheduler.set_timesteps(timesteps=values)
        assert [scheduler.level_of(i).t for i in range(3)] == expected


def test_custom_grid_range_is_checked_at_both_ends_within_a_relative_tolerance():
    scheduler = VEEulerMaruyamaScheduler(sigma_min=0.01, sigma_max=50.0, timestep_type="sigma")
    scheduler.set_timesteps(timesteps=[50.0 * (1 + 5e-7), 1.0, 0.01 - 2e-5])  # within 1e-6 of the range's size
    assert (scheduler.level_of(0).t, scheduler.level_of(2).t) == (1.0, 0.0)  # and clamped to it
    message = "timesteps=[{}, 1.0, {}] is invalid: its values must lie in [0.01, 50] (t from 0 to 1)."
    for high, low in ((50.0 * (1 + 2e-6), 0.01), (50.0, 0.01 - 1e-4)):
        with pytest.raises(ValueError, match=f"^{re.escape(message.format(high, low))}$"):
            scheduler.set_timesteps(timesteps=[high, 1.0, low])
    # only the last entry is below the range
    with pytest.raises(ValueError, match="^" + re.escape("timesteps=[50.0, 20.0, 1.0, 0.001] is invalid")):
        scheduler.set_timesteps(timesteps=[50.0, 20.0, 1.0, 0.001])


def test_custom_sigmas_must_end_above_zero_where_sigma_can_be_zero():
    scheduler = ProbabilityFlowODEScheduler()  # continuous VP: sigma / a runs down to 0 at t = 0
    with pytest.raises(ValueError, match="^" + re.escape(
            "sigmas=[2.0, 1.0, 0.0] is invalid: its values must lie in [0, 152.167] (t from 0 to 1) and be positive: "
            "the final step to sigma = 0 is denoise_final's.") + "$"):
        scheduler.set_timesteps(sigmas=[2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="^" + re.escape(
            "timesteps=[999.0, 0.0] is invalid: its last level has sigma = 0, where the score is undefined.") + "$"):
        scheduler.set_timesteps(timesteps=[999.0, 0.0])


def test_a_score_sde_ve_config_translates_field_by_field():
    source = diffusers.ScoreSdeVeScheduler(num_train_timesteps=500, snr=0.2, sigma_min=0.02, sigma_max=80.0,
                                           sampling_eps=1e-4, correct_steps=3)
    translated = translate_config(source.config, PredictorCorrectorScheduler)
    assert {k: v for k, v in translated.items() if not k.startswith("_")} == {
        "sde_type": "ve", "prediction_type": "score", "timestep_type": "sigma", "predictor": "reverse_diffusion",
        "corrector": "langevin", "sigma_min": 0.02, "sigma_max": 80.0, "sampling_eps": 1e-4, "snr": 0.2,
        "num_corrector_steps": 3, "num_train_timesteps": 500}


def test_a_timestep_of_zero_matches_values_within_an_absolute_tolerance():
    scheduler = ProbabilityFlowODEScheduler.from_config(diffusers.DDPMScheduler(num_train_timesteps=500).config,
                                                        solver="euler")
    scheduler.set_timesteps(timesteps=[499, 0])
    x = torch.ones(2, 2)
    scheduler.step(x, 499.0, x)
    scheduler.step(x, 5e-7, x)  # the entry 0.0, as a value computed elsewhere may arrive
    scheduler.set_timesteps(timesteps=[499, 0])
    scheduler.step(x, 499.0, x)
    with pytest.raises(ValueError, match=r"^step was called with timestep=2e-06 but the next entry is 1 "):
        scheduler.step(x, 2e-6, x)
