"""Running the analyzers on a model and its checkpoints, from Python or from the command line.

:func:`analyze` is the one entry point: the CLI resolves specs and options and then calls it, so a
notebook gets the same :class:`~stabcheck.report.model.Report` that the CLI renders.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import platform
import socket
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from stabcheck import __version__
from stabcheck.analyzers.base import (
    AnalysisContext,
    AnalyzerResult,
    EstimatorSettings,
    ProgressFactory,
)
from stabcheck.analyzers.registry import resolve_analyzers
from stabcheck.engine.distributed import SINGLE_PROCESS, SingleProcess
from stabcheck.engine.hvp import HVP_METHODS
from stabcheck.engine.memory import default_budget
from stabcheck.engine.objective import (
    MODEL_MODES,
    NonFiniteError,
    Objective,
    kernel_notes,
    PerExampleLoss,
    builtin_loss,
)
from stabcheck.engine.per_example import METHODS as PER_EXAMPLE_METHODS
from stabcheck.engine.trace import MIN_SEQUENTIAL_PROBES, TRACE_METHODS
from stabcheck.errors import AnalyzerFailed, CheckpointError, StabcheckError, UsageError
from stabcheck.baseline import Baseline, compare_with_baseline, load_baseline, match_checkpoints
from stabcheck.gates import EXIT_FAIL, evaluate_gates, exit_code_for, parse_gates
from stabcheck.loading.checkpoint import Checkpoint, load_checkpoint, match_weights, weights_sha256
from stabcheck.loading.data import AnalysisSet, materialize
from stabcheck.loading.optimizer import (
    TrainingSettings,
    apply_overrides,
    settings_from_optimizer_state,
)
from stabcheck.report.model import Report

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def expand_checkpoint_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Expand directories into the checkpoint files they contain, sorted by name."""
    expanded: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
            if not found:
                raise CheckpointError(
                    f"directory {path} contains no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)})."
                )
            expanded.extend(found)
        else:
            expanded.append(path)
    return expanded


