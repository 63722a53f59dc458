"""stabcheck: training-stability diagnostics for PyTorch checkpoints."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["analyze", "TrainingMonitor", "StabcheckCallback", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported on first use so that `import stabcheck` stays cheap for the CLI's --help.
    if name == "analyze":
        from stabcheck.api import analyze

        return analyze
    if name == "TrainingMonitor":
        from stabcheck.training import TrainingMonitor

        return TrainingMonitor
    if name == "StabcheckCallback":
        # Raises ImportError naming the stabcheck[lightning] extra when Lightning is missing.
        from stabcheck.lightning import StabcheckCallback

        return StabcheckCallback
    raise AttributeError(f"module 'stabcheck' has no attribute {name!r}")
