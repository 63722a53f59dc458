"""Reading checkpoint files: formats, weight sets, prefixes, optimizer state and hashing.

A checkpoint is read once into memory, hashed, and parsed from that copy, so the file on disk is
never opened for writing. Torch files load with ``weights_only=True``; full unpickling, which can
run code stored in the file, happens only when the caller passes ``trust=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stabcheck.errors import CheckpointError

# Keys under which a dict checkpoint stores the model weights, in the order they are tried.
MAIN_WEIGHT_KEYS = ("state_dict", "model_state_dict", "model")
OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer", "optim", "optimizer_states")
STEP_KEYS = ("step", "global_step", "iteration", "iter")
# Wrapper prefixes: DataParallel/DDP, torch.compile, and LightningModule attributes.
KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.")
MAX_LISTED_KEYS = 20


@dataclass
class Checkpoint:
    """A checkpoint read into memory, before it is matched against a model."""

    path: Path
    sha256: str
    format: str
    weights: dict[str, torch.Tensor]
    weight_set: str
    available_weight_sets: list[str]
    optimizer_state: dict[str, Any] | None
    step: int | None
    notes: list[str] = field(default_factory=list)
    batch_size: int | None = None


@dataclass
class MatchedWeights:
    """Checkpoint weights renamed to the model's state_dict keys."""

    state_dict: dict[str, torch.Tensor]
    stripped_prefix: str | None


def sha256_of_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_checkpoint(path: str | Path, *, trust: bool = False, weight_set: str | None = None) -> Checkpoint:
    """Read a checkpoint file and pick its weight set, optimizer state and step.

    ``weight_set`` names a key (dotted for nested dicts, e.g. ``ema.state_dict``) that contains an
    alternative set of weights such as an EMA copy. By default the main weights are used.
    Raises CheckpointError for unreadable, corrupt or unsafe files.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}. Check the path.")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a directory; pass the checkpoint files inside it.")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    if not data:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes). Re-save or re-copy the file.")
    digest = sha256_of_bytes(data)

    if _looks_like_safetensors(path, data):
        if weight_set not in (None, "<root>"):
            raise CheckpointError(
                f"checkpoint {path} is a safetensors file with one weight set; --weight-set "
                f"{weight_set!r} does not apply. Drop the option."
            )
        weights, step = _load_safetensors(path, data)
        return Checkpoint(path, digest, "safetensors", weights, "<root>", ["<root>"], None, step)

    obj = _torch_load(path, data, trust=trust)
    return _parse_torch_object(path, digest, obj, weight_set)


def _looks_like_safetensors(path: Path, data: bytes) -> bool:
    if path.suffix == ".safetensors":
        return True
    if len(data) < 10 or data[:2] == b"PK":
        return False
    (header_length,) = struct.unpack("<Q", data[:8])
    return 0 < header_length <= len(data) - 8 and data[8:9] == b"{"


def _load_safetensors(path: Path, data: bytes) -> tuple[dict[str, torch.Tensor], int | None]:
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        weights = load_safetensors(data)
        (header_length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_length])
    except (SafetensorError, ValueError, struct.error) as error:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (safetensors): {error}") from error
    metadata = header.get("__metadata__") or {}
    step = None
    for key in STEP_KEYS:
        if key in metadata:
            try:
                step = int(metadata[key])
            except ValueError:
                pass
            break
    return weights, step


def _torch_load(path: Path, data: bytes, *, trust: bool) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not trust:
            blocking = _unsafe_globals(data, error)
            names = ", ".join(blocking) if blocking else "an object outside the weights-only allowlist"
            raise CheckpointError(
                f"checkpoint {path} needs full unpickling to load {names}, which can run code stored "
                "in the file. Re-save it as a plain state_dict, or pass --trust-checkpoint if you "
                "trust where the file came from."
            ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt, or not a torch checkpoint: torch.load failed "
            f"with {_first_line(error)}. Re-copy or re-save the file."
        ) from None

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any failure of a trusted unpickle is reported as-is
        raise CheckpointError(f"checkpoint {path} failed to load with full unpickling: {error!r}") from None


def _unsafe_globals(data: bytes, error: Exception) -> list[str]:
    """List the classes that weights-only loading rejected, without unpickling them."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is not None:
        try:
            return list(finder(io.BytesIO(data)))
        except Exception:  # noqa: BLE001 - fall back to the error text below
            pass
    return re.findall(r"GLOBAL ([\w.]+)", str(error))


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    if not text:
        return type(error).__name__
    # Some loaders raise bare values (torch.load raises KeyError(101) on a text file).
    return f"{type(error).__name__}: {text.splitlines()[0]}"


def _is_tensor_mapping(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(key, str) for key in value)
        and all(isinstance(item, torch.Tensor) for item in value.values())
    )


