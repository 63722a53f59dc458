"""Groups of high-gradient examples whose gradients point in opposite directions.

Rosenfeld & Risteski (2023, "Outliers with Opposing Signals Have an Outsized Effect on Neural
Network Optimization") describe paired groups of training examples with large gradients that
pull the network in opposite directions, and their outsized effect on training. This module
finds such pairs among the examples with the largest gradient norms, from the Gram matrix of
their gradients alone:

1. Take the cosine matrix K of the candidates. For two groups with opposite gradients, K has a
   leading eigenvector that is positive on one group and negative on the other.
2. Split the candidates by the sign of one of K's top eigenvectors, then refine the split as in
   spherical 2-means: an example joins the side whose mean direction it is closer to, if that
   cosine is at least MEMBERSHIP_COSINE, and is left out otherwise.
3. Keep the pair when both sides have MIN_GROUP_SIZE examples and the cosine between their
   gradient sums is at most OPPOSITION_COSINE. Remove its examples and search again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# An example joins a group when its gradient's cosine with the group's mean direction is at least this.
MEMBERSHIP_COSINE = 0.25
# A pair counts as opposing when the cosine between the two groups' gradient sums is at most this.
OPPOSITION_COSINE = -0.25
MIN_GROUP_SIZE = 2
# Eigenvectors of the cosine matrix tried as seeds for each pair, largest eigenvalue first.
SEED_EIGENVECTORS = 3
REFINE_STEPS = 50


@dataclass(frozen=True)
class OpposingPair:
    """Two groups of candidate positions (rows of the Gram matrix) and how they relate."""

    first: torch.Tensor
    second: torch.Tensor
    cosine: float
    first_within_cosine: float
    second_within_cosine: float


def find_opposing_pairs(gram: torch.Tensor, max_pairs: int) -> list[OpposingPair]:
    """Find up to ``max_pairs`` disjoint opposing pairs among the rows of a Gram matrix.

    ``gram`` is the symmetric matrix of inner products of the candidates' gradients. Rows with
    a zero gradient take part in no group. The work stays in torch: mixing in NumPy's BLAS
    threads next to torch's slows both down on small machines.
    """
    gram = torch.as_tensor(gram, dtype=torch.float64)
    norms = gram.diagonal().clamp(min=0.0).sqrt()
    remaining = torch.nonzero(norms > 0).flatten()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    cosine = gram / torch.outer(safe, safe)

    pairs: list[OpposingPair] = []
    while len(pairs) < max_pairs and len(remaining) >= 2 * MIN_GROUP_SIZE:
        pair = _best_pair(gram, cosine, remaining)
        if pair is None:
            break
        pairs.append(pair)
        taken = torch.cat([pair.first, pair.second])
        remaining = remaining[~torch.isin(remaining, taken)]
    return pairs


def _block(matrix: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    return matrix[rows][:, columns]


def _best_pair(gram: torch.Tensor, cosine: torch.Tensor, remaining: torch.Tensor) -> OpposingPair | None:
    local = _block(cosine, remaining, remaining)
    _, vectors = torch.linalg.eigh(local)
    for column in range(1, min(SEED_EIGENVECTORS, len(remaining)) + 1):
        seed = vectors[:, -column]
        first_mask, second_mask = _refine(local, seed > 0, seed < 0)
        first, second = remaining[first_mask], remaining[second_mask]
        if len(first) < MIN_GROUP_SIZE or len(second) < MIN_GROUP_SIZE:
            continue
        pair_cosine = _sum_cosine(gram, first, second)
        if pair_cosine > OPPOSITION_COSINE:
            continue
        # The group with the larger summed squared gradient norm comes first.
        if _block(gram, second, second).trace() > _block(gram, first, first).trace():
            first, second = second, first
        return OpposingPair(
            first=first,
            second=second,
            cosine=pair_cosine,
            first_within_cosine=_mean_within_cosine(cosine, first),
            second_within_cosine=_mean_within_cosine(cosine, second),
        )
    return None


def _refine(cosine: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine two boolean membership masks over the rows of a cosine matrix (spherical 2-means)."""
    for _ in range(REFINE_STEPS):
        if not (first.any() and second.any()):
            break
        to_first = _alignment(cosine, first)
        to_second = _alignment(cosine, second)
        new_first = (to_first >= MEMBERSHIP_COSINE) & (to_first > to_second)
        new_second = (to_second >= MEMBERSHIP_COSINE) & (to_second > to_first)
        if torch.equal(new_first, first) and torch.equal(new_second, second):
            break
        first, second = new_first, new_second
    return first, second


def _alignment(cosine: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Return the cosine of each row's gradient with the sum of the group's unit gradients."""
    indicator = group.to(cosine.dtype)
    to_group = cosine @ indicator
    within = indicator @ to_group
    if within <= 0:
        return torch.full_like(to_group, float("-inf"))
    return to_group / within.sqrt()


def _sum_cosine(gram: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> float:
    cross = _block(gram, first, second).sum()
    first_sq = _block(gram, first, first).sum()
    second_sq = _block(gram, second, second).sum()
    if first_sq <= 0 or second_sq <= 0:
        return 0.0
    return float(cross / (first_sq * second_sq).sqrt())


def _mean_within_cosine(cosine: torch.Tensor, group: torch.Tensor) -> float:
    """Return the mean cosine over distinct pairs of the group's gradients."""
    size = len(group)
    block = _block(cosine, group, group)
    return float((block.sum() - block.trace()) / (size * (size - 1)))