def analyze(
    model: torch.nn.Module,
    data: Any,
    *,
    checkpoints: Sequence[str | Path] = (),
    loss: str | PerExampleLoss = "cross_entropy",
    analyzers: Sequence[str] | None = None,
    lr: float | None = None,
    optimizer: str | None = None,
    momentum: float | None = None,
    batch_size: int | None = None,
    weight_decay: float | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    model_mode: str = "eval",
    estimator: EstimatorSettings | None = None,
    gates: Mapping[str, Any] | None = None,
    trust_checkpoint: bool = False,
    weight_set: str | None = None,
    progress: ProgressFactory | None = None,
    provenance: Mapping[str, Any] | None = None,
    lmc_with: str | Path | None = None,
    lmc_consecutive: bool = False,
    step: int | None = None,
    optimizer_state: Mapping[str, Any] | None = None,
    strict: bool = False,
    baseline: str | Path | Baseline | None = None,
    distributed: SingleProcess | None = None,
    forward_dtype: str | None = None,
) -> Report:
    """Run the chosen analyzers on ``model`` at each checkpoint (or at its current weights).

    ``model`` is never modified: checkpoints load into a copy, and the analysis works on copies
    of its parameters and buffers. ``data`` is a DataLoader, a Dataset or an (inputs, targets)
    tuple; its first ``max_samples`` examples form the analysis set. ``lr``, ``optimizer``,
    ``momentum``, ``batch_size`` and ``weight_decay`` (coupled L2, added to the objective as
    weight_decay/2 * |theta|^2) override what the checkpoints' optimizer state records.
    ``model_mode`` is ``eval`` (BatchNorm running statistics) or ``train-bn-batch-stats``
    (BatchNorm statistics of the whole analysis set; dropout stays off).
    ``lmc_with`` names the second endpoint of the lmc analyzer for every checkpoint;
    ``lmc_consecutive`` pairs each checkpoint of a trajectory with the next one instead.
    ``step`` labels the in-memory model's training step when no checkpoint is given, and
    ``optimizer_state`` (a torch optimizer's ``state_dict()``) supplies its optimizer settings.
    ``gates``, ``strict`` and ``baseline`` (a previous JSON report's path, or a
    :class:`~stabcheck.baseline.Baseline` from :func:`~stabcheck.baseline.load_baseline` to set
    tolerances) are passed to :func:`judge`.
    ``forward_dtype`` (``bfloat16`` or ``float16``) runs the model's forward pass under
    ``torch.autocast`` in that dtype, while parameters, losses, gradients and Hessian-vector
    products stay in ``dtype``; an overflow is an error that names the module or parameters.
    ``distributed`` (from :func:`stabcheck.engine.distributed.connect`) splits the analysis set
    over the processes of a group. Every rank must call ``analyze`` with the same arguments,
    and every rank returns the same report.
    """
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    estimator = estimator or EstimatorSettings()
    validate_settings(estimator, device, dtype)
    validate_forward_dtype(forward_dtype, dtype)
    overrides = {
        "optimizer": optimizer,
        "lr": lr,
        "momentum": momentum,
        "batch_size": batch_size,
        "weight_decay": weight_decay,
    }
    chosen = resolve_analyzers(list(analyzers) if analyzers else None)
    validate_model_mode(model_mode, list(analyzers or ()))
    group = distributed or SINGLE_PROCESS
    if group.is_distributed and model_mode != "eval":
        raise UsageError(
            f"--model-mode {model_mode} is not supported with several processes: BatchNorm would need "
            "the batch statistics of every process's examples. Use --model-mode eval, or run one process."
        )
    checkpoint_paths = expand_checkpoint_paths(checkpoints)
    chosen = check_lmc_request(chosen, list(analyzers or ()), lmc_with, lmc_consecutive, len(checkpoint_paths))
    parse_gates(gates)  # reject a bad gate table or baseline before the analysis starts
    if baseline is not None and not isinstance(baseline, Baseline):
        baseline = load_baseline(baseline)
    provenance = dict(provenance or {})
    progress = progress or (lambda label: None)
    loss_fn = builtin_loss(loss) if isinstance(loss, str) else loss

    analysis_set = materialize(data, max_samples=max_samples, spec=provenance.get("data_spec", "data"))
    shard = analysis_set.shard(group.rank, group.world_size)
    memory_budget = estimator.memory_budget or default_budget(torch.device(device))
    run_notes: list[str] = []
    ordered, stored_steps = _order_checkpoints(checkpoint_paths, trust_checkpoint, weight_set, run_notes)
    if baseline is not None:
        _check_baseline_pairing(baseline, ordered, stored_steps, step, trust_checkpoint, weight_set)

    checkpoint_entries: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    settings_per_checkpoint: list[TrainingSettings] = []
    targets = ordered if ordered else [None]
    fixed_partner = None
    if lmc_with is not None:
        fixed_partner = _prepare_partner(model, Path(lmc_with), trust_checkpoint, weight_set)
    for index, path in enumerate(targets):
        analyzed_model, entry = _prepare_model(model, path, trust_checkpoint, weight_set)
        if path is None:
            entry["step"] = step
            entry["_optimizer_state"] = optimizer_state
        partner = fixed_partner
        if lmc_consecutive and index + 1 < len(targets):
            partner = _prepare_partner(model, targets[index + 1], trust_checkpoint, weight_set)
        trainable = {name: p for name, p in analyzed_model.named_parameters() if p.requires_grad}
        settings = settings_from_optimizer_state(entry.pop("_optimizer_state"), trainable)
        if path is None and settings.source == "checkpoint":
            # The settings came from a live optimizer passed with the in-memory model.
            settings = replace(settings, source="optimizer")
        if entry.get("_batch_size") is not None:
            settings = replace(settings, batch_size=entry["_batch_size"])
        entry.pop("_batch_size", None)
        settings = apply_overrides(settings, **overrides, parameter_names=tuple(trainable))
        if settings.unmapped_weight_decay is not None:
            raise CheckpointError(
                f"checkpoint {entry['path']}: the optimizer's param groups use weight decay "
                f"{list(settings.unmapped_weight_decay)}, but the state has no param_names, so which "
                "parameters each group contains is unknown and the training objective cannot be built. "
                "Pass --weight-decay to set one coupled decay for every parameter, or save the "
                "optimizer built from model.named_parameters()."
            )
        settings_per_checkpoint.append(settings)
        entry["training"] = settings.to_json()
        checkpoint_entries.append(entry)
        log.info("analyzing %s", entry["path"])
        results.append(
            {
                "checkpoint": index,
                "analyzers": _run_analyzers(
                    chosen, analyzed_model, shard, settings, estimator, seed, device, dtype, model_mode,
                    loss_fn, progress, memory_budget, partner,
                    "the last checkpoint of the trajectory has no next checkpoint to pair with" if lmc_consecutive else None,
                    group,
                    forward_dtype,
                ),
            }
        )

    first_settings = settings_per_checkpoint[0]
    report = Report(
        tool={"name": "stabcheck", "version": __version__},
        run={
            "command": provenance.get("command", []),
            "started_at": started,
            "seed": seed,
            "device": device,
            "dtype": dtype,
            "forward_dtype": forward_dtype,
            "torch_version": str(torch.__version__),
            "python_version": platform.python_version(),
            "host": socket.gethostname(),
            "platform": platform.platform(),
            "library_versions": _library_versions(),
            "config": provenance.get("config"),
            "memory_budget_bytes": memory_budget,
            "memory_budget_source": "option" if estimator.memory_budget else "half of the free memory",
            **group.to_json(),
        },
        checkpoints=checkpoint_entries,
        model={
            "spec": provenance.get("model_spec", type(model).__name__),
            "kwargs": provenance.get("model_kwargs", {}),
            "num_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "mode": model_mode,
        },
        data={
            "spec": provenance.get("data_spec", type(data).__name__),
            "kwargs": provenance.get("data_kwargs", {}),
            "num_samples": analysis_set.num_samples,
            "num_classes": analysis_set.num_classes,
            "source": analysis_set.source,
            "loss": loss if isinstance(loss, str) else provenance.get("loss_spec", getattr(loss, "__name__", "custom")),
        },
        training=first_settings.to_json(),
        estimator=estimator.to_json(),
        results=results,
        notes=run_notes
        + kernel_notes(model, torch.device(device))
        + [note for settings in settings_per_checkpoint[:1] for note in settings.notes],
    )
    return judge(report, gates=gates, strict=strict, baseline=baseline)