def _as_weights(value: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(value, torch.nn.Module):
        return dict(value.state_dict())
    if _is_tensor_mapping(value):
        return dict(value)
    return None


def _find_weight_sets(obj: Mapping, prefix: str = "") -> list[str]:
    names = []
    for key, value in obj.items():
        if not isinstance(key, str):
            continue
        name = f"{prefix}{key}"
        if _as_weights(value) is not None:
            names.append(name)
        elif isinstance(value, Mapping) and not prefix and key not in OPTIMIZER_KEYS:
            names.extend(_find_weight_sets(value, prefix=f"{name}."))
    return names


def _lookup(obj: Mapping, dotted: str) -> Any:
    value: Any = obj
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _parse_torch_object(path: Path, digest: str, obj: Any, weight_set: str | None) -> Checkpoint:
    weights = _as_weights(obj)
    if weights is not None:
        if weight_set not in (None, "<root>"):
            raise CheckpointError(
                f"checkpoint {path} is a plain state_dict with one weight set; --weight-set "
                f"{weight_set!r} does not apply. Drop the option."
            )
        fmt = "module" if isinstance(obj, torch.nn.Module) else "state_dict"
        return Checkpoint(path, digest, fmt, weights, "<root>", ["<root>"], None, None)

    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint {path} contains a {type(obj).__name__}, not a state_dict or a dict containing "
            "one. Save model.state_dict() (optionally inside a dict with the optimizer state)."
        )

    available = _find_weight_sets(obj)
    if not available:
        raise CheckpointError(
            f"checkpoint {path} has no mapping of parameter names to tensors; its top-level keys are "
            f"{_list_keys(obj)}. Save model.state_dict() under 'state_dict', 'model_state_dict' or 'model'."
        )

    is_lightning = "pytorch-lightning_version" in obj or "lightning_version" in obj
    if weight_set is None:
        chosen = next((key for key in MAIN_WEIGHT_KEYS if key in available), None)
        if chosen is None:
            if len(available) == 1:
                chosen = available[0]
            else:
                raise CheckpointError(
                    f"checkpoint {path} contains several weight sets ({', '.join(available)}) and none "
                    "is a main one ('state_dict', 'model_state_dict', 'model'). Choose one with --weight-set."
                )
    else:
        if weight_set not in available:
            raise CheckpointError(
                f"weight set {weight_set!r} not found in checkpoint {path}; available: {', '.join(available)}."
            )
        chosen = weight_set
    weights = _as_weights(_lookup(obj, chosen))
    assert weights is not None

    fmt = "lightning" if is_lightning else f"dict[{chosen}]"
    notes = []
    others = [name for name in available if name != chosen]
    if others:
        notes.append(f"weights taken from {chosen!r}; other weight sets in the file: {', '.join(others)}")

    return Checkpoint(
        path=path,
        sha256=digest,
        format=fmt,
        weights=weights,
        weight_set=chosen,
        available_weight_sets=available,
        optimizer_state=_find_optimizer_state(obj),
        step=_find_step(obj, is_lightning),
        notes=notes,
        batch_size=_find_batch_size(obj),
    )


def _find_optimizer_state(obj: Mapping) -> dict[str, Any] | None:
    for key in OPTIMIZER_KEYS:
        value = obj.get(key)
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], Mapping):
            value = value[0]  # Lightning keeps one state per optimizer; the first one drives training
        if isinstance(value, torch.optim.Optimizer):
            value = value.state_dict()
        if isinstance(value, Mapping) and "param_groups" in value:
            return dict(value)
    return None


def _find_step(obj: Mapping, is_lightning: bool) -> int | None:
    keys = ("global_step",) + STEP_KEYS if is_lightning else STEP_KEYS
    for key in keys:
        value = obj.get(key)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return int(value)
    return None


def _find_batch_size(obj: Mapping) -> int | None:
    """Read a training batch size saved beside the weights (top level, or Lightning's hyper_parameters)."""
    for container in (obj, obj.get("hyper_parameters"), obj.get("hparams"), obj.get("config")):
        if isinstance(container, Mapping):
            value = container.get("batch_size")
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _list_keys(keys: Any) -> str:
    keys = [str(key) for key in keys]
    listed = ", ".join(keys[:MAX_LISTED_KEYS])
    if len(keys) > MAX_LISTED_KEYS:
        listed += f", ... ({len(keys) - MAX_LISTED_KEYS} more)"
    return listed


def match_weights(checkpoint: Checkpoint, model: torch.nn.Module) -> MatchedWeights:
    """Rename the checkpoint's weights to the model's state_dict keys and check them strictly.

    Wrapper prefixes (``module.``, ``_orig_mod.``, ``model.``, in any nesting) are stripped when
    that makes the keys match. Missing or unexpected keys, shape mismatches and non-finite values
    raise CheckpointError listing them; loading is never silently non-strict.
    """
    expected = model.state_dict()
    weights = checkpoint.weights
    stripped = ""
    while set(weights) != set(expected):
        prefix = next(
            (p for p in KNOWN_PREFIXES if weights and all(key.startswith(p) for key in weights)),
            None,
        )
        if prefix is None:
            break
        weights = {key[len(prefix) :]: value for key, value in weights.items()}
        stripped += prefix
    if set(weights) != set(expected) and stripped:
        # The prefixes did not explain the mismatch: report keys as they are in the file.
        weights, stripped = checkpoint.weights, ""

    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys (in the model, not in the checkpoint): {_list_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys (in the checkpoint, not in the model): {_list_keys(unexpected)}")
        raise CheckpointError(
            f"checkpoint {checkpoint.path} (weight set {checkpoint.weight_set!r}) does not match the "
            f"model: {'; '.join(parts)}. Check --model and --model-kwargs build the architecture "
            "that was saved."
        )

    mismatched = [
        f"{key} {tuple(weights[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if tuple(weights[key].shape) != tuple(expected[key].shape)
    ]
    if mismatched:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} has tensors whose shapes differ from the model: "
            f"{_list_keys(mismatched)}. Check --model-kwargs (layer sizes) against the saved run."
        )

    non_finite = [
        key
        for key, value in weights.items()
        if value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]
    if non_finite:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} has non-finite values (NaN or inf) in: {_list_keys(non_finite)}. "
            "The run diverged before this checkpoint; analyze an earlier one."
        )
    return MatchedWeights({key: weights[key] for key in expected}, stripped or None)


def weights_sha256(module: torch.nn.Module) -> str:
    """Return the SHA-256 of a module's state_dict (names, dtypes, shapes and bytes) in name order.

    An in-memory model has no file to hash, so the report records this hash of its weights instead.
    Two modules with bit-identical state_dicts give the same hash.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
