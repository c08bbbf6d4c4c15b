"""Tracking p_t(c-|x_t) along the sampled chain by exact Bayes over the reverse kernels."""

from __future__ import annotations

import math

import torch

from dng.config import DNGConfig
from dng.errors import ConfigError, NonFiniteError
from dng.kernels.dpmsolver import READINGS


def gaussian_llr(rd, dd, std: float, temperature: float = 1.0, offset: float = 0.0):
    """Tempered log q(x_prev|x, c-)/q(x_prev|x) for equal-variance Gaussian kernels, [batch, negatives].

    From the step's statistics (`BranchMoments.statistics`): |x-mu_n|^2 - |x-mu_u|^2 = |d|^2 + 2 r.d with
    r = x - mu_u and d = mu_u - mu_n, which keeps float32 accurate for large latents where the two norms nearly
    cancel.
    """
    return (offset - temperature * (dd + 2 * rd)) / (2 * std**2)


def mixture_llr(rd, dd, std: float, log_p, temperature: float = 1.0, offset: float = 0.0,
                exclusive: bool = False, p_max: float = 0.99):
    """log p' - log p of each negative by Bayes with the unconditional kernel modelled as a mixture.

    Because eps_u = p eps_n + (1 - p) eps_rest, the unconditional kernel mean is m_u = p m_n + (1 - p) m_rest, so the
    complement "not c-" has the mean m_rest = m_u + p/(1-p) (m_u - m_n). The unconditional kernel is modelled as
    p N(m_n, s^2) + (1 - p) N(m_rest, s^2) (one Gaussian per hypothesis, equal variances) instead of one Gaussian
    N(m_u, s^2); Bayes over the hypotheses is then exact given those Gaussians. With r = x_prev - m_u,
    d = m_u - m_n and rho = p/(1-p):

        logit p' = logit p - temperature (1 + rho) [2 r.d + (1 - rho) |d|^2] / (2 s^2) + offset / (2 s^2)

    Temperature scales every hypothesis's squared distance (a kernel variance s^2 / temperature) and the offset
    is added to the log-likelihood of each negative against the rest: at small p both act as in the one-Gaussian
    update (`gaussian_llr`), which this update reduces to as p -> 0.

    `exclusive` negatives c_1..c_K are one categorical update over c_1..c_K and "none of them", whose mean is
    m_u + sum_i p_i d_i / (1 - sum_j p_j); it needs the cross terms d_i.d_j (`dd` as the [batch, K, K] Gram matrix,
    `BranchMoments.statistics(x, gram=True)`). Otherwise each negative has its own two-hypothesis update. `log_p`
    is the tracker's current [batch, negatives] state; 1 - p is floored at 1 - p_max so that rho stays finite in
    float32. Returns [batch, negatives], the same quantity as `gaussian_llr` (the increment of log p before the
    tracker's clamp), so the tracker and the trace are unchanged.
    """
    log_p = log_p.to(torch.float32)
    inv = 1.0 / (2 * std**2)
    floor = math.log1p(-p_max)
    if not exclusive:
        log_rest = torch.log1p(-log_p.exp()).clamp(min=floor)
        rho = (log_p - log_rest).exp()
        gap = (1 + rho) * (2 * rd + (1 - rho) * dd)
        logit = log_p - log_rest + (offset - temperature * gap) * inv
        return torch.nn.functional.logsigmoid(logit) - log_p
    # Log-likelihood of each hypothesis relative to N(x_prev; m_u, s^2): -|r + d_i|^2 + |r|^2 for the negatives,
    # -|r - e|^2 + |r|^2 with e = sum_i rho_i d_i for the rest.
    log_rest = torch.log1p(-torch.logsumexp(log_p, -1, keepdim=True).exp()).clamp(min=floor)
    rho = (log_p - log_rest).exp()
    own = (offset - temperature * (2 * rd + torch.diagonal(dd, dim1=-2, dim2=-1))) * inv
    e_sq = torch.einsum("bk,bkj,bj->b", rho, dd, rho)[:, None]
    rest = -temperature * (e_sq - 2 * (rho * rd).sum(-1, keepdim=True)) * inv
    total = torch.logsumexp(torch.cat([log_p + own, log_rest + rest], -1), -1, keepdim=True)
    return own - total


