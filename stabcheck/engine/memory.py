"""Memory budgets: how much an analysis may allocate, and how much autograd saves per example.

The default budget is half of the memory that is free when the analysis starts: the
``MemAvailable`` line of ``/proc/meminfo`` on CPU, ``torch.cuda.mem_get_info`` on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

# Share of the free memory that the default budget takes, leaving the rest to other processes.
DEFAULT_SHARE = 0.5
# Budget used when the free memory cannot be read (no /proc on macOS or Windows).
FALLBACK_BUDGET = 4 * 1024**3


class MemoryBudgetExceeded(Exception):
    """The smallest unit of work needs more memory than the budget allows."""

    def __init__(self, needed: int, budget: int, subject: str) -> None:
        super().__init__(
            f"{subject} need about {format_bytes(needed)}, more than the memory budget of "
            f"{format_bytes(budget)}; raise --memory-budget or analyze a smaller model."
        )
        self.needed = needed
        self.budget = budget


def free_memory(device: torch.device) -> int | None:
    """Return the bytes free on ``device`` now, or None when the system does not report them."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    meminfo = Path("/proc/meminfo")
    try:
        lines = meminfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def default_budget(device: torch.device) -> int:
    free = free_memory(device)
    if free is None:
        return FALLBACK_BUDGET
    return int(free * DEFAULT_SHARE)


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """Parse a size such as ``8GB``, ``512MiB`` or ``1000000`` (bytes) into bytes.

    Decimal units (kB, MB, GB) are powers of 1000 and binary units (KiB, MiB, GiB) powers of 1024.
    """
    units = {
        "": 1, "b": 1,
        "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
        "k": 1024, "m": 1024**2, "g": 1024**3,
        "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
    }  # fmt: skip
    cleaned = text.strip().lower().replace(" ", "")
    number = cleaned.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = cleaned[len(number) :]
    if unit not in units:
        raise ValueError(f"unknown unit {unit!r} in size {text!r}; use B, MB, GB, MiB or GiB")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"size {text!r} does not start with a number; write it like 8GB or 512MiB") from None
    if not value > 0:
        raise ValueError(f"size {text!r} must be positive")
    return int(value * units[unit])


@contextlib.contextmanager
def saved_tensor_meter(exclude: Iterable[torch.Tensor] = ()) -> Iterator[list[int]]:
    """Count the bytes that autograd saves for backward inside the block.

    Yields a one-element list that contains the running total. A storage saved by several
    operations counts once, and the storages of ``exclude`` (parameters, buffers) not at all.
    """
    total = [0]
    seen: set[tuple[int, int]] = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in exclude}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total[0] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield total
