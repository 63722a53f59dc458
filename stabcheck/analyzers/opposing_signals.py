"""Groups of high-gradient examples whose gradients point in opposite directions.

Rosenfeld & Risteski (2023, "Outliers with Opposing Signals Have an Outsized Effect on Neural
Network Optimization") describe paired groups of training examples with large gradients that
pull the network in opposite directions, and their outsized effect on training. This module
finds such pairs among the examples with the largest gradient norms, from the Gram matrix of
their gradients alone:

1. Seed candidate splits from the most negative entries K_ij of the cosine matrix: the examples
   aligned with i against those aligned with j. Members of two opposite groups give the most
   negative entries, even when other structure (a direction that most gradients share)
   dominates K. Seeding from the signs of K's top eigenvectors instead missed such pairs.
2. Refine each split: an example joins the side whose members' gradients it is closer to on
   average, if that mean cosine is at least MEMBERSHIP_COSINE, and is left out otherwise.
3. Keep the splits where both sides have MIN_GROUP_SIZE examples and the cosine between their
   gradient sums is at most OPPOSITION_COSINE. Report the one whose sums cancel most, that is
   with the most negative inner product of the two sums, then remove its examples and search again.
"""

from dataclasses import dataclass

import torch

# An example joins a group when its gradient's mean cosine with the group's other members is at least this.
MEMBERSHIP_COSINE = 0.5
# A pair counts as opposing when the cosine between the two groups' gradient sums is at most this.
OPPOSITION_COSINE = -0.25
MIN_GROUP_SIZE = 2
# Most negative entries of the cosine matrix tried as seeds for each pair.
SEED_NEGATIVE_PAIRS = 8
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
        members = torch.cat([pair.first, pair.second])
        remaining = remaining[~torch.isin(remaining, members)]
    return pairs


def _block(matrix: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    return matrix[rows][:, columns]


def _best_pair(gram: torch.Tensor, cosine: torch.Tensor, remaining: torch.Tensor) -> OpposingPair | None:
    local = _block(cosine, remaining, remaining)
    seeds = _seeds(local)
    if seeds is None:
        return None
    first_masks, second_masks = _refine(local, *seeds)
    best: tuple[float, torch.Tensor, torch.Tensor, float] | None = None
    for first_mask, second_mask in zip(first_masks, second_masks):
        first, second = remaining[first_mask], remaining[second_mask]
        if len(first) < MIN_GROUP_SIZE or len(second) < MIN_GROUP_SIZE:
            continue
        pair_cosine = _sum_cosine(gram, first, second)
        if pair_cosine > OPPOSITION_COSINE:
            continue
        cancellation = -float(_block(gram, first, second).sum())
        if best is None or cancellation > best[0]:
            best = (cancellation, first, second, pair_cosine)
    if best is None:
        return None
    _, first, second, pair_cosine = best
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


def _seeds(cosine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Return initial splits as two boolean masks per seed (rows), from the most negative
    entries of the cosine matrix, or None when no entry is negative."""
    size = cosine.shape[0]
    first, second = [], []
    upper = torch.triu(cosine, diagonal=1) + torch.tril(torch.full_like(cosine, float("inf")))
    count = min(SEED_NEGATIVE_PAIRS, size * (size - 1) // 2)
    for flat in torch.topk(upper.flatten(), count, largest=False).indices.tolist():
        row, column = divmod(flat, size)
        if cosine[row, column] >= 0:
            break
        toward_row, toward_column = cosine[row], cosine[column]
        first.append((toward_row >= MEMBERSHIP_COSINE) & (toward_row > toward_column))
        second.append((toward_column >= MEMBERSHIP_COSINE) & (toward_column > toward_row))
    if not first:
        return None
    return torch.stack(first), torch.stack(second)


def _refine(cosine: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine all seeds at once: each row of ``first`` and ``second`` is one split's masks.

    Stops when no split changes or when the splits return to the state of two steps before,
    since the reassignment can alternate between two states.
    """
    previous = None
    for _ in range(REFINE_STEPS):
        to_first = _alignment(cosine, first)
        to_second = _alignment(cosine, second)
        new_first = (to_first >= MEMBERSHIP_COSINE) & (to_first > to_second)
        new_second = (to_second >= MEMBERSHIP_COSINE) & (to_second > to_first)
        if torch.equal(new_first, first) and torch.equal(new_second, second):
            break
        if previous is not None and torch.equal(new_first, previous[0]) and torch.equal(new_second, previous[1]):
            break
        previous = (first, second)
        first, second = new_first, new_second
    return first, second


def _alignment(cosine: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Return each example's mean cosine with the other members of each group (one group per row).

    The mean over members, unlike the cosine with the group's mean direction, does not grow as
    a group absorbs examples that share only a common direction.
    """
    indicator = groups.to(cosine.dtype)
    others = indicator.sum(dim=1, keepdim=True) - indicator
    total = indicator @ cosine - indicator
    return torch.where(others > 0, total / others.clamp(min=1.0), torch.full_like(total, float("-inf")))


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