def moment_llr(rd, dd, std: float, log_p, temperature: float = 1.0, offset: float = 0.0,
               exclusive: bool = False, p_max: float = 0.99):
    """log p' - log p of each negative by Bayes with the unconditional kernel a Gaussian moment-matched to the mixture
    of the hypotheses' kernels, for [batch, negatives].

    The hypotheses' kernels are N(m_u - d_i, s^2) for the negatives and, for the rest, the mean that makes the
    mixture's mean m_u; their mixture has covariance s^2 I + D W D^T, D = [d_1 .. d_K] and W = diag(p) + p p^T /
    p_rest (p_rest = 1 - sum p; one negative against its complement: W = p / (1 - p)). The update divides each
    negative's kernel by that Gaussian instead of N(m_u, s^2): `gaussian_llr` plus, the same for every negative,

        log det(B) / 2 - a^T B^{-1} W a / (2 s^4),   B = I + W G / s^2,  a = (r.d_i),  G = (d_i.d_j)

    (Woodbury). Where the hypotheses' means lie far apart against s, the unconditional kernel is wide along them,
    and a sample near a negative's mean is not read as unlikely under it, as the one Gaussian N(m_u, s^2) reads it.
    It reduces to `gaussian_llr` as p -> 0, and to it again as steps shrink (|d|^2 / s^2 -> 0); unlike
    `mixture_llr` it never forms the rest's mean m_u + p/(1-p) d, which amplifies a model's error as p -> 1.
    `exclusive` needs `dd` as the [batch, K, K] Gram matrix; otherwise each negative is read against its
    complement. `temperature` scales every log-likelihood, `offset` as in `gaussian_llr`.
    """
    s2 = std**2
    floor = math.log1p(-p_max)
    log_p = log_p.to(torch.float64)
    rd64 = rd.to(torch.float64)
    if not exclusive:
        rho = (log_p - torch.log1p(-log_p.exp()).clamp(min=floor)).exp()
        dd64 = dd.to(torch.float64)
        spread = 0.5 * torch.log1p(rho * dd64 / s2) - rho * rd64**2 / (2 * s2 * (s2 + rho * dd64))
        return gaussian_llr(rd, dd, std, temperature, offset) + (temperature * spread).to(rd.dtype)
    p = log_p.exp()
    rest = torch.log1p(-torch.logsumexp(log_p, -1, keepdim=True).exp()).clamp(min=floor).exp()
    w = torch.diag_embed(p) + p[:, :, None] * p[:, None, :] / rest[:, :, None]
    b = torch.eye(p.shape[-1], dtype=torch.float64, device=p.device) + w @ dd.to(torch.float64) / s2
    solved = torch.linalg.solve(b, (w @ rd64[:, :, None]))[:, :, 0]
    spread = 0.5 * torch.linalg.slogdet(b)[1] - (rd64 * solved).sum(-1) / (2 * s2**2)
    own = gaussian_llr(rd, torch.diagonal(dd, dim1=-2, dim2=-1), std, temperature, offset)
    return own + (temperature * spread[:, None]).to(rd.dtype)


def clamp_log_p(log_p: torch.Tensor, p_min: float, p_max: float, exclusive: bool) -> torch.Tensor:
    """The tracker's clamp of log p [..., concepts]: each p into [p_min, p_max], or for mutually exclusive
    concepts each p above p_min and their total at most p_max, keeping their ratios (so 1 - sum(p) > 0)."""
    if not exclusive:
        return log_p.clamp(math.log(p_min), math.log(p_max))
    # Shift so the largest log p is <= 0 first: a huge log p would otherwise cancel to 0 in float32.
    log_p = (log_p - log_p.amax(-1, keepdim=True).clamp(min=0)).clamp(min=math.log(p_min))
    total = torch.logsumexp(log_p, dim=-1, keepdim=True)
    return log_p - (total - math.log(p_max)).clamp(min=0)


