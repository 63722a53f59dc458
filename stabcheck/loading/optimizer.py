"""Training settings from a checkpoint's optimizer state, merged with command-line overrides."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from stabcheck.errors import UsageError

OPTIMIZER_KINDS = ("sgd", "momentum", "adam", "adamw")


@dataclass(frozen=True)
class TrainingSettings:
    """Optimizer settings of the analyzed checkpoint that the thresholds and the objective need.

    ``weight_decay`` maps parameter names to the coupled L2 coefficient that the optimizer adds
    to the gradient (SGD and Adam). AdamW's decoupled decay is not part of the objective and is
    recorded in ``decoupled_weight_decay`` instead. ``unmapped_weight_decay`` lists the groups'
    differing coefficients when the state does not say which parameters each group contains.
    ``overridden`` names the fields that came from options instead of the checkpoint.
    """

    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    dampening: float = 0.0
    nesterov: bool = False
    betas: tuple[float, float] | None = None
    eps: float | None = None
    amsgrad: bool = False
    weight_decay: dict[str, float] = field(default_factory=dict)
    decoupled_weight_decay: float | None = None
    batch_size: int | None = None
    optimizer_step: int | None = None
    exp_avg_sq: dict[str, torch.Tensor] | None = None
    source: str | None = None
    overridden: tuple[str, ...] = ()
    unmapped_weight_decay: tuple[float, ...] | None = None
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        decays = sorted(set(self.weight_decay.values()))
        if self.unmapped_weight_decay is not None:
            weight_decay: Any = list(self.unmapped_weight_decay)
        elif self.decoupled_weight_decay is not None:
            weight_decay: Any = self.decoupled_weight_decay
        elif not decays:
            weight_decay = 0.0 if self.optimizer else None
        else:
            weight_decay = decays[0] if len(decays) == 1 else decays
        return {
            "optimizer": self.optimizer,
            "lr": self.lr,
            "momentum": self.momentum,
            "betas": list(self.betas) if self.betas else None,
            "weight_decay": weight_decay,
            "batch_size": self.batch_size,
            "source": self.source,
            "overridden": list(self.overridden),
        }


def settings_from_optimizer_state(
    state: Mapping[str, Any] | None, trainable: Mapping[str, torch.Tensor]
) -> TrainingSettings:
    """Read optimizer kind, hyperparameters and Adam's second moments from a torch optimizer state_dict.

    ``trainable`` maps the model's trainable parameter names to tensors in ``named_parameters``
    order. Without ``param_names`` in the state, the indices of a single param group are taken to
    follow that order, which holds when the optimizer was built from ``model.parameters()``, and
    shapes are checked. Several groups without ``param_names`` cannot be matched to parameters.
    """
    if not state:
        return TrainingSettings()
    groups = state.get("param_groups") or []
    if not groups:
        return TrainingSettings(notes=("optimizer state has no param_groups; pass --optimizer and --lr",))
    notes: list[str] = []
    first = groups[0]

    if "betas" in first:
        decoupled = bool(first.get("decoupled_weight_decay", False))
        kind = "adamw" if decoupled else "adam"
    elif "momentum" in first:
        kind = "momentum" if float(first.get("momentum") or 0.0) > 0 else "sgd"
    else:
        kind = None
        notes.append(
            f"optimizer with hyperparameters {sorted(k for k in first if k != 'params')} is not "
            "recognized (SGD, Adam and AdamW are); pass --optimizer and --lr"
        )

    lr = _same_across_groups(groups, "lr", notes)
    momentum = _same_across_groups(groups, "momentum", notes) if kind in ("sgd", "momentum") else None
    betas_value = _same_across_groups(groups, "betas", notes) if kind in ("adam", "adamw") else None
    betas = tuple(float(b) for b in betas_value) if betas_value is not None else None
    eps = _same_across_groups(groups, "eps", notes) if kind in ("adam", "adamw") else None

    names = _index_to_name(state, trainable, notes)
    decays = [float(group.get("weight_decay") or 0.0) for group in groups]
    weight_decay: dict[str, float] = {}
    decoupled_decay = None
    unmapped = None
    if kind == "adamw":
        decoupled_decay = _same_across_groups(groups, "weight_decay", notes)
    elif names is not None:
        for group, decay in zip(groups, decays):
            for index in group.get("params", []):
                if decay and index in names:
                    weight_decay[names[index]] = decay
    elif len(set(decays)) == 1 and _covers_all(state, trainable):
        weight_decay = {name: decays[0] for name in trainable if decays[0]}
    elif any(decays):
        unmapped = tuple(decays)

    optimizer_step = None
    exp_avg_sq = None
    if kind in ("adam", "adamw"):
        exp_avg_sq, optimizer_step = _second_moments(state, names, trainable, bool(first.get("amsgrad")), notes)

    return TrainingSettings(
        optimizer=kind,
        lr=float(lr) if lr is not None else None,
        momentum=float(momentum) if momentum is not None else None,
        dampening=float(first.get("dampening") or 0.0),
        nesterov=bool(first.get("nesterov", False)),
        betas=betas,  # type: ignore[arg-type]
        eps=float(eps) if eps is not None else None,
        amsgrad=bool(first.get("amsgrad", False)),
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_decay,
        optimizer_step=optimizer_step,
        exp_avg_sq=exp_avg_sq,
        source="checkpoint" if kind else None,
        unmapped_weight_decay=unmapped,
        notes=tuple(notes),
    )


def _covers_all(state: Mapping[str, Any], trainable: Mapping[str, torch.Tensor]) -> bool:
    count = sum(len(group.get("params", [])) for group in state["param_groups"])
    return count == len(trainable)


def _same_across_groups(groups: list[Mapping[str, Any]], key: str, notes: list[str]) -> Any:
    values = [group.get(key) for group in groups]
    values = [tuple(v) if isinstance(v, (list, tuple)) else v for v in values]
    values = [v.item() if isinstance(v, torch.Tensor) else v for v in values]
    if any(v != values[0] for v in values):
        note = f"param groups use different {key} values {values}"
        if key in ("lr", "momentum", "weight_decay"):
            note += f"; pass --{key.replace('_', '-')} to choose one"
        notes.append(note)
        return None
    return values[0]


def _index_to_name(
    state: Mapping[str, Any], trainable: Mapping[str, torch.Tensor], notes: list[str]
) -> dict[int, str] | None:
    names: dict[int, str] = {}
    for group in state["param_groups"]:
        indices = list(group.get("params", []))
        group_names = group.get("param_names")
        if group_names is not None and len(group_names) == len(indices):
            names.update(zip(indices, group_names))
    if names:
        if all(name in trainable for name in names.values()):
            return names
        notes.append("optimizer param_names do not match the model's parameter names")
        return None
    if len(state["param_groups"]) > 1:
        notes.append(
            f"the optimizer has {len(state['param_groups'])} param groups and its state has no "
            "param_names, so its per-parameter state cannot be matched to the model's parameters; "
            "build the optimizer from model.named_parameters() (PyTorch 2.6 and later save the names)"
        )
        return None
    ordered = list(trainable)
    indices = [index for group in state["param_groups"] for index in group.get("params", [])]
    if len(indices) != len(ordered):
        notes.append(
            f"optimizer state covers {len(indices)} parameters but the model has {len(ordered)} "
            "trainable ones; per-parameter optimizer state is not used"
        )
        return None
    return {index: ordered[position] for position, index in enumerate(indices)}


def _second_moments(
    state: Mapping[str, Any],
    names: dict[int, str] | None,
    trainable: Mapping[str, torch.Tensor],
    amsgrad: bool,
    notes: list[str],
) -> tuple[dict[str, torch.Tensor] | None, int | None]:
    per_param = state.get("state") or {}
    if names is None:
        return None, None
    if not per_param:
        # torch creates the per-parameter state at the first step, so an empty one means step 0.
        notes.append("the optimizer has no per-parameter state, so it has taken no step yet and Adam's exp_avg_sq does not exist")
        return None, 0
    key = "max_exp_avg_sq" if amsgrad else "exp_avg_sq"
    moments: dict[str, torch.Tensor] = {}
    steps = set()
    for index, name in names.items():
        entry = per_param.get(index)
        if entry is None or key not in entry:
            notes.append(f"optimizer state has no {key} for parameter {name!r}")
            return None, None
        moment = entry[key]
        if tuple(moment.shape) != tuple(trainable[name].shape):
            notes.append(
                f"{key} for {name!r} has shape {tuple(moment.shape)} but the parameter has "
                f"{tuple(trainable[name].shape)}; optimizer state does not follow model order"
            )
            return None, None
        moments[name] = moment
        step = entry.get("step")
        if step is not None:
            steps.add(int(step.item() if isinstance(step, torch.Tensor) else step))
    missing = [name for name in trainable if name not in moments]
    if missing:
        notes.append(f"optimizer state has no {key} for {', '.join(missing[:10])}")
        return None, None
    if len(steps) != 1:
        notes.append(f"Adam step counts differ across parameters ({sorted(steps)}); bias correction is ambiguous")
        return None, None
    return moments, steps.pop()


def apply_overrides(
    settings: TrainingSettings,
    *,
    optimizer: str | None = None,
    lr: float | None = None,
    momentum: float | None = None,
    batch_size: int | None = None,
    weight_decay: float | None = None,
    parameter_names: tuple[str, ...] = (),
) -> TrainingSettings:
    """Replace checkpoint values with those given as options; ``source`` becomes "options".

    ``weight_decay`` applies one coupled L2 coefficient to every parameter in ``parameter_names``
    (for AdamW it sets the decoupled decay, which is not part of the objective).
    """
    if optimizer is not None and optimizer not in OPTIMIZER_KINDS:
        raise UsageError(f"--optimizer {optimizer!r} is not supported; use one of {', '.join(OPTIMIZER_KINDS)}.")
    if lr is not None and not lr > 0:
        raise UsageError(f"--lr must be a positive number, got {lr}.")
    if momentum is not None and not 0 <= momentum < 1:
        raise UsageError(f"--momentum must be in [0, 1), got {momentum}.")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {batch_size}.")
    if weight_decay is not None and not weight_decay >= 0:
        raise UsageError(f"--weight-decay must be zero or positive, got {weight_decay}.")
    changes: dict[str, Any] = {}
    if optimizer is not None:
        changes["optimizer"] = optimizer
        if optimizer != settings.optimizer and optimizer in ("sgd", "momentum"):
            changes["exp_avg_sq"] = None
        if optimizer == "adamw" and settings.optimizer != "adamw":
            changes["weight_decay"] = {}
    if lr is not None:
        changes["lr"] = float(lr)
    if momentum is not None:
        changes["momentum"] = float(momentum)
        if optimizer is None and settings.optimizer in (None, "sgd"):
            changes["optimizer"] = "momentum" if momentum > 0 else "sgd"
    if batch_size is not None:
        changes["batch_size"] = int(batch_size)
    if weight_decay is not None:
        changes["unmapped_weight_decay"] = None
        if changes.get("optimizer", settings.optimizer) == "adamw":
            changes["decoupled_weight_decay"] = float(weight_decay)
            changes["weight_decay"] = {}
        else:
            changes["weight_decay"] = {name: float(weight_decay) for name in parameter_names if weight_decay}
    if not changes:
        return settings
    option_values = {"optimizer": optimizer, "lr": lr, "momentum": momentum, "batch_size": batch_size, "weight_decay": weight_decay}
    changes["overridden"] = tuple(key for key, value in option_values.items() if value is not None)
    if changes.get("optimizer", settings.optimizer) in ("adam", "adamw") and settings.betas is None:
        changes["betas"] = (0.9, 0.999)
        changes["eps"] = 1e-8
        changes["notes"] = settings.notes + ("Adam betas not in the checkpoint; PyTorch defaults (0.9, 0.999) assumed",)
    if changes.get("optimizer", settings.optimizer) == "momentum" and changes.get("momentum", settings.momentum) is None:
        raise UsageError("--optimizer momentum needs --momentum (the heavy-ball coefficient, e.g. 0.9).")
    if changes.get("optimizer", settings.optimizer) == "sgd" and "momentum" not in changes and settings.momentum is None:
        changes["momentum"] = 0.0
    changes["source"] = "options"
    return replace(settings, **changes)
