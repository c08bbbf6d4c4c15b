"""Which approximation of the reverse kernels makes the tracked posterior trail the exact one?

On an exact mixture, Bayes over a chain with the exact reverse kernels q(x'|x, c) and q(x'|x) gives p_t(c|x_t) at
every step, whatever the step size (the forward process forgets c given x_t). The tracker instead divides one
Gaussian kernel per negative by one Gaussian for the unconditional kernel. This script samples one unguided DDPM
chain (`fixed_small`: the step's noise is the forward posterior's, s^2) with the exact model, accumulates log p of
the removed class from its prior under each of these updates along the same chain, and prints the median logit of
each minus the exact logit, for the samples grouped by their exact logit at the first step below `--at`:

- exact: the exact kernels (`GaussianMixture.kernel_llr`), the check of the identity above;
- one Gaussian: N(x'; m_c, s^2) / N(x'; m_u, s^2), the tracker's update (`update="paper"`);
- all classes, mixture: the unconditional kernel as sum_k p_k N(m_k, s^2) over every class, with the exact p_k;
- all classes, moment: it as one Gaussian with that mixture's covariance, s^2 I + sum_k p_k (m_k - m_u)(m_k - m_u)^T;
- two hypotheses, moment / mixture: the same built from the removed class and "the rest" only, as the tracker's
  `update="moment"` and `update="mixture"` build them from its two branches, here with the exact p (clamped at
  0.99, as `mixture_llr` clamps it);
- both moments: each kernel as the Gaussian with its own mean and covariance, s^2 I + c^2 Cov[x_0|x, c] for the
  removed class and s^2 I + c^2 Cov[x_0|x] for the unconditional one (c the kernel's weight on x_0): the
  covariances Tweedie's formula gives from each branch's Jacobian;
- both moments, first order: that update to first order in c^2 Cov / s^2, which needs of each covariance only its
  quadratic form in the residual and its trace (a Jacobian-vector product and a trace estimate per branch);
- both moments, CG: the both-moments update with each r^T S^-1 r by `--krylov-steps` conjugate-gradient steps, that
  many products of each covariance with a vector (Jacobian-vector products on a network), its log-determinants
  exact;
- both moments, CG + probes: that, with each log-determinant by stochastic Lanczos quadrature as well
  (`--probes` random sign vectors, the same for both kernels, `--krylov-steps` Lanczos steps each).

m_k is the exact kernel mean of class k (the first-order step from E[x_0|x, k]) and m_u = sum_k p_k m_k.

Run: .venv/bin/python benchmarks/kernel_decomposition.py --mixture "d=128, K=10" --steps 50
"""

from __future__ import annotations

import argparse
import math

import torch
from gmm_suite import SUITE

from dng.gmm import GaussianMixture, VariancePreserving

VARIANTS = ("exact", "one Gaussian", "all classes, mixture", "all classes, moment", "two hypotheses, moment",
            "two hypotheses, mixture", "both moments", "both moments, first order", "both moments, CG",
            "both moments, CG + probes")
KRYLOV = {"steps": 3, "probes": 1, "generator": torch.Generator().manual_seed(1)}
# Beyond logit 4 the accumulated log p of an update without the tracker's clamp can pass 0, where its logit means
# nothing; the groups stop there.
GROUPS = ((-4.0, -1.0), (-1.0, 1.0), (1.0, 4.0))
P_MAX = 0.99


def log_normal(x, mean, var):
    """log N(x; mean, var I) over the last dimension; var a number or one per row."""
    var = torch.as_tensor(var, dtype=x.dtype)
    return -0.5 * (((x - mean) ** 2).sum(-1) / var + x.shape[-1] * torch.log(2 * math.pi * var))


def log_normal_low_rank(x, mean, var, factors):
    """log N(x; mean, var I + U^T U) with U = `factors` [batch, rank, d] and var a number or one per row, by Woodbury
    and the determinant lemma."""
    rank, d = factors.shape[1], x.shape[-1]
    var = torch.as_tensor(var, dtype=x.dtype).expand(x.shape[0])
    inner = torch.eye(rank, dtype=x.dtype) + factors @ factors.transpose(1, 2) / var[:, None, None]
    r = x - mean
    ur = (factors @ r[..., None])[..., 0]
    quad = (r**2).sum(-1) / var - (ur[:, None] @ torch.linalg.solve(inner, ur[..., None]))[:, 0, 0] / var**2
    return -0.5 * (quad + d * torch.log(var) + torch.logdet(inner) + d * math.log(2 * math.pi))


def quadratic(r, var, factors=None):
    """r^T (var I + U^T U) r with U = `factors` [batch, rank, d] (none: var I)."""
    out = var * (r**2).sum(-1)
    return out if factors is None else out + ((factors @ r[..., None])[..., 0] ** 2).sum(-1)