class PosteriorTracker:
    """Per-sample log-posterior of each negative concept, updated after every stochastic step (prior and clamp from
    a `DNGConfig`)."""

    def __init__(self, config: DNGConfig, dtype=torch.float32):
        self.config = config
        self.p_min, self.p_max, self.exclusive = config.p_min, config.p_max, config.exclusive
        self.dtype = dtype
        self.log_p = None

    def start(self, batch_size: int, num_concepts: int, device=None) -> None:
        log_prior = torch.tensor([math.log(p) for p in self.config.priors_for(num_concepts)], dtype=self.dtype,
                                 device=device)
        self.log_p = clamp_log_p(log_prior.expand(batch_size, num_concepts).clone(), self.p_min, self.p_max,
                                 self.exclusive)

    @property
    def p(self) -> torch.Tensor:
        """Posterior probabilities, shape [batch, concepts]."""
        return self.log_p.exp()

    def update(self, llr: torch.Tensor) -> None:
        """Bayes step log p += llr, then the clamp. An infinite ratio is overwhelming evidence, which the clamp
        bounds; a NaN ratio comes from a non-finite sample or branch mean and is refused, never read as no
        information."""
        llr = llr.to(self.dtype)
        if torch.isnan(llr).any():
            raise NonFiniteError(f"the posterior update got a NaN log-likelihood ratio for "
                                 f"{int(torch.isnan(llr).any(-1).sum())} of {len(llr)} samples: the step's sample or "
                                 "branch means are not finite (NaN model weights, or a guidance scale too large)")
        llr = llr.clamp(-1e30, 1e30)
        self.log_p = clamp_log_p(self.log_p + llr, self.p_min, self.p_max, self.exclusive)


def log_snr_gain(sigma: float, sigma_next: float) -> float:
    """log-SNR gained by a step from noise level sigma to sigma_next, 2 log(sigma / sigma_next); 0 where it is not
    finite (a step from infinite noise, flow matching's first, or onto clean data) or not known."""
    if 0 < sigma_next < sigma < math.inf:
        return 2 * math.log(sigma / sigma_next)
    return 0.0


# A step with (almost) no noise carries no usable likelihood ratio: the update would divide by ~0.
MIN_TRACKING_STD = 1e-6


def endpoint_weight(sigma: float, sigma_next: float) -> float:
    """The weight of the change of the hypotheses' gap over a step, in the integral of the step's evidence.

    With lambda = -log(sigma) the step's deterministic evidence is the integral of SNR(lambda) g(lambda) over
    [lambda, lambda + h], SNR = e^{2 lambda}, h = log(sigma / sigma_next). The Gaussian reading holds g at its start
    value A: A (1/sigma_next^2 - 1/sigma^2) / 2. With g linear in lambda from A to its end value B the integral gains
    (B - A) times this weight, e^{2 lambda} I1 / h with I1 = the integral of u e^{2u} over [0, h]; about 0.57 of
    the SNR's integral at h = 0.4, half of it as h -> 0. 0 where the step is not finite.
    """
    if not 0 < sigma_next < sigma < math.inf:
        return 0.0
    h = math.log(sigma / sigma_next)
    grown = math.expm1(2 * h)
    return ((grown + 1) / 2 - grown / (4 * h)) / sigma**2


