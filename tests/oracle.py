"""The exact-score oracle of the test suite (see ``diffusers_scorekit.mixture``) and the plain diffusers loop."""

import torch

from diffusers_scorekit.mixture import GaussianMixture, exact_score_model  # noqa: F401

def run_loop(scheduler, model, shape, num_inference_steps, seed=0):
    """The plain diffusers sampling loop."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(num_inference_steps)
    x = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, generator=generator).prev_sample
    return x
