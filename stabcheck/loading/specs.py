"""Resolving "path/to/file.py:function" and "package.module:function" specs and calling them."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from stabcheck.errors import SpecError, UsageError


def resolve_callable(spec: str, *, role: str, base_dir: Path | None = None) -> Callable[..., Any]:
    """Import the function a spec names.

    ``role`` ("model", "data" or "loss") appears in error messages. A relative file path is looked
    up under ``base_dir`` (the config file's folder) first, then under the current directory.
    The file's folder is on ``sys.path`` while it is imported, so it can import its neighbours.
    """
    if ":" not in spec:
        builtins = " or a built-in loss (cross_entropy, mse)" if role == "loss" else ""
        raise SpecError(
            f"--{role} {spec!r} is not a spec: it has no ':function' part. Use path/to/file.py:function, "
            f"package.module:function{builtins}."
        )
    location, _, attribute = spec.rpartition(":")
    if not location or not attribute.isidentifier():
        raise SpecError(
            f"--{role} spec {spec!r} is invalid. Use path/to/file.py:function or package.module:function."
        )

    if location.endswith(".py") or "/" in location or "\\" in location:
        module = _import_file(_find_file(location, role=role, spec=spec, base_dir=base_dir), role=role)
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as error:
            hint = f" If {location!r} is a file, write {location}.py:{attribute}." if "." not in location else ""
            raise SpecError(f"--{role} spec {spec!r}: module {location!r} cannot be imported: {error}.{hint}") from None
        except Exception as error:  # noqa: BLE001 - user code at import time can raise anything
            raise SpecError(f"--{role} spec {spec!r}: importing {location!r} raised {error!r}.") from None

    if not hasattr(module, attribute):
        available = sorted(
            name for name, value in vars(module).items() if callable(value) and not name.startswith("_")
        )
        raise SpecError(
            f"--{role} spec {spec!r}: {location!r} has no attribute {attribute!r}. "
            f"Callables defined there: {', '.join(available) or 'none'}."
        )
    function = getattr(module, attribute)
    if not callable(function):
        raise SpecError(
            f"--{role} spec {spec!r}: {attribute!r} is of type {type(function).__name__}, not a function."
        )
    return function


def _find_file(location: str, *, role: str, spec: str, base_dir: Path | None) -> Path:
    path = Path(location).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [base_dir / path] if base_dir else []
        candidates.append(Path.cwd() / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise SpecError(f"--{role} spec {spec!r}: file not found (looked at {tried}).")


def _import_file(path: Path, *, role: str) -> Any:
    name = f"stabcheck_user_{role}_{path.stem}_{uuid.uuid4().hex[:8]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise SpecError(f"--{role} spec: {path} cannot be imported as a Python module.")
    module = importlib.util.module_from_spec(module_spec)
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - user code at import time can raise anything
        raise SpecError(f"--{role} spec: importing {path} raised {error!r}.") from None
    finally:
        if sys.path and sys.path[0] == folder:
            sys.path.pop(0)
    return module


def parse_kwargs(text: str | dict | None, *, option: str) -> dict[str, Any]:
    """Parse a JSON object given to --model-kwargs or --data-kwargs."""
    if text is None:
        return {}
    if isinstance(text, dict):
        return dict(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{option} {text!r} is not valid JSON ({error}). Example: '{{\"width\": 128}}'.") from None
    if not isinstance(value, dict):
        raise UsageError(f"{option} must be a JSON object such as '{{\"width\": 128}}', got {text!r}.")
    return value


def call_spec(function: Callable[..., Any], kwargs: dict[str, Any], *, role: str, spec: str) -> Any:
    try:
        return function(**kwargs)
    except TypeError as error:
        raise SpecError(f"--{role} spec {spec!r} cannot be called with {kwargs}: {error}.") from None
    except Exception as error:  # noqa: BLE001 - user code can raise anything
        raise SpecError(f"--{role} spec {spec!r} raised {error!r}.") from None


def build_model(spec: str, kwargs: dict[str, Any], *, base_dir: Path | None = None) -> torch.nn.Module:
    function = resolve_callable(spec, role="model", base_dir=base_dir)
    model = call_spec(function, kwargs, role="model", spec=spec)
    if not isinstance(model, torch.nn.Module):
        raise SpecError(
            f"--model spec {spec!r} returned {type(model).__name__}; expected a torch.nn.Module."
        )
    return model


def load_data_object(spec: str, kwargs: dict[str, Any], *, base_dir: Path | None = None) -> Any:
    function = resolve_callable(spec, role="data", base_dir=base_dir)
    return call_spec(function, kwargs, role="data", spec=spec)
