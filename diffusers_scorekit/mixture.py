"""A Gaussian mixture with closed-form perturbed score and log-density: the exact answer that samplers,
likelihood and losses are checked against without any training, and the demo's ideal "model".

With data ``x_0 ~ sum_k w_k N(mu_k, s_k^2 I)`` and ``x_t = a x_0 + sigma z``, the perturbed density is again a
mixture, ``sum_k w_k N(a mu_k, (a^2 s_k^2 + sigma^2) I)``. Everything here is written from that formula alone
(float64), not from the package's conversions, so that a shared mistake cannot cancel out.
"""

import math

import torch


class GaussianMixture:
    def __init__(self, weights, means, stds):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = self.weights / self.weights.sum()
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        self.dim = self.means.shape[1]

    @classmethod
    def ring(cls, num_modes=8, radius=1.0, std=0.1):
        angles = torch.arange(num_modes, dtype=torch.float64) * 2 * math.pi / num_modes
        means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
        return cls(torch.arange(2, num_modes + 2, dtype=torch.float64), means, [std] * num_modes)

    @classmethod
    def high_dimensional(cls, dim=64, num_modes=4, distance=1.5, std=0.2, seed=0):
        generator = torch.Generator().manual_seed(seed)
        directions = torch.randn(num_modes, dim, generator=generator, dtype=torch.float64)
        means = distance * directions / directions.norm(dim=1, keepdim=True)
        return cls(torch.arange(1, num_modes + 1, dtype=torch.float64), means, [std] * num_modes)

    def sample(self, num_samples, generator=None):
        labels = torch.multinomial(self.weights, num_samples, replacement=True, generator=generator)
        noise = torch.randn(num_samples, self.dim, generator=generator, dtype=torch.float64)
        return self.means[labels] + self.stds[labels, None] * noise

    def _component_terms(self, x, a, sigma):
        """Per-component log-weight + log-density of x_t, and the component variances, shape (n, K)."""
        x = x.to(torch.float64)
        variances = a**2 * self.stds**2 + sigma**2
        diff = x[:, None, :] - a * self.means[None]
        log_density = -0.5 * diff.pow(2).sum(-1) / variances - 0.5 * self.dim * torch.log(2 * math.pi * variances)
        return self.weights.log() + log_density, diff, variances

    def log_prob(self, x, a=1.0, sigma=0.0):
        terms, _, _ = self._component_terms(x, a, sigma)
        return torch.logsumexp(terms, dim=1)

    def score(self, x, a, sigma):
        terms, diff, variances = self._component_terms(x, a, sigma)
        responsibilities = torch.softmax(terms, dim=1)
        return -(responsibilities[..., None] * diff / variances[None, :, None]).sum(1)

    def model_output(self, x, a, sigma, prediction_type):
        """What an ideal network outputs at x_t, for each output convention."""
        score = self.score(x, a, sigma)
        epsilon = -sigma * score
        sample_0 = (x.to(torch.float64) + sigma**2 * score) / a
        outputs = {
            "score": score,
            "epsilon": epsilon,
            "sample": sample_0,
            "v_prediction": (a * epsilon - sigma * sample_0) / math.sqrt(a**2 + sigma**2),
        }
        return outputs[prediction_type].to(x.dtype)

    def report(self, samples):
        """Mode weights (total variation), per-mode mean error and pooled/max within-mode variance ratio."""
        samples = samples.to(torch.float64)
        labels = self.log_prob_components(samples).argmax(1)
        counts = torch.bincount(labels, minlength=len(self.weights)).to(torch.float64)
        total_variation = 0.5 * (counts / counts.sum() - self.weights).abs().sum().item()
        mean_errors, variance_ratios = [], []
        for k in range(len(self.weights)):
            members = samples[labels == k]
            if len(members) < 10:
                return {"tv": total_variation, "mean_error": math.inf, "variance_error": math.inf,
                        "max_variance_error": math.inf, "nonfinite": not torch.isfinite(samples).all().item()}
            mean_errors.append(((members.mean(0) - self.means[k]).norm() / (self.stds[k] * math.sqrt(self.dim))).item())
            variance_ratios.append(members.var(0).mean().item() / self.stds[k].item() ** 2)
        return {
            "tv": total_variation,
            "mean_error": max(mean_errors),
            "variance_error": abs(self.pooled_variance_ratio(samples, labels) - 1),
            "max_variance_error": max(abs(r - 1) for r in variance_ratios),
            "nonfinite": not torch.isfinite(samples).all().item(),
        }

    def pooled_variance_ratio(self, samples, labels=None):
        """``sum_k n_k v_k / sum_k n_k std_k^2``: the within-mode variance of the samples assigned to each mode (its
        likeliest component, unless ``labels`` says), pooled over modes by membership, over the modes' own. A mode
        with fewer than two members counts as zero variance."""
        samples = samples.to(torch.float64)
        if labels is None:
            labels = self.log_prob_components(samples).argmax(1)
        counts = torch.bincount(labels, minlength=len(self.weights)).to(torch.float64)
        variances = torch.stack([samples[labels == k].var(0).mean() if counts[k] > 1 else samples.new_zeros(())
                                 for k in range(len(self.weights))])
        return ((counts * variances).sum() / (counts * self.stds**2).sum()).item()

    def log_prob_components(self, x):
        terms, _, _ = self._component_terms(x, 1.0, 0.0)
        return terms


def marginal_at_timestep(sde, timestep, timestep_type, num_train_timesteps=1000):
    """``(a, sigma)`` as Python floats at the time a model's ``timestep`` denotes (its first entry: samplers give
    the whole batch one time), for exact "models" that answer in closed form."""
    from .parametrization import t_from_timestep

    first = torch.as_tensor(timestep).reshape(-1)[:1].cpu()
    t = t_from_timestep(first, sde, timestep_type, num_train_timesteps)
    a, sigma = sde.marginal(t)
    return a.item(), sigma.item()


def exact_score_model(mixture, scheduler):
    """A model for the plain diffusers loop: maps the timestep the scheduler gives to t, then outputs the
    mixture's exact answer in the scheduler's prediction_type."""
    config = scheduler.config

    def model(x, timestep):
        a, sigma = marginal_at_timestep(scheduler.sde, timestep, config.timestep_type, config.get("num_train_timesteps", 1000))
        return mixture.model_output(x, a, sigma, config.prediction_type)

    return model
