"""The exact-score oracle of the test suite (see ``diffusers_scorekit.mixture``) and the plain diffusers loop."""

import torch

from diffusers_scorekit.demo import sample
from diffusers_scorekit.mixture import GaussianMixture, exact_score_model, marginal_at_timestep  # noqa: F401


def run_loop(scheduler, model, shape, num_inference_steps, seed=0):
    """The plain diffusers sampling loop, seeded."""
    return sample(scheduler, model, shape, num_inference_steps, torch.Generator().manual_seed(seed))


class OracleModel:
    """The mixture's exact answer as a pipeline component: ``model(x, timestep, class_labels).sample``.

    With ``class_labels`` (one per component, plus ``num_components`` as the null label) it answers with that
    component's own perturbed score: the exact class-conditional model for classifier-free guidance.
    """

    def __init__(self, mixture, scheduler, conditional=False):
        from diffusers.configuration_utils import FrozenDict

        self.mixture, self.scheduler = mixture, scheduler
        self.config = FrozenDict(
            data_dim=mixture.dim,
            prediction_type=scheduler.config.prediction_type,
            timestep_type=scheduler.config.timestep_type,
            num_class_embeds=len(mixture.weights) if conditional else None,
        )
        self.dtype, self.device = torch.float32, torch.device("cpu")

    def _marginal(self, timestep):
        config = self.scheduler.config
        return marginal_at_timestep(self.scheduler.sde, timestep, config.timestep_type, config.num_train_timesteps)

    def __call__(self, x, timestep, class_labels=None):
        from types import SimpleNamespace

        a, sigma = self._marginal(timestep)
        prediction_type = self.config["prediction_type"]
        if class_labels is None:
            return SimpleNamespace(sample=self.mixture.model_output(x, a, sigma, prediction_type))
        output = self.mixture.model_output(x, a, sigma, prediction_type)
        for k in range(len(self.mixture.weights)):
            rows = class_labels == k
            if rows.any():
                component = GaussianMixture([1.0], self.mixture.means[k : k + 1], self.mixture.stds[k : k + 1])
                output[rows] = component.model_output(x[rows], a, sigma, prediction_type)
        return SimpleNamespace(sample=output)


def mixture_classifier(mixture, scheduler):
    """The exact noise-conditional classifier log p(k | x_t) of the mixture's components, as logits."""
    oracle = OracleModel(mixture, scheduler)

    def classifier(x, timestep):
        a, sigma = oracle._marginal(timestep)
        variances = a**2 * mixture.stds**2 + sigma**2
        diff = x.to(torch.float64)[:, None, :] - a * mixture.means[None]
        terms = mixture.weights.log() - 0.5 * diff.pow(2).sum(-1) / variances - 0.5 * mixture.dim * torch.log(variances)
        return terms.to(x.dtype)

    return classifier
