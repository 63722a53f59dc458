r"""Neural-collapse statistics of penultimate features, accumulated in float64 in one pass.

For features :math:`h_i` with labels :math:`y_i \in \{0, \dots, C-1\}`, class means
:math:`\mu_c` and the global mean :math:`\mu_G` taken as the mean of the class means
(Papyan, Han & Donoho 2020, "Prevalence of neural collapse during the terminal phase of deep
learning training"):

.. math::

    \Sigma_W = \frac{1}{N} \sum_i (h_i - \mu_{y_i})(h_i - \mu_{y_i})^\top, \qquad
    \Sigma_B = \frac{1}{C} \sum_c (\mu_c - \mu_G)(\mu_c - \mu_G)^\top,

    \mathrm{NC1} = \frac{1}{C} \operatorname{tr}(\Sigma_W \Sigma_B^{+}),

with the pseudo-inverse cut at rank C - 1, the rank of :math:`\Sigma_B`, so that round-off in
the discarded directions cannot blow up or flip the sign of NC1. The accumulator keeps, per
class, the count and the sum of the features, and over all samples the sum of
:math:`(h - s)(h - s)^\top` for a shift s (the first batch's mean), which limits cancellation;
its memory does not grow with the number of samples. Accumulators of several processes are
added after moving each one's sums to a common shift (see :meth:`CollapseAccumulator.reduce_`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stabcheck.engine.distributed import SingleProcess


class CollapseAccumulator:
    """Running sums of features per class, in float64."""

    def __init__(self, num_classes: int, dim: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.dim = dim
        self.counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
        self.second = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.shift: torch.Tensor | None = None

    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        features = features.reshape(features.shape[0], -1).double()
        if self.shift is None:
            self.shift = features.mean(dim=0)
        centered = features - self.shift
        self.second += centered.T @ centered
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        self.sums.index_add_(0, labels, centered)

    def reduce_(self, group: SingleProcess) -> None:
        """Replace the sums by their totals over every rank of ``group``, in place.

        Each rank's sums are taken about its own shift s_r. They move to the mean shift s of the
        ranks with x + d = h - s for d = s_r - s: the class sums gain n_c d, and the second
        moment gains (sum x) d^T + d (sum x)^T + n d d^T. Every rank must have added features.
        """
        if not group.is_distributed:
            return
        assert self.shift is not None, "reduce_ needs features added on every rank"
        shift = group.sum_(self.shift.clone()) / group.world_size
        delta = self.shift - shift
        column = self.sums.sum(dim=0)
        self.second += torch.outer(column, delta) + torch.outer(delta, column) + self.counts.sum() * torch.outer(delta, delta)
        self.sums += self.counts.unsqueeze(1) * delta
        self.shift = shift
        group.sum_(self.counts)
        group.sum_(self.sums)
        group.sum_(self.second)

    def means(self) -> torch.Tensor:
        """Return the class means (rows), in the original coordinates."""
        return self.sums / self.counts.unsqueeze(1) + self.shift

    def within_covariance(self) -> torch.Tensor:
        """Return Sigma_W = (1/N) sum (h - mu_y)(h - mu_y)^T from the running sums."""
        total = self.counts.sum()
        shifted_means = self.sums / self.counts.unsqueeze(1)
        between_counts = (shifted_means * self.counts.unsqueeze(1)).T @ shifted_means
        within = (self.second - between_counts) / total
        return (within + within.T) / 2


@dataclass(frozen=True)
class CollapseMetrics:
    nc1: float
    nc2_equinorm: float
    nc2_equiangularity: float | None
    nc2_etf_error: float | None
    nc3_self_duality: float | None


def collapse_metrics(means: torch.Tensor, within: torch.Tensor, classifier: torch.Tensor | None) -> CollapseMetrics:
    """Compute NC1 to NC3 from class means [C, d], Sigma_W [d, d] and classifier weights [C, d].

    The equiangularity and ETF metrics are None when C - 1 exceeds the feature dimension,
    because a simplex ETF of C vectors does not fit in fewer than C - 1 dimensions.
    """
    num_classes, dim = means.shape
    global_mean = means.mean(dim=0)
    centered = means - global_mean
    between = centered.T @ centered / num_classes
    eigenvalues, eigenvectors = torch.linalg.eigh((between + between.T) / 2)
    keep = min(num_classes - 1, dim)
    values, vectors = eigenvalues[-keep:], eigenvectors[:, -keep:]
    positive = values > 0
    projected = vectors[:, positive].T @ within @ vectors[:, positive]
    # Each term is a quadratic form of the PSD matrix Sigma_W; clamping removes round-off below 0.
    nc1 = float((projected.diagonal().clamp(min=0.0) / values[positive]).sum() / num_classes)

    norms = centered.norm(dim=1)
    equinorm = float(norms.std(unbiased=False) / norms.mean())
    equiangularity = etf_error = None
    if num_classes - 1 <= dim:
        unit = centered / norms.unsqueeze(1)
        cosines = unit @ unit.T
        off_diagonal = ~torch.eye(num_classes, dtype=torch.bool, device=means.device)
        equiangularity = float((cosines[off_diagonal] + 1.0 / (num_classes - 1)).abs().mean())
        gram = centered @ centered.T
        simplex = torch.eye(num_classes, dtype=means.dtype, device=means.device) - 1.0 / num_classes
        etf_error = float((gram / gram.norm() - simplex / simplex.norm()).norm())

    self_duality = None
    if classifier is not None:
        weights = classifier.double()
        self_duality = float((weights / weights.norm() - centered / centered.norm()).norm().pow(2))
    return CollapseMetrics(nc1, equinorm, equiangularity, etf_error, self_duality)


def nearest_class_mean(features: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Return the index of the nearest class mean for each feature row (Euclidean)."""
    distances = torch.cdist(features.reshape(features.shape[0], -1).double(), means)
    return distances.argmin(dim=1)