def judge(
    report: Report,
    *,
    gates: Mapping[str, Any] | None = None,
    strict: bool = False,
    baseline: str | Path | Baseline | None = None,
) -> Report:
    """Judge ``report.results`` against the gates (and a baseline report) and set the exit code.

    ``gates`` is a table such as ``{"sharpness.edge_ratio": {"warn": 0.9, "fail": 1.2}}`` merged
    over the defaults metric by metric; ``False`` for a metric switches its default gate off.
    ``strict`` counts warnings as failures. A regression against ``baseline`` fails the run like
    a failed gate. Returns a new report; the one passed in is not changed, so a trajectory can be
    judged again as it grows.
    """
    gate_table = parse_gates(gates)
    user_gates = frozenset(name for name, bounds in (gates or {}).items() if bounds is not False)
    findings = evaluate_gates(gate_table, [r["analyzers"] for r in report.results], user_gate_names=user_gates, strict=strict)
    exit_code = exit_code_for(findings)
    comparison = None
    if baseline is not None:
        if not isinstance(baseline, Baseline):
            baseline = load_baseline(baseline)
        comparison = compare_with_baseline(
            report.checkpoints, report.results, {"model": report.model, "data": report.data, "run": report.run}, baseline
        )
        if any(entry["status"] == "fail" for entry in comparison["comparisons"]):
            exit_code = EXIT_FAIL
    return replace(
        report,
        gates=[finding.to_json() for finding in findings],
        exit_code=exit_code,
        baseline=comparison,
        strict=strict,
    )