def cg_quadratic(apply, r, steps: int):
    """r^T S^-1 r by `steps` conjugate-gradient steps on S (`apply(v)` = S v, one per row of r)."""
    x, residual = torch.zeros_like(r), r.clone()
    direction, norm = residual.clone(), (residual**2).sum(-1)
    for _ in range(steps):
        product = apply(direction)
        step = norm / (direction * product).sum(-1).clamp_min(1e-300)
        x = x + step[:, None] * direction
        residual = residual - step[:, None] * product
        new_norm = (residual**2).sum(-1)
        direction = residual + (new_norm / norm.clamp_min(1e-300))[:, None] * direction
        norm = new_norm
    return (r * x).sum(-1)


def lanczos_logdet(apply, probe, steps: int):
    """log det S ~ |z|^2 e1^T log(T) e1, T the tridiagonal matrix of `steps` Lanczos steps on S from z = `probe`."""
    q = probe / probe.norm(dim=-1, keepdim=True)
    previous, beta = torch.zeros_like(q), torch.zeros(q.shape[0], dtype=q.dtype)
    alphas, betas = [], []
    for j in range(steps):
        w = apply(q) - beta[:, None] * previous
        alpha = (w * q).sum(-1)
        w = w - alpha[:, None] * q
        alphas.append(alpha)
        beta = w.norm(dim=-1)
        if j < steps - 1:
            betas.append(beta)
            previous, q = q, w / beta.clamp_min(1e-300)[:, None]
    tri = torch.diag_embed(torch.stack(alphas, -1))
    if betas:
        off = torch.stack(betas, -1)
        tri = tri + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    values, vectors = torch.linalg.eigh(tri)
    return (probe**2).sum(-1) * (vectors[:, 0] ** 2 * values.clamp_min(1e-300).log()).sum(-1)


def logit(log_p):
    log_p = log_p.clamp(max=-1e-12)
    return log_p - torch.log(-torch.expm1(log_p))


def both_moments_llr(gmm: GaussianMixture, c: int, x, x_next, t, t_next):
    """log N(x_next; m_c, s^2 I + w^2 Cov[x_0|x, c]) - log N(x_next; m_u, s^2 I + w^2 Cov[x_0|x]): each kernel from x
    (at timestep t) to x_next (at t_next, < 0 for the clean data) as the Gaussian with its exact first two moments."""
    return updates(gmm, c, x, x_next, t, t_next, ("both moments",))["both moments"]


