"""Loading ``stabcheck.toml`` or ``[tool.stabcheck]`` in ``pyproject.toml``.

Keys mirror the command-line options with underscores (``max_samples``, ``model_kwargs``), a
``gates`` table contains thresholds and a ``baseline_tolerances`` table per-metric tolerances. Relative paths in specs are resolved against the config
file's folder. Options given on the command line override the file.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stabcheck.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

KNOWN_KEYS = {
    "model": str,
    "model_kwargs": dict,
    "data": str,
    "data_kwargs": dict,
    "loss": str,
    "analyzers": list,
    "lr": (int, float),
    "optimizer": str,
    "momentum": (int, float),
    "batch_size": int,
    "weight_decay": (int, float),
    "max_samples": int,
    "seed": int,
    "device": str,
    "dtype": str,
    "forward_dtype": str,
    "model_mode": str,
    "lanczos_iters": int,
    "lanczos_tol": (int, float),
    "top_k": int,
    "hvp_method": str,
    "trace_method": str,
    "trace_probes": int,
    "trace_rel_stderr": (int, float),
    "trace_max_probes": int,
    "density_probes": int,
    "density_steps": int,
    "per_layer": bool,
    "per_example_method": str,
    "memory_budget": (int, str),
    "opposing_candidates": int,
    "opposing_groups": int,
    "lmc_points": int,
    "bn_reset": bool,
    "lmc_layers": bool,
    "align": str,
    "lmc_consecutive": bool,
    "feature_layer": str,
    "loss_dtype": str,
    "weight_set": str,
    "gates": dict,
    "strict": bool,
    "baseline": str,
    "baseline_tolerance": (int, float),
    "baseline_tolerances": dict,
}


@dataclass(frozen=True)
class FileConfig:
    """Settings read from a config file, with the folder its relative specs refer to."""

    values: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def base_dir(self) -> Path | None:
        return self.path.parent if self.path else None

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def resolve_path(self, value: str) -> Path:
        """Resolve a path from the file: a relative one is taken from the file's folder."""
        path = Path(value)
        return path if path.is_absolute() or self.base_dir is None else self.base_dir / path


def load_config(explicit: Path | None, cwd: Path | None = None) -> FileConfig:
    """Read the explicit config file, else ./stabcheck.toml, else [tool.stabcheck] in ./pyproject.toml."""
    cwd = cwd or Path.cwd()
    if explicit is not None:
        if not explicit.is_file():
            raise UsageError(f"--config {explicit}: file not found.")
        table = _read_toml(explicit)
        if explicit.name == "pyproject.toml":
            table = table.get("tool", {}).get("stabcheck", {})
        return FileConfig(_validate(table, explicit), explicit.resolve())
    default = cwd / "stabcheck.toml"
    if default.is_file():
        return FileConfig(_validate(_read_toml(default), default), default.resolve())
    pyproject = cwd / "pyproject.toml"
    if pyproject.is_file():
        table = _read_toml(pyproject).get("tool", {}).get("stabcheck")
        if table is not None:
            return FileConfig(_validate(table, pyproject), pyproject.resolve())
    return FileConfig()


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"config file {path} is not valid TOML: {error}.") from None
    except OSError as error:
        raise UsageError(f"config file {path} cannot be read: {error}.") from None


def _validate(table: dict[str, Any], path: Path) -> dict[str, Any]:
    unknown = sorted(set(table) - set(KNOWN_KEYS))
    if unknown:
        raise UsageError(
            f"config file {path} has unknown keys {', '.join(unknown)}; valid keys: {', '.join(sorted(KNOWN_KEYS))}."
        )
    for key, value in table.items():
        expected = KNOWN_KEYS[key]
        # bool is a subclass of int, so `lr = true` would pass an int check without this.
        if (isinstance(value, bool) and expected is not bool) or not isinstance(value, expected):
            names = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
            raise UsageError(f"config file {path}: {key} must be {names}, got {value!r}.")
    return dict(table)