REPORTED_LIBRARIES = ("numpy", "scipy", "pandas", "matplotlib", "rich", "typer", "safetensors")


def _library_versions() -> dict[str, str]:
    """Versions of the libraries whose code shapes the numbers or the reports, for provenance."""
    from importlib import metadata

    versions = {}
    for name in REPORTED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def validate_settings(estimator: EstimatorSettings, device: str, dtype: str) -> None:
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}.")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"--device {device!r} is not supported; use cpu or cuda.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} was requested but torch reports no CUDA device; use --device cpu.")
    if estimator.hvp_method not in HVP_METHODS:
        raise UsageError(f"HVP method {estimator.hvp_method!r} is unknown; use one of {', '.join(HVP_METHODS)}.")
    if estimator.lanczos_max_iter < 2:
        raise UsageError(f"--lanczos-iters must be at least 2, got {estimator.lanczos_max_iter}.")
    if not 0 < estimator.lanczos_tol < 1:
        raise UsageError(f"--lanczos-tol must be between 0 and 1, got {estimator.lanczos_tol}.")
    if estimator.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {estimator.top_k}.")
    if estimator.trace_method not in TRACE_METHODS:
        raise UsageError(f"--trace-method {estimator.trace_method!r} is unknown; use hutchinson, hutch++ or deflated.")
    if estimator.trace_probes is not None and estimator.trace_probes < 3:
        raise UsageError(
            f"--trace-probes must be at least 3 (a standard error needs two samples, Hutch++ three "
            f"products), got {estimator.trace_probes}."
        )
    if not 0 < estimator.trace_rel_stderr < 1:
        raise UsageError(f"--trace-rel-stderr must be between 0 and 1, got {estimator.trace_rel_stderr}.")
    if estimator.trace_max_probes < MIN_SEQUENTIAL_PROBES:
        raise UsageError(
            f"--trace-max-probes must be at least {MIN_SEQUENTIAL_PROBES}, the fewest probes whose "
            f"standard error is trusted, got {estimator.trace_max_probes}."
        )
    if estimator.per_example_method not in PER_EXAMPLE_METHODS:
        raise UsageError(
            f"--per-example-method {estimator.per_example_method!r} is unknown; use one of "
            f"{', '.join(PER_EXAMPLE_METHODS)}."
        )
    if estimator.memory_budget is not None and estimator.memory_budget <= 0:
        raise UsageError(f"--memory-budget must be positive, got {estimator.memory_budget} bytes.")
    if estimator.opposing_candidates < 4 or estimator.opposing_groups < 0:
        raise UsageError(
            f"--opposing-candidates must be at least 4 and --opposing-groups at least 0, got "
            f"{estimator.opposing_candidates} and {estimator.opposing_groups}."
        )
    if estimator.loss_dtype not in ("float16", "bfloat16", "float32", "float64"):
        raise UsageError(f"--loss-dtype {estimator.loss_dtype!r} is unknown; use float16, bfloat16, float32 or float64.")
    if estimator.lmc_points < 3:
        raise UsageError(f"--lmc-points must be at least 3 (both ends and one point between), got {estimator.lmc_points}.")
    if estimator.align not in ("none", "weight-matching"):
        raise UsageError(f"--align {estimator.align!r} is unknown; use none or weight-matching.")
    if estimator.density_probes < 1 or estimator.density_steps < 2:
        raise UsageError(
            f"--density-probes must be at least 1 and --density-steps at least 2, got "
            f"{estimator.density_probes} and {estimator.density_steps}."
        )