class TrackedPosterior:
    """Where DNG's p comes from by default: tracked per sample by Bayes over the sampler's own Gaussian steps.

    `before_step` reads the step's kernel means for the unconditional and negative branches (no model call), and
    `after_step` updates log p from the sample the step drew; the llr it returns is the trace's. `reading` says how
    a step that also weighs earlier outputs (DPM-Solver's multistep and higher-order singlestep steps) is read
    (`dng.kernels.dpmsolver.READINGS`; None: the kernel's default, "data"); one-step kernels have only one reading.

    `endpoint` (docs/GMM.md, "The Karras spacing"): a step's llr is a one-point reading of its evidence, the
    integral over the step of SNR (|Delta D|^2 + 2 P.Delta D) (Delta D = D_u - D_n the hypotheses' gap in the data
    prediction, P = the push DNG applied, `pushed`) with Delta D held at its value at the step's start: exact as steps
    shrink, short by O(h) per unit of log-SNR at a step of size h. With `endpoint` the llr of a step is held until
    the next step's outputs give Delta D at its end, before that step reads p; the deterministic part is then
    integrated with Delta D linear in log-SNR between both ends (`endpoint_weight`), the noise's part stays the
    start's (Ito); the llr the step returned (the trace's) is corrected in place then, so a trace replays the
    tracker. None: the configuration's `endpoint` ("kernel": the kernel's `endpoint_reading`, on for DPM-Solver SDE,
    off for the one-step kernels).
    Singlestep solvers' stages are read as before. P is DNG's own push: a CFG push is read at the step's start.
    """

    tracks = True

    def __init__(self, reading: str | None = None, endpoint: bool | None = None):
        if reading is not None and reading not in READINGS:
            raise ConfigError(f"reading must be one of {', '.join(READINGS)}, got {reading!r}")
        self.reading = reading
        self.endpoint = endpoint

    def start(self, config: DNGConfig, kernel, batch_size: int, num_negatives: int, device=None) -> None:
        if self.reading is not None and hasattr(kernel, "reading"):
            kernel.reading = self.reading
        self.config, self.kernel = config, kernel
        self.tracker = PosteriorTracker(config)
        self.tracker.start(batch_size, num_negatives, device)
        self.moments = None
        endpoint = self.endpoint
        if endpoint is None:
            endpoint = {"on": True, "off": False}.get(config.endpoint, getattr(kernel, "endpoint_reading", False))
        # Singlestep stages restart from their first sample: their steps are read one at a time.
        self.defer = bool(endpoint) and not getattr(kernel, "singlestep", False)
        self.pending, self.scale = None, None

    def read(self, x, t) -> torch.Tensor:
        return self.tracker.p

    def before_step(self, t, x, eps_u, eps_n) -> None:
        moments = self.kernel.branch_moments(t, x, torch.cat([eps_u[None], eps_n]))
        # Below sigma_min the rule does not track; a step without noise carries no likelihood ratio.
        usable = moments.sigma >= self.config.sigma_min and moments.std > MIN_TRACKING_STD
        self.moments = moments if usable else None
        self.scale = None
        if self.pending is not None:
            self._settle(self.moments)
        if not moments.restart:
            # p at the sample this step starts from: where a later step of a singlestep stage starts too.
            self.held = self.tracker.log_p

    def pushed(self, scale: torch.Tensor) -> None:
        """The scale [batch, negatives] DNG applies at this step, after reading p: the push the endpoint reading
        integrates."""
        self.scale = scale

    def _kernel_std(self, moments) -> float:
        return moments.std if self.config.kernel_variance == "step" else moments.forward_std

    def _gap(self, moments) -> torch.Tensor:
        """Delta D per negative [negatives, batch, features], scaled so that the step's |d|^2 / (2 s^2) is
        |gap|^2 (1/sigma'^2 - 1/sigma^2) / 2."""
        snr = (1 / moments.sigma_next**2 - 1 / moments.sigma**2) / 2
        return moments.diff.to(torch.float32).flatten(2) / (self._kernel_std(moments) * math.sqrt(2 * snr))

    def _settle(self, moments) -> None:
        """Apply the last step's held llr, corrected with the gap at its end where this step is read."""
        llr, start, scale, weight = self.pending
        self.pending = None
        # The gap at the step's end, where this step is tracked and finite (its own weight is then > 0 too).
        if moments is not None and endpoint_weight(moments.sigma, moments.sigma_next) > 0:
            end = self._gap(moments)
            if end.shape == start.shape:
                # (B - A) + 2 sum_j scale_j (Delta D_j(x).Delta D_i(x') - Delta D_j(x).Delta D_i(x)) per negative i.
                change = end.square().sum(-1).T - start.square().sum(-1).T
                if scale is not None:
                    cross = torch.einsum("jbd,ibd->bji", start, end - start)
                    change = change + 2 * torch.einsum("bj,bji->bi", scale.to(cross.dtype), cross)
                # In place: the llr the trace holds for the step is its whole evidence, as the tracker added it.
                llr.sub_(self.config.temperature * weight * change.to(llr.dtype))
        self.tracker.update(llr)

    def after_step(self, x_prev) -> torch.Tensor | None:
        """The step's llr [batch, negatives] (p updated with it now, or with `endpoint` before the next step reads
        p); None where the step was not tracked."""
        moments, self.moments = self.moments, None
        if moments is None:
            return None
        c = self.config
        if moments.restart:
            self.tracker.log_p = self.held
        kernel_std = self._kernel_std(moments)
        # Both offsets as one per-step offset o, which the updates add as o / (2 s^2).
        offset = c.offset_per_step + c.offset * log_snr_gain(moments.sigma, moments.sigma_next) * 2 * kernel_std**2
        if c.update == "paper":
            llr = gaussian_llr(*moments.statistics(x_prev), kernel_std, c.temperature, offset)
        else:
            rd, dd = moments.statistics(x_prev, gram=c.exclusive)
            update = mixture_llr if c.update == "mixture" else moment_llr
            llr = update(rd, dd, kernel_std, self.tracker.log_p, c.temperature, offset, exclusive=c.exclusive,
                         p_max=c.p_max)
        weight = endpoint_weight(moments.sigma, moments.sigma_next)
        if self.defer and weight > 0 and not moments.restart:
            self.pending = (llr, self._gap(moments), self.scale, weight)
        else:
            self.tracker.update(llr)
        return llr


