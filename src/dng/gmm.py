"""The exact Gaussian-mixture test bed.

A mixture sum_k w_k N(m_k, s_k^2 I) under a forward process x_t = a_t x_0 + b_t eps has components
N(a_t m_k, (a_t^2 s_k^2 + b_t^2) I): scores, class posteriors, reverse kernels and the target "mixture without the
removed classes" are all closed form. Each component is one class. Two paths: variance preserving (a = sqrt(abar),
b = sqrt(1 - abar), the model predicts epsilon) and rectified flow (a = 1 - s, b = s, the model predicts the
velocity eps - x_0).

Within component k, (x_0, eps) and x_t are jointly Gaussian with V_k = a^2 s_k^2 + b^2, so

    E[eps | x_t, k] = b (x_t - a m_k) / V_k,    E[x_0 | x_t, k] = m_k + a s_k^2 (x_t - a m_k) / V_k,
    E[eps - x_0 | x_t, k] = (b - a s_k^2) (x_t - a m_k) / V_k - m_k,

and the unconditional prediction is their average under p_t(k | x_t). Both stay finite at pure noise (a = 0), where
the score form of the velocity, -(x_t + b score) / a, does not.
"""

from __future__ import annotations

import math

import torch

from dng.errors import ConfigError


class VariancePreserving:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps on a training schedule `alphas_cumprod`; epsilon prediction."""

    prediction = "epsilon"

    def __init__(self, alphas_cumprod):
        self.abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)

    def __call__(self, t) -> tuple[float, float]:
        """(a, b) at timestep t.

        A fractional t (Euler-type schedulers' spacing) reads sigma = sqrt((1 - abar) / abar) interpolated linearly
        between the neighbouring timesteps, as those schedulers do.
        """
        t = float(t)
        if t.is_integer():
            abar = float(self.abar[int(t)])
        else:
            lo = int(t)
            sigmas = ((1 - self.abar[lo : lo + 2]) / self.abar[lo : lo + 2]).sqrt()
            abar = 1 / (1 + float(torch.lerp(sigmas[0], sigmas[1], t - lo)) ** 2)
        return abar**0.5, (1 - abar) ** 0.5


class RectifiedFlow:
    """x_t = (1 - s) x_0 + s eps at s = t / num_train_timesteps (flow-matching schedulers' timesteps); the model
    predicts the velocity eps - x_0."""

    prediction = "flow"

    def __init__(self, num_train_timesteps: int = 1000):
        self.num_train_timesteps = num_train_timesteps

    def __call__(self, t) -> tuple[float, float]:
        s = float(t) / self.num_train_timesteps
        return 1 - s, s


class GaussianMixture:
    """Isotropic Gaussian mixture with exact quantities at every timestep of a forward process `path`.

    `path` is a `VariancePreserving` or `RectifiedFlow`; a tensor of alphas_cumprod stands for
    `VariancePreserving(alphas_cumprod)`.
    """

    def __init__(self, means, stds, weights, path, dtype=torch.float64):
        try:
            self.means = torch.as_tensor(means, dtype=dtype)
            self.stds = torch.as_tensor(stds, dtype=dtype)
            self.weights = torch.as_tensor(weights, dtype=dtype)
        except (TypeError, ValueError, RuntimeError) as err:
            # Ragged or non-numeric lists (from a JSON config): torch's own message names no field.
            raise ConfigError(f"means must be K lists of d numbers each, stds and weights K numbers each: "
                              f"{err}") from None
        if self.means.dim() != 2:
            raise ConfigError(f"means must be a list of K vectors of one dimension d, got {tuple(self.means.shape)}")
        k = self.means.shape[0]
        if self.stds.shape != (k,) or self.weights.shape != (k,):
            raise ConfigError(f"need one std and one weight per mean: {k} means, {self.stds.numel()} stds, "
                              f"{self.weights.numel()} weights")
        if not (torch.isfinite(self.stds).all() and (self.stds > 0).all() and torch.isfinite(self.means).all()):
            raise ConfigError("stds must be finite and > 0, and means finite")
        if not (self.weights > 0).all() or not torch.isfinite(self.weights).all():
            raise ConfigError("weights must be finite and > 0 (drop a component instead of giving it weight 0)")
        self.weights = self.weights / self.weights.sum()
        self.path = path if isinstance(path, (VariancePreserving, RectifiedFlow)) else VariancePreserving(path)
        self.dtype = dtype
        self._mean_sq = (self.means**2).sum(-1)

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _at(self, t):
        """(a, b, component variances a^2 s_k^2 + b^2) at timestep t; t < 0 means the clean data."""
        a, b = (1.0, 0.0) if float(t) < 0 else self.path(t)
        return a, b, a**2 * self.stds**2 + b**2

    def _log_joint_t(self, x, a, var):
        """log w_k + log N(x; a m_k, var_k I) as [K, batch].

        |x - a m_k|^2 is expanded so that the K distances come from one matmul (no [batch, K, d] tensor), and
        components come first so that the softmax over them runs along contiguous rows: both matter at 10^4
        samples x 10^3 steps.
        """
        inv = 1 / var
        bias = self.weights.log() - 0.5 * (a**2 * self._mean_sq * inv + self.dim * torch.log(2 * math.pi * var))
        logits = torch.addmm(bias[:, None], self.means * (a * inv)[:, None], x.T)
        return logits.addcmul_(inv[:, None], torch.linalg.vector_norm(x, dim=-1).square()[None], value=-0.5)

    def log_joint(self, x, t=-1):
        """log w_k + log N_t(x | k), [batch, K]."""
        a, _, var = self._at(t)
        return self._log_joint_t(x.to(self.dtype), a, var).T

    def posterior(self, x, t=-1):
        """Exact class posterior p_t(k | x_t), [batch, K]."""
        a, _, var = self._at(t)
        return self._log_joint_t(x.to(self.dtype), a, var).softmax(0).T

    def log_density(self, x, t=-1, classes=None):
        """log p_t(x), or of the mixture restricted to `classes` (renormalised weights)."""
        joint = self.log_joint(x, t)
        if classes is None:
            return joint.logsumexp(-1)
        idx = torch.as_tensor(classes)
        return joint[:, idx].logsumexp(-1) - self.weights[idx].log().logsumexp(0)

    def predict(self, x, t, classes=None, out=None):
        """The exact model output, epsilon or velocity as the path predicts: unconditional [batch, d], or one per
        class in `classes` [len(classes), batch, d].

        Each component's output is c_k (x - a m_k) - d m_k (the module's formulas). `out` receives the result in
        place (the branch model fills one buffer instead of concatenating).
        """
        x = x.to(self.dtype)
        a, b, var = self._at(t)
        if self.path.prediction == "epsilon":
            c, d = b / var, 0.0
        else:
            c, d = (b - a * self.stds**2) / var, 1.0
        if classes is None:
            # sum_k p_k(x) (c_k (x - a m_k) - d m_k), the matmul fused with the x term.
            p = self._log_joint_t(x, a, var).softmax(0)
            pc = p * c[:, None]
            return torch.addmm(x * pc.sum(0)[:, None], (a * pc + d * p).T, self.means, alpha=-1, out=out)
        idx = torch.as_tensor(classes)
        means = self.means[idx][:, None]
        return torch.sub((x - a * means) * c[idx][:, None, None], means, alpha=d, out=out)

    def branch_model(self, negatives, positive=None):
        """A sampler model: branches [unconditional, positive?, negatives...] of one batch, in one call."""
        classes = ([] if positive is None else [positive]) + list(negatives)
        n_branches = 1 + len(classes)

        def model(x_all, t):
            x = x_all[: x_all.shape[0] // n_branches]
            out = torch.empty((n_branches,) + x.shape, dtype=self.dtype)
            self.predict(x, t, out=out[0])
            if classes:
                self.predict(x, t, classes, out=out[1:])
            return out.flatten(0, 1).to(x_all.dtype)

        return model

    def sample(self, n, classes=None, generator=None):
        """Exact samples of the clean mixture, or of the mixture restricted to `classes`; also their labels."""
        idx = torch.arange(self.num_classes) if classes is None else torch.as_tensor(classes)
        labels = idx[torch.multinomial(self.weights[idx], n, replacement=True, generator=generator)]
        z = torch.randn(n, self.dim, generator=generator, dtype=self.dtype)
        return self.means[labels] + self.stds[labels, None] * z, labels

    def kernel_llr(self, x_prev, x, t, t_prev, classes):
        """Exact log q(x_prev | x_t, c) - log q(x_prev | x_t) for each class c in `classes`, [batch, len].

        The forward transition is x_t = r x_prev + sqrt(q) n with r = a_t / a_prev, q = b_t^2 - r^2 b_prev^2, so
        within component k the pair (x_prev, x_t) is jointly Gaussian and q(x_prev | x_t, k) is Gaussian; the
        unconditional kernel is the mixture of these weighted by p_t(k | x_t).
        """
        x, x_prev = x.to(self.dtype), x_prev.to(self.dtype)
        a_prev, b_prev, var_prev = self._at(t_prev)
        a_t, b_t, _ = self._at(t)
        r = a_t / a_prev
        q = b_t**2 - r**2 * b_prev**2
        var_k = 1 / (1 / var_prev + r**2 / q)
        mean_k = var_k[:, None, None] * (a_prev * self.means[:, None] / var_prev[:, None, None] + r * x[None] / q)
        log_q = -0.5 * (((x_prev[None] - mean_k) ** 2).sum(-1) / var_k[:, None]
                        + self.dim * torch.log(2 * math.pi * var_k)[:, None]).T
        log_resp = self.log_joint(x, t).log_softmax(-1)
        return log_q[:, torch.as_tensor(classes)] - (log_resp + log_q).logsumexp(-1, keepdim=True)


def default_mixture_config(seed: int = 0) -> dict:
    """d = 64, K = 10, equal weights, unequal stds; class 0 is removed and classes 1 and 2 sit close to it."""
    g = torch.Generator().manual_seed(seed)
    d, k = 64, 10
    means = 0.6 * torch.randn(k, d, generator=g, dtype=torch.float64)
    for near, dist in ((1, 1.2), (2, 1.6)):
        direction = torch.randn(d, generator=g, dtype=torch.float64)
        means[near] = means[0] + dist * direction / direction.norm()
    stds = torch.linspace(0.15, 0.5, k, dtype=torch.float64)[torch.randperm(k, generator=g)]
    stds[0] = 0.3
    return {"means": means.tolist(), "stds": stds.tolist(), "weights": [1.0 / k] * k, "remove": [0]}