FORWARD_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def validate_forward_dtype(forward_dtype: str | None, dtype: str) -> None:
    """Check a mixed-precision request: a half-precision forward over float32 parameters."""
    if forward_dtype is None:
        return
    if forward_dtype not in FORWARD_DTYPES:
        raise UsageError(f"--forward-dtype {forward_dtype!r} is unknown; use bfloat16 or float16.")
    if dtype != "float32":
        raise UsageError(
            f"--forward-dtype {forward_dtype} needs --dtype float32: autocast runs the forward in half "
            f"precision and accumulates in float32, and --dtype {dtype} would hide that."
        )


def validate_model_mode(model_mode: str, requested: list[str]) -> None:
    if model_mode not in MODEL_MODES:
        raise UsageError(f"--model-mode {model_mode!r} is unknown; use one of {', '.join(MODEL_MODES)}.")
    if model_mode != "eval" and "gradient-coherence" in requested:
        raise UsageError(
            "gradient-coherence cannot run with --model-mode train-bn-batch-stats: with BatchNorm on "
            "batch statistics, each example's output depends on the rest of the batch, so per-example "
            "gradients are undefined. Use --model-mode eval, or leave gradient-coherence out of --analyzers."
        )


def check_lmc_request(
    chosen: list, requested: list[str], lmc_with: str | Path | None, consecutive: bool, num_checkpoints: int
) -> list:
    """Drop lmc from the default analyzers when it has no second endpoint, and reject misuse."""
    if lmc_with is not None and consecutive:
        raise UsageError("pass either --lmc-with or --lmc-consecutive, not both.")
    if consecutive and num_checkpoints < 2:
        raise UsageError("--lmc-consecutive pairs each checkpoint with the next, so it needs at least two checkpoints.")
    if lmc_with is not None or consecutive:
        return chosen
    if "lmc" in requested:
        raise UsageError(
            "the lmc analyzer needs a second checkpoint: pass --lmc-with CHECKPOINT, or --lmc-consecutive "
            "with several checkpoints."
        )
    return [analyzer for analyzer in chosen if analyzer.id != "lmc"]


def _check_baseline_pairing(
    baseline: Baseline,
    paths: list[Path],
    stored_steps: list[int | None] | None,
    step: int | None,
    trust: bool,
    weight_set: str | None,
) -> None:
    """Raise before the analysis when the baseline's checkpoints cannot be paired with these.

    ``stored_steps`` are the steps that ordering the checkpoints already read, when it read them.
    """
    old = baseline.document.get("checkpoints") or []
    if not paths:
        entries = [{"step": step}]
    elif len(paths) == 1 and len(old) == 1:
        entries = [{"step": None}]
    elif stored_steps is not None:
        entries = [{"step": value} for value in stored_steps]
    else:
        entries = [{"step": load_checkpoint(path, trust=trust, weight_set=weight_set).step} for path in paths]
    match_checkpoints(entries, old, baseline.path)


