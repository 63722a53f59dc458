r"""Floating-point limits of the softmax: when a sample's softmax rounds to exactly one-hot.

After subtracting its largest logit, a sample's softmax denominator is

.. math::

    S = \sum_j e^{z_j - z_{\max}} = 1 + \sum_{j \ne \max} e^{-(z_{\max} - z_j)} .

When S rounds to exactly 1 in the dtype of the computation, the top probability is exactly 1,
the cross-entropy of a correct prediction is exactly 0, and its gradient vanishes: softmax
collapse (Prieto et al. 2025, "Grokking at the Edge of Numerical Stability"). With round to
nearest, 1 + x rounds to 1 once x is at most half the machine epsilon. So a sample with one
runner-up logit collapses once its margin reaches ln(2 / eps): about 5.5 in bfloat16, 7.6 in
float16, 16.6 in float32 and 36.7 in float64. More runner-ups need a larger margin.

The criterion follows that definition with torch.sum. When the non-maximal terms add up to
between a quarter and one epsilon, the rounded sum depends on the order of the additions, so
a softmax or cross-entropy kernel that sums in another order can disagree on those samples.
"""

from __future__ import annotations

import math

import torch

DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def collapse_margin(dtype: torch.dtype) -> float:
    """Return ln(2 / eps), the top-two logit margin from which a two-way softmax is one-hot."""
    return math.log(2.0 / torch.finfo(dtype).eps)


def softmax_denominator(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Return S = sum_j exp(z_j - max z) per row, with every step in ``dtype``.

    torch.sum accumulates half-precision inputs in float32 and rounds the result to the input
    dtype once, so a long row of equal terms does not stall the way a running float16 sum would.
    """
    cast = logits.to(dtype)
    shifted = cast - cast.max(dim=1, keepdim=True).values
    return torch.exp(shifted).sum(dim=1)


def collapsed(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Return a boolean per row: whether its softmax denominator is exactly 1 in ``dtype``."""
    return softmax_denominator(logits, dtype) == 1


def top_two_margin(logits: torch.Tensor) -> torch.Tensor:
    """Return the gap between each row's largest and second-largest logit, in float64."""
    top = logits.double().topk(2, dim=1).values
    return top[:, 0] - top[:, 1]
