"""A step's kernel means as the posterior tracker reads them: m_u and the gaps d_i = m_u - m_n_i per negative."""

from __future__ import annotations

import torch


class BranchMoments:
    """One step's unconditional kernel mean m_u and d_i = m_u - m_n_i per negative, as the tracker reads them.

    The tracker needs only r.d_i and d_i.d_j per sample, with r = x_prev - m_u (`statistics`): inner products,
    never differences of large squared norms. `mean_u` may be a function giving it when read: a part that the
    scheduler stores only during its step. `restart`: the step starts from the sample of the last step that did not
    restart (a singlestep solver's stage), so the tracker updates the p it held there; `sigma` is that sample's level.
    """

    restart = False

    def __init__(self, mean_u, diff, std: float, forward_std: float, levels=(float("nan"), float("nan"))):
        self._mean_u, self.diff, self.std, self.forward_std = mean_u, diff, std, forward_std
        self.sigma, self.sigma_next = levels

    @property
    def mean_u(self):
        return self._mean_u() if callable(self._mean_u) else self._mean_u

    def statistics(self, x_prev, gram: bool = False):
        """(rd [batch, negatives], dd): dd is |d_i|^2 [batch, negatives], or with `gram` d_i.d_j [batch, K, K]."""
        residual = x_prev.to(torch.float32) - self.mean_u.to(torch.float32)
        return self._inner(residual, self.diff.to(torch.float32), gram, 1.0)

    @staticmethod
    def _inner(residual, diff, gram, scale):
        """r.d_i and d_i.d_j with d_i = scale * diff_i (diff: [negatives, batch, ...], residual: [batch, ...])."""
        flat = diff.flatten(2)
        # einsum reduces through a batched matmul, without vecdot's full-size product temporary.
        rd = scale * torch.einsum("kbd,bd->bk", flat, residual.flatten(1))
        if gram:
            return rd, scale**2 * torch.einsum("kbd,jbd->bkj", flat, flat)
        return rd, scale**2 * torch.einsum("kbd,kbd->bk", flat, flat)


class AffineBranchMoments(BranchMoments):
    """The same for a kernel whose mean is a x + b out + c: from x and the raw outputs, without forming either mean.

    d_i = b (out_u - out_n_i) comes from one subtraction (no cancellation between nearly equal means) and
    r = x_prev - a x - b out_u - c; two full-size passes fewer than building the means, which is visible on a model
    as cheap as the update (the exact mixture). `offset` c is what the step's stored past adds (None where the step
    reads no past), or a function giving it when read: a part that the scheduler stores only during its step; `diff`
    is d given whole, where it also reads each branch's own past (None: b (out_u - out_n_i)).
    """

    def __init__(self, x, outs, a: float, b: float, std: float, forward_std: float,
                 levels=(float("nan"), float("nan")), offset=None, diff=None):
        self.x, self.outs, self.a, self.b, self.offset, self._diff = x, outs, a, b, offset, diff
        self.std, self.forward_std = std, forward_std
        self.sigma, self.sigma_next = levels

    def _offset(self):
        return self.offset() if callable(self.offset) else self.offset

    @property
    def mean_u(self):
        mean = torch.add(self.b * self.outs[0], self.x, alpha=self.a)
        offset = self._offset()
        return mean if offset is None else mean + offset

    @property
    def diff(self):
        return self.b * (self.outs[:1] - self.outs[1:]) if self._diff is None else self._diff

    def statistics(self, x_prev, gram: bool = False):
        residual = torch.add(x_prev.to(torch.float32), self.x, alpha=-self.a).add_(self.outs[0], alpha=-self.b)
        offset = self._offset()
        if offset is not None:
            residual.sub_(offset)
        if self._diff is None:
            return self._inner(residual, self.outs[:1] - self.outs[1:], gram, self.b)
        return self._inner(residual, self._diff, gram, 1.0)