def _prepare_partner(
    model: torch.nn.Module, path: Path, trust: bool, weight_set: str | None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load the lmc analyzer's second endpoint into a copy of the model."""
    partner, entry = _prepare_model(model, path, trust, weight_set)
    return partner, {key: entry[key] for key in ("path", "sha256", "format", "step", "weight_set")}


def _order_checkpoints(
    paths: list[Path], trust: bool, weight_set: str | None, notes: list[str]
) -> tuple[list[Path], list[int | None] | None]:
    """Sort checkpoints by stored training step, or keep the given order when any has no step.

    Returns the ordered paths and their stored steps, or None for the steps when a single
    checkpoint needed no reading.
    """
    if len(paths) <= 1:
        return paths, None
    steps = []
    for position, path in enumerate(paths):
        checkpoint = load_checkpoint(path, trust=trust, weight_set=weight_set)
        steps.append((checkpoint.step, position, path))
    without_step = [str(path) for step, _, path in steps if step is None]
    if without_step:
        notes.append(
            f"{len(without_step)} checkpoint(s) store no training step ({', '.join(without_step[:5])}), "
            "so the trajectory keeps the order in which the files were given"
        )
        return paths, [value for value, _, _ in steps]
    ordered = sorted(steps, key=lambda item: (item[0], item[1]))
    return [path for _, _, path in ordered], [value for value, _, _ in ordered]


def _prepare_model(
    model: torch.nn.Module, path: Path | None, trust: bool, weight_set: str | None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    if path is None:
        return model, {
            "path": None,
            "sha256": weights_sha256(model),
            "format": "in-memory",
            "step": None,
            "stripped_prefix": None,
            "weight_set": None,
            "_optimizer_state": None,
        }
    checkpoint: Checkpoint = load_checkpoint(path, trust=trust, weight_set=weight_set)
    matched = match_weights(checkpoint, model)
    copied = copy.deepcopy(model)
    copied.load_state_dict(matched.state_dict, strict=True)
    return copied, {
        "path": str(path),
        "sha256": checkpoint.sha256,
        "format": checkpoint.format,
        "step": checkpoint.step,
        "stripped_prefix": matched.stripped_prefix,
        "weight_set": checkpoint.weight_set,
        "notes": checkpoint.notes,
        "_optimizer_state": checkpoint.optimizer_state,
        "_batch_size": checkpoint.batch_size,
    }


def _run_analyzers(
    chosen: list,
    model: torch.nn.Module,
    analysis_set: AnalysisSet,
    settings: TrainingSettings,
    estimator: EstimatorSettings,
    seed: int,
    device: str,
    dtype: str,
    model_mode: str,
    loss_fn: PerExampleLoss,
    progress: ProgressFactory,
    memory_budget: int,
    partner: tuple[torch.nn.Module, dict[str, Any]] | None = None,
    partner_missing: str | None = None,
    group: SingleProcess = SINGLE_PROCESS,
    forward_dtype: str | None = None,
) -> dict[str, dict[str, Any]]:
    objective = Objective(
        model,
        analysis_set.inputs,
        analysis_set.targets,
        loss_fn,
        weight_decay=settings.weight_decay,
        dtype=DTYPES[dtype],
        device=device,
        mode=model_mode,
        group=group,
        forward_dtype=None if forward_dtype is None else FORWARD_DTYPES[forward_dtype],
    )
    context = AnalysisContext(
        model=model,
        objective=objective,
        data=analysis_set,
        training=settings,
        estimator=estimator,
        seed=seed,
        progress=progress,
        memory_budget=memory_budget,
        partner=None if partner is None else partner[0],
        partner_entry=None if partner is None else partner[1],
        partner_missing=partner_missing,
    )
    outcome: dict[str, dict[str, Any]] = {}
    try:
        for analyzer in chosen:
            reason = analyzer.skip_reason(context)
            if reason is not None:
                result = AnalyzerResult.skipped(reason)
            else:
                try:
                    result = analyzer.run(context)
                except StabcheckError:
                    raise
                except (RuntimeError, ValueError, ArithmeticError, MemoryError) as error:
                    if isinstance(error, NonFiniteError):
                        # The message names the module or parameters; a traceback adds nothing.
                        log.error("analyzer %s: %s", analyzer.id, error)
                    else:
                        log.exception("analyzer %s failed", analyzer.id)
                    if group.is_distributed:
                        # The other ranks may wait in a collective for this rank's share, so the
                        # run stops here; torchrun then stops the other ranks.
                        raise AnalyzerFailed(
                            f"analyzer {analyzer.id} failed on rank {group.rank} of {group.world_size} "
                            f"({type(error).__name__}: {error}). With several processes a failed analyzer "
                            "stops the run; run one process to get the other analyzers' results."
                        ) from error
                    result = AnalyzerResult(status="error", notes=(f"{type(error).__name__}: {error}",))
            outcome[analyzer.id] = {
                "status": result.status,
                "metrics": dict(result.metrics),
                "diagnostics": dict(result.diagnostics),
                "notes": list(result.notes),
            }
    finally:
        context.release()
    return outcome