def updates(gmm: GaussianMixture, c: int, x, x_next, t, t_next, variants=VARIANTS):
    """Each variant's increment of log p(c) over the step x (at t) -> x_next (at t_next)."""
    a, b = gmm.path(t)
    a_n, b_n = (1.0, 0.0) if t_next < 0 else gmm.path(t_next)
    r = a / a_n
    q = b**2 - r**2 * b_n**2
    s2, weight = b_n**2 * q / b**2, a_n * q / b**2
    # E[x_0 | x, k] and Var[x_0 | x, k] under component k, then the mean of each class's kernel.
    var0 = a**2 * gmm.stds**2 + b**2
    x0 = gmm.means[:, None] + (a * gmm.stds**2 / var0)[:, None, None] * (x[None] - a * gmm.means[:, None])
    within = gmm.stds**2 * b**2 / var0
    m = weight * x0 + (r * b_n**2 / b**2) * x[None]
    log_p = gmm.posterior(x, t).log()
    p = log_p.exp()
    m_u = (p.T[..., None] * m).sum(0)
    own = log_normal(x_next, m[c], s2)
    per_class = torch.stack([log_normal(x_next, m[k], s2) for k in range(gmm.num_classes)], 1)
    pc = p[:, c].clamp(max=P_MAX)
    gap = m_u - m[c]
    rest = m_u + (pc / (1 - pc))[:, None] * gap
    between = (p.T.sqrt()[..., None] * (m - m_u[None])).transpose(0, 1) / weight
    within_u = (p * within).sum(1)

    def cov_c(v):
        return (s2 + weight**2 * within[c]) * v

    def cov_u(v):
        spread = (between.transpose(1, 2) @ (between @ v[..., None]))[..., 0]
        return (s2 + weight**2 * within_u)[:, None] * v + weight**2 * spread

    def krylov(probes: int):
        steps = KRYLOV["steps"]
        quad = cg_quadratic(cov_c, x_next - m[c], steps) - cg_quadratic(cov_u, x_next - m_u, steps)
        if probes:
            signs = [torch.randint(0, 2, x.shape, generator=KRYLOV["generator"], dtype=x.dtype) * 2 - 1
                     for _ in range(probes)]
            logdet = sum(lanczos_logdet(cov_c, z, steps) - lanczos_logdet(cov_u, z, steps) for z in signs) / probes
        else:
            inner = torch.eye(between.shape[1], dtype=x.dtype) + weight**2 * between @ between.transpose(1, 2) / (
                s2 + weight**2 * within_u)[:, None, None]
            logdet = gmm.dim * (torch.log(s2 + weight**2 * within[c]) - torch.log(s2 + weight**2 * within_u)) \
                - torch.logdet(inner)
        return -0.5 * (quad + logdet)

    formulas = {
        "exact": lambda: gmm.kernel_llr(x_next, x, t, t_next, [c])[:, 0],
        "one Gaussian": lambda: own - log_normal(x_next, m_u, s2),
        "all classes, mixture": lambda: own - (log_p + per_class).logsumexp(1),
        "all classes, moment": lambda: own - log_normal_low_rank(x_next, m_u, s2, weight * between),
        "two hypotheses, moment": lambda: own - log_normal_low_rank(x_next, m_u, s2,
                                                            ((pc / (1 - pc)).sqrt()[:, None] * gap)[:, None]),
        "two hypotheses, mixture": lambda: own - torch.logaddexp(pc.log() + own,
                                                         (1 - pc).log() + log_normal(x_next, rest, s2)),
        "both moments": lambda: log_normal(x_next, m[c], s2 + weight**2 * within[c])
        - log_normal_low_rank(x_next, m_u, s2 + weight**2 * within_u, weight * between),
        "both moments, first order": lambda: own - log_normal(x_next, m_u, s2)
        + weight**2 / (2 * s2**2) * (quadratic(x_next - m[c], within[c]) - quadratic(x_next - m_u, within_u, between))
        - weight**2 / (2 * s2) * (gmm.dim * (within[c] - within_u) - (between**2).sum((1, 2))),
        "both moments, CG": lambda: krylov(0),
        "both moments, CG + probes": lambda: krylov(KRYLOV["probes"]),
    }
    return {name: formulas[name]() for name in variants}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mixture", default="d=128, K=10", choices=list(SUITE))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--num-samples", type=int, default=4000)
    parser.add_argument("--at", type=float, default=0.72, metavar="SIGMA",
                        help="group the samples by their exact logit at the first step below this noise level")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--krylov-steps", type=int, default=3)
    parser.add_argument("--probes", type=int, default=1)
    args = parser.parse_args()
    if args.steps < 2 or args.num_samples < 1 or args.at <= 0 or args.krylov_steps < 1 or args.probes < 1:
        parser.error("need --steps >= 2, --num-samples >= 1, --at > 0, --krylov-steps >= 1 and --probes >= 1")
    KRYLOV.update(steps=args.krylov_steps, probes=args.probes,
                  generator=torch.Generator().manual_seed(args.seed + 1))
    torch.set_num_threads(1)
    config = SUITE[args.mixture]
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    gmm = GaussianMixture(config["means"], config["stds"], config["weights"],
                          VariancePreserving(torch.cumprod(1 - betas, 0)))
    c = config["remove"][0]
    times = [*torch.linspace(999, 0, args.steps).round().long().tolist(), -1]
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.num_samples, gmm.dim, generator=g, dtype=torch.float64)
    log_p = {name: torch.full((args.num_samples,), float(gmm.weights[c].log()), dtype=torch.float64)
             for name in VARIANTS}
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        a, b = gmm.path(t)
        if b / a < args.at:
            break
        a_n, b_n = (1.0, 0.0) if t_next < 0 else gmm.path(t_next)
        r = a / a_n
        q = b**2 - r**2 * b_n**2
        # The chain: DDPM with fixed_small variance and the exact unconditional model.
        var0 = a**2 * gmm.stds**2 + b**2
        x0 = gmm.means[:, None] + (a * gmm.stds**2 / var0)[:, None, None] * (x[None] - a * gmm.means[:, None])
        x0_u = (gmm.posterior(x, t).T[..., None] * x0).sum(0)
        x_next = (a_n * q / b**2) * x0_u + (r * b_n**2 / b**2) * x
        x_next = x_next + math.sqrt(b_n**2 * q / b**2) * torch.randn(x.shape, generator=g, dtype=x.dtype)
        for name, llr in updates(gmm, c, x, x_next, t, t_next).items():
            log_p[name] += llr
        x = x_next
    exact = gmm.posterior(x, t)[:, c].log()
    print(f"{args.mixture}, {args.steps} DDPM steps (fixed_small), unguided; at sigma {b / a:.3f}: median logit of "
          f"each update minus the exact one (exact logit in the group's range)")
    print("| exact logit | samples | " + " | ".join(VARIANTS) + " |")
    print("|---" * (len(VARIANTS) + 2) + "|")
    for low, high in GROUPS:
        group = (logit(exact) >= low) & (logit(exact) < high)
        if not group.any():
            continue
        lags = [float((logit(log_p[name][group]) - logit(exact[group])).median()) for name in VARIANTS]
        print(f"| [{low:g}, {high:g}) | {int(group.sum())} | " + " | ".join(f"{v:.2f}" for v in lags) + " |")


if __name__ == "__main__":
    main()