class ReadPosterior:
    """DNG's p read at every step from `fn(x_t, t)` -> [batch, negatives] instead of tracked: the exact mixture's
    posterior, or the model's own from every class branch. Clamped to the configuration's [p_min, p_max]."""

    tracks = False

    def __init__(self, fn):
        if not callable(fn):
            raise ConfigError(f"ReadPosterior needs a callable fn(x_t, t), got {type(fn).__name__}")
        self.fn = fn

    def start(self, config: DNGConfig, kernel, batch_size: int, num_negatives: int, device=None) -> None:
        self.p_min, self.p_max = config.p_min, config.p_max

    def read(self, x, t) -> torch.Tensor:
        return self.fn(x, t).to(torch.float32).clamp(self.p_min, self.p_max)

    def before_step(self, t, x, eps_u, eps_n) -> None:
        pass

    def pushed(self, scale) -> None:
        pass

    def after_step(self, x_prev) -> None:
        return None


def mixture_weights(eps_u: torch.Tensor, eps_k: torch.Tensor, ridge: float = 1e-3, iters: int = 300) -> torch.Tensor:
    """The model's own posterior over K classes from all of their branches: the weights p on the simplex that best
    explain the unconditional prediction as eps_u = sum_k p_k eps_k (the identity an exact model satisfies).

    `eps_u` [batch, ...], `eps_k` [K, batch, ...]; returns [batch, K]. Least squares in float64 after removing the
    component all branches share, with a ridge pulling p towards uniform weights at `ridge` times the mean
    eigenvalue of the branches' Gram matrix: where the branches do not tell the classes apart (high noise) the
    weights stay near uniform instead of following noise. Solved by accelerated projected gradient.
    """
    flat = eps_k.flatten(2).transpose(0, 1).double()  # [batch, K, D]
    mean = flat.mean(1, keepdim=True)
    centred, target = flat - mean, eps_u.flatten(1).double() - mean[:, 0]
    gram = centred @ centred.transpose(1, 2)
    k = gram.shape[-1]
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    lam = ridge * torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1)[:, None, None] + 1e-300
    hessian = gram + lam * eye
    linear = (centred @ target[:, :, None])[:, :, 0] + lam[:, :, 0] / k
    step = 1 / torch.linalg.eigvalsh(hessian)[:, -1:]
    p = y = torch.full((len(gram), k), 1.0 / k, dtype=gram.dtype, device=gram.device)
    momentum = 1.0
    for _ in range(iters):
        nxt = project_simplex(y - step * ((hessian @ y[:, :, None])[:, :, 0] - linear))
        momentum, previous = (1 + math.sqrt(1 + 4 * momentum**2)) / 2, momentum
        y = nxt + (previous - 1) / momentum * (nxt - p)
        p = nxt
    return p.to(eps_u.dtype)


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of `v` [batch, K] onto the probability simplex (sort-based)."""
    u = torch.sort(v, dim=-1, descending=True).values
    cumulative = u.cumsum(-1) - 1
    index = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype, device=v.device)
    count = (u - cumulative / index > 0).sum(-1, keepdim=True)
    theta = cumulative.gather(-1, count - 1) / count.to(v.dtype)
    return (v - theta).clamp(min=0)
