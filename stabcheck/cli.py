"""The ``stabcheck`` command line: parses options, sets up logging, maps outcomes to exit codes.

Exit codes: 0 every gate passed (warnings allowed), 1 a gate failed, 2 invalid usage or input,
3 inconclusive (an analyzer a gate depends on errored or did not converge).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from stabcheck import __version__
from stabcheck.errors import StabcheckError, UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Training-stability diagnostics for PyTorch checkpoints.",
)


class _SummaryConsole(Console):
    """A rich Console that keeps the gates' exit code when its reader goes away.

    rich's default exits with code 1 on a broken pipe (``stabcheck analyze ... | head``), which CI
    would read as a failed gate. The reports are already written by then, so this console stops
    printing and lets the run exit with its own code.
    """

    def on_broken_pipe(self) -> None:
        self.quiet = True
        os.dup2(os.open(os.devnull, os.O_WRONLY), self.file.fileno())


class OptimizerChoice(str, Enum):
    sgd = "sgd"
    momentum = "momentum"
    adam = "adam"
    adamw = "adamw"


class DeviceChoice(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class DtypeChoice(str, Enum):
    float32 = "float32"
    float64 = "float64"


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"stabcheck {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Training-stability diagnostics for PyTorch checkpoints."""


@app.command()
def analyze(
    ctx: typer.Context,
    checkpoints: Annotated[
        list[Path],
        typer.Argument(metavar="CHECKPOINT", help="Checkpoint files or directories of them; several form a trajectory ordered by stored step."),
    ],
    model: Annotated[Optional[str], typer.Option(help="Model spec: path/to/file.py:function or package.module:function returning an nn.Module.")] = None,
    model_kwargs: Annotated[Optional[str], typer.Option(help="JSON object of keyword arguments for the model function.")] = None,
    data: Annotated[Optional[str], typer.Option(help="Data spec returning a DataLoader, a Dataset, or a tuple (inputs, targets).")] = None,
    data_kwargs: Annotated[Optional[str], typer.Option(help="JSON object of keyword arguments for the data function.")] = None,
    loss: Annotated[Optional[str], typer.Option(help="cross_entropy, mse, or a spec returning per-example losses from (outputs, targets). Default: cross_entropy.")] = None,
    analyzers: Annotated[Optional[str], typer.Option(help="Comma-separated analyzer ids. Default: every analyzer whose needs are met.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate; overrides the checkpoint's optimizer state.")] = None,
    optimizer: Annotated[Optional[OptimizerChoice], typer.Option(help="Optimizer kind; overrides the checkpoint's optimizer state.")] = None,
    momentum: Annotated[Optional[float], typer.Option(help="Heavy-ball momentum coefficient in [0, 1); overrides the checkpoint.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Training batch size (examples per step); overrides the checkpoint.")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Coupled L2 weight decay w for every parameter, added to the objective as w/2*|theta|^2 (for AdamW: decoupled, not added); overrides the checkpoint.")] = None,
    lmc_with: Annotated[Optional[Path], typer.Option(help="Second endpoint checkpoint for the lmc analyzer.")] = None,
    lmc_consecutive: Annotated[bool, typer.Option("--lmc-consecutive", help="Run lmc between each checkpoint of a trajectory and the next one.")] = False,
    lmc_points: Annotated[Optional[int], typer.Option(help="Interpolation points from checkpoint A to B, both ends included (default 25).")] = None,
    no_bn_reset: Annotated[bool, typer.Option("--no-bn-reset", help="Keep the interpolated BatchNorm running statistics instead of re-estimating them at each point.")] = False,
    no_lmc_layers: Annotated[bool, typer.Option("--no-lmc-layers", help="Skip the per-module barriers (one interpolation curve per module).")] = False,
    loss_dtype: Annotated[Optional[str], typer.Option(help="Dtype the training loss runs in, which softmax-collapse's sc_fraction and its gate judge: float16, bfloat16, float32 (default) or float64.")] = None,
    feature_layer: Annotated[Optional[str], typer.Option(help="Module path of the classifier layer whose input is the penultimate feature for neural-collapse (default: the last Linear layer that produces the logits).")] = None,
    align: Annotated[Optional[str], typer.Option(help="Permutation alignment of B's hidden units before interpolation: none (default) or weight-matching.")] = None,
    max_samples: Annotated[Optional[int], typer.Option(help="Analyze the first N examples of the data (default: all).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for start vectors and probes (default 0).")] = None,
    device: Annotated[Optional[DeviceChoice], typer.Option(help="Device to run on (default cpu).")] = None,
    dtype: Annotated[Optional[DtypeChoice], typer.Option(help="Floating-point type of the analysis (default float32).")] = None,
    forward_dtype: Annotated[Optional[str], typer.Option(help="Mixed precision: run the model's forward pass in bfloat16 or float16 under torch.autocast while parameters, losses, gradients and Hessian-vector products stay in float32 (needs --dtype float32).")] = None,
    model_mode: Annotated[Optional[str], typer.Option(help="eval (default: BatchNorm running statistics, dropout off) or train-bn-batch-stats (BatchNorm on the statistics of the whole analysis set as one batch, dropout off).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="Config file. Default: ./stabcheck.toml, then the \\[tool.stabcheck] table of ./pyproject.toml.")] = None,
    json_path: Annotated[Optional[str], typer.Option("--json", help="Write the JSON report to this path; '-' writes it to stdout.")] = None,
    html: Annotated[Optional[Path], typer.Option(help="Write the self-contained HTML report to this path.")] = None,
    junit: Annotated[Optional[Path], typer.Option(help="Write JUnit XML (one test case per gate) to this path.")] = None,
    markdown: Annotated[Optional[Path], typer.Option(help="Write a Markdown summary to this path.")] = None,
    csv: Annotated[Optional[Path], typer.Option(help="Write every scalar metric per checkpoint (one row each) as CSV to this path.")] = None,
    trust_checkpoint: Annotated[bool, typer.Option("--trust-checkpoint", help="Allow full pickle loading, which runs code stored in the checkpoint.")] = False,
    weight_set: Annotated[Optional[str], typer.Option(help="Key of the weight set to analyze, e.g. an EMA copy such as 'ema' or 'ema.state_dict'.")] = None,
    lanczos_iters: Annotated[Optional[int], typer.Option(help="Maximum Lanczos steps, i.e. Hessian-vector products (default 100).")] = None,
    lanczos_tol: Annotated[Optional[float], typer.Option(help="Lanczos convergence tolerance: residual over the largest Ritz value (default 1e-4).")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="How many of the largest Hessian eigenvalues to report (default 3).")] = None,
    hvp_method: Annotated[Optional[str], typer.Option(help="Hessian-vector product method: retained (fastest) or recompute (bounded memory).")] = None,
    trace_method: Annotated[Optional[str], typer.Option(help="Trace estimator: hutchinson (default; stops at --trace-rel-stderr), deflated (Hutchinson on the Hessian less a Lanczos basis of its extreme eigenvectors; fewer products for tight targets) or hutch++ (a fixed budget of --trace-probes, else --trace-max-probes, products).")] = None,
    trace_probes: Annotated[Optional[int], typer.Option(help="Fixed number of trace probes (Hessian-vector products); default: draw until --trace-rel-stderr is reached.")] = None,
    trace_rel_stderr: Annotated[Optional[float], typer.Option(help="Relative standard error at which the trace estimate stops (default 0.05).")] = None,
    trace_max_probes: Annotated[Optional[int], typer.Option(help="Most trace probes to draw before the estimate is inconclusive (default 200).")] = None,
    density_probes: Annotated[Optional[int], typer.Option(help="Probes for the spectral density (default 3).")] = None,
    density_steps: Annotated[Optional[int], typer.Option(help="Lanczos steps per spectral-density probe (default 60).")] = None,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Also estimate lambda_max and the trace of each module's diagonal Hessian block (one Lanczos run and one trace estimate per module).")] = False,
    per_example_method: Annotated[Optional[str], typer.Option(help="Per-example gradients: auto (from layer inputs and output gradients where possible, vmap elsewhere), vmap, or loop (slowest, for checks).")] = None,
    memory_budget: Annotated[Optional[str], typer.Option(help="Memory each analyzer may allocate beside the model and data (gradient graphs, Lanczos and deflation bases, per-example statistics), e.g. 8GB or 512MiB (default: half of the free memory). An analyzer that cannot fit is skipped with its estimate.")] = None,
    opposing_candidates: Annotated[Optional[int], typer.Option(help="Examples with the largest gradient norms searched for opposing groups (default 128).")] = None,
    opposing_groups: Annotated[Optional[int], typer.Option(help="Most pairs of opposing groups to report (default 3; 0 skips the search).")] = None,
    gate: Annotated[Optional[list[str]], typer.Option(help="Fail the run when a metric passes a bound, e.g. 'sharpness.edge_ratio<=1.2' (fails above 1.2) or 'gradient-coherence.m_coherence>=1' (fails below 1); 'NAME=off' switches a gate off. Repeatable; replaces that metric's gate from the config file or the defaults.")] = None,
    gate_warn: Annotated[Optional[list[str]], typer.Option(help="Warn when a metric passes a bound, in the same form as --gate. Repeatable.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Count warnings as failures (exit code 1).")] = False,
    baseline: Annotated[Optional[Path], typer.Option(help="JSON report of an earlier run: fail when a metric got worse than there by more than the tolerance.")] = None,
    baseline_tolerance: Annotated[Optional[float], typer.Option(help="Relative change allowed against --baseline before a metric counts as a regression (default 0.1, i.e. 10%).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print no terminal summary or progress.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details to stderr.")] = False,
) -> None:
    """Analyze checkpoints and write terminal, JSON, HTML, JUnit or Markdown reports."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    json_to_stdout = json_path == "-"
    launch = _launch()
    # Under torchrun every rank computes, and rank 0 alone prints the summary and writes the reports.
    console = _SummaryConsole(stderr=json_to_stdout, quiet=quiet or launch.rank != 0)
    errors = Console(stderr=True)
    analyzed = False
    try:
        report = _run(
            checkpoints=checkpoints,
            options=dict(
                model=model, model_kwargs=model_kwargs, data=data, data_kwargs=data_kwargs, loss=loss,
                analyzers=analyzers, lr=lr, optimizer=optimizer.value if optimizer else None, momentum=momentum,
                batch_size=batch_size, weight_decay=weight_decay, max_samples=max_samples, seed=seed,
                device=device.value if device else None, dtype=dtype.value if dtype else None,
                forward_dtype=forward_dtype,
                weight_set=weight_set, lanczos_iters=lanczos_iters, lanczos_tol=lanczos_tol, top_k=top_k,
                hvp_method=hvp_method, trace_method=trace_method, trace_probes=trace_probes,
                trace_rel_stderr=trace_rel_stderr, trace_max_probes=trace_max_probes,
                density_probes=density_probes, density_steps=density_steps,
                per_layer=per_layer or None, per_example_method=per_example_method,
                memory_budget=memory_budget, opposing_candidates=opposing_candidates,
                opposing_groups=opposing_groups, model_mode=model_mode, lmc_points=lmc_points,
                bn_reset=False if no_bn_reset else None, align=align, lmc_layers=False if no_lmc_layers else None,
                lmc_consecutive=lmc_consecutive or None, feature_layer=feature_layer, loss_dtype=loss_dtype,
            ),
            config_path=config,
            lmc_with=lmc_with,
            trust_checkpoint=trust_checkpoint,
            console=console,
            context=ctx,
            gate_options=(gate or [], gate_warn or []),
            strict=strict,
            baseline=baseline,
            baseline_tolerance=baseline_tolerance,
            launch=launch,
        )
        analyzed = True
        if launch.rank == 0:
            _write_outputs(report, json_path=json_path, html=html, junit=junit, markdown=markdown, csv=csv)
    except StabcheckError as error:
        # Errors that every rank meets alike are printed once; a rank's own failure by that rank.
        if launch.rank == 0 or getattr(error, "rank_specific", False):
            errors.print(f"[bold red]error:[/bold red] {error}", highlight=False, soft_wrap=True)
        # After the analysis only rank 0 can fail (writing the reports), and the others follow it.
        code = _agreed_exit_code(error.exit_code) if analyzed else error.exit_code
        raise typer.Exit(code=code) from None

    from stabcheck.report.terminal import render_terminal

    render_terminal(report, console)
    raise typer.Exit(code=_agreed_exit_code(report.exit_code))


def _run(
    *, checkpoints: list[Path], options: dict[str, Any], config_path: Path | None, lmc_with: Path | None,
    trust_checkpoint: bool, console: Console, context: typer.Context, gate_options: tuple[list[str], list[str]], strict: bool,
    baseline: Path | None, baseline_tolerance: float | None, launch: Any = None,
):
    # Heavy imports happen here so that --help and --version stay fast.
    from stabcheck.analyzers.base import EstimatorSettings
    from stabcheck.api import analyze as run_analysis
    from stabcheck.baseline import load_baseline
    from stabcheck.config import load_config
    from stabcheck.engine.objective import BUILTIN_LOSSES
    from stabcheck.gates import gates_from_options, merge_gate_tables, parse_gates
    from stabcheck.loading.specs import build_model, load_data_object, parse_kwargs, resolve_callable

    file_config = load_config(config_path)
    # Gates and the baseline are checked before any model or data is built, so a typo in a
    # gate name costs nothing.
    if file_config.get("gates"):
        try:
            parse_gates(file_config.get("gates"))
        except UsageError as error:
            raise UsageError(f"config file {file_config.path}: {error}") from None
    gates = merge_gate_tables(file_config.get("gates"), gates_from_options(*gate_options))
    parse_gates(gates)
    baseline_path = baseline
    if baseline_path is None and file_config.get("baseline") is not None:
        baseline_path = file_config.resolve_path(file_config.get("baseline"))
    loaded_baseline = None
    if baseline_path is not None:
        loaded_baseline = load_baseline(
            baseline_path,
            tolerance=baseline_tolerance if baseline_tolerance is not None else file_config.get("baseline_tolerance"),
            tolerances=file_config.get("baseline_tolerances"),
            tolerances_source=f"config file {file_config.path}" if file_config.path else None,
        )

    def setting(key: str, default: Any = None) -> Any:
        value = options.get(key)
        return value if value is not None else file_config.get(key, default)

    # A spec given on the command line is relative to the current directory; one from the config
    # file is relative to the file's folder.
    def spec_base(key: str) -> Path | None:
        return None if options.get(key) is not None else file_config.base_dir

    model_spec, data_spec = setting("model"), setting("data")
    if model_spec is None:
        raise UsageError("no model spec: pass --model path/to/file.py:function (or set 'model' in stabcheck.toml).")
    if data_spec is None:
        raise UsageError("no data spec: pass --data path/to/file.py:function (or set 'data' in stabcheck.toml).")

    analyzer_ids = setting("analyzers")
    if isinstance(analyzer_ids, str):
        analyzer_ids = [part.strip() for part in analyzer_ids.split(",") if part.strip()]

    model_kwargs = parse_kwargs(setting("model_kwargs"), option="--model-kwargs")
    data_kwargs = parse_kwargs(setting("data_kwargs"), option="--data-kwargs")
    model_object = build_model(model_spec, model_kwargs, base_dir=spec_base("model"))
    data_object = load_data_object(data_spec, data_kwargs, base_dir=spec_base("data"))

    loss_setting = setting("loss", "cross_entropy")
    loss: Any = loss_setting
    if loss_setting not in BUILTIN_LOSSES:
        loss = resolve_callable(loss_setting, role="loss", base_dir=spec_base("loss"))

    defaults = EstimatorSettings()
    estimator = EstimatorSettings(
        lanczos_max_iter=setting("lanczos_iters", defaults.lanczos_max_iter),
        # A half-precision forward makes products noisy at about 1e-3, so the float32 default
        # tolerance could never be met. A looser one is the default there.
        lanczos_tol=float(setting("lanczos_tol", HALF_PRECISION_LANCZOS_TOL if setting("forward_dtype") else defaults.lanczos_tol)),
        top_k=setting("top_k", defaults.top_k),
        hvp_method=setting("hvp_method", defaults.hvp_method),
        trace_method=setting("trace_method", defaults.trace_method),
        trace_probes=setting("trace_probes", defaults.trace_probes),
        trace_rel_stderr=float(setting("trace_rel_stderr", defaults.trace_rel_stderr)),
        trace_max_probes=setting("trace_max_probes", defaults.trace_max_probes),
        density_probes=setting("density_probes", defaults.density_probes),
        density_steps=setting("density_steps", defaults.density_steps),
        per_layer=bool(setting("per_layer", defaults.per_layer)),
        per_example_method=setting("per_example_method", defaults.per_example_method),
        memory_budget=_memory_budget(setting("memory_budget")),
        opposing_candidates=setting("opposing_candidates", defaults.opposing_candidates),
        opposing_groups=setting("opposing_groups", defaults.opposing_groups),
        lmc_points=setting("lmc_points", defaults.lmc_points),
        bn_reset=bool(setting("bn_reset", defaults.bn_reset)),
        align=setting("align", defaults.align),
        lmc_layers=bool(setting("lmc_layers", defaults.lmc_layers)),
        feature_layer=setting("feature_layer", defaults.feature_layer),
        loss_dtype=setting("loss_dtype", defaults.loss_dtype),
    )
    from stabcheck.engine.distributed import connect

    # The process group is joined after every option and spec has been checked, which every rank
    # does alike, so a bad option stops all ranks before any of them waits for the others.
    group = None if launch is None else connect(launch, setting("device", "cpu"))
    with _progress(console) as progress:
        return run_analysis(
            model_object,
            data_object,
            checkpoints=checkpoints,
            loss=loss,
            analyzers=analyzer_ids,
            optimizer=setting("optimizer"),
            lr=setting("lr"),
            momentum=setting("momentum"),
            batch_size=setting("batch_size"),
            weight_decay=setting("weight_decay"),
            max_samples=setting("max_samples"),
            seed=setting("seed", 0),
            device=setting("device", "cpu"),
            dtype=setting("dtype", "float32"),
            forward_dtype=setting("forward_dtype"),
            model_mode=setting("model_mode", "eval"),
            estimator=estimator,
            gates=gates,
            strict=strict or bool(file_config.get("strict", False)),
            baseline=loaded_baseline,
            distributed=group,
            trust_checkpoint=trust_checkpoint,
            weight_set=setting("weight_set"),
            lmc_with=lmc_with,
            lmc_consecutive=bool(setting("lmc_consecutive", False)),
            progress=progress,
            provenance={
                "command": _command_line(context),
                "model_spec": model_spec,
                "model_kwargs": model_kwargs,
                "data_spec": data_spec,
                "data_kwargs": data_kwargs,
                "loss_spec": loss_setting,
                "config": str(file_config.path) if file_config.path else None,
            },
        )


def _command_line(context: typer.Context) -> list[str]:
    """Return the command as typed when stabcheck runs as a program, else as parsed.

    Under ``main()`` sys.argv contains the command. A host program that calls the app itself (a test
    runner, another tool) has its own sys.argv, so the command is rebuilt from the parsed options.
    """
    if _ENTRY_POINT_ARGV is not None:
        return ["stabcheck", *_ENTRY_POINT_ARGV]
    words = ["stabcheck", context.info_name or "analyze"]
    for parameter in context.command.params:
        value = context.params.get(parameter.name)
        if value is None or value is False or value == [] or value == parameter.default:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if parameter.param_type_name == "argument":
            words.extend(str(item) for item in values)
        elif value is True:
            words.append(parameter.opts[0])
        else:
            for item in values:
                words.extend([parameter.opts[0], str(item.value if isinstance(item, Enum) else item)])
    return words


def _launch() -> Any:
    """Return the rank layout that torchrun set in the environment (rank 0 of 1 without it)."""
    from stabcheck.engine.distributed import launch_from_environment

    try:
        return launch_from_environment()
    except ValueError as error:
        typer.echo(f"error: {error}; launch several processes with torchrun, which sets these variables.", err=True)
        raise typer.Exit(code=2) from None


def _agreed_exit_code(code: int) -> int:
    """Return the exit code of this rank once the ranks agree, and leave the process group.

    Rank 0 exits with the run's code. The other ranks exit with 0 after agreeing, because
    torchrun stops every rank as soon as one exits with another code, which could cut rank 0
    short. torchrun itself exits with 1 for any failing rank, whatever its code.
    """
    from stabcheck.engine.distributed import agree_with_rank0, disconnect

    code = agree_with_rank0(code)
    rank = _launch().rank
    disconnect()
    return code if rank == 0 else 0


# Default Lanczos tolerance with --forward-dtype: residual over the largest Ritz value.
HALF_PRECISION_LANCZOS_TOL = 1e-2


def _memory_budget(value: Any) -> int | None:
    from stabcheck.engine.memory import parse_size

    if value is None or isinstance(value, int):
        return value
    try:
        return parse_size(str(value))
    except ValueError as error:
        raise UsageError(f"--memory-budget {value!r} is invalid: {error}.") from None


class _progress:
    """A rich progress bar per Lanczos run, shown only on an interactive terminal."""

    def __init__(self, console: Console) -> None:
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} HVPs  rel. residual {task.fields[residual]:.1e}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal or console.quiet,
        )

    def __enter__(self) -> Callable[[str], Callable[[int, int, float], None]]:
        self.bar.__enter__()

        def factory(label: str) -> Callable[[int, int, float], None]:
            task = self.bar.add_task(label, total=None, residual=float("nan"))

            def update(step: int, total: int, residual: float) -> None:
                self.bar.update(task, completed=step, total=total, residual=residual)

            return update

        return factory

    def __exit__(self, *exc_info: Any) -> None:
        self.bar.__exit__(*exc_info)


def _write_outputs(
    report, *, json_path: str | None, html: Path | None, junit: Path | None, markdown: Path | None, csv: Path | None
) -> None:
    from stabcheck.report.files import write_reports

    write_reports(
        report,
        json=None if json_path in (None, "-") else Path(json_path),
        html=html, junit=junit, markdown=markdown, csv=csv,
        json_to_stdout=json_path == "-",
    )


# The arguments of the console command, set by main(); None when the app is called another way.
_ENTRY_POINT_ARGV: list[str] | None = None


def main() -> None:
    global _ENTRY_POINT_ARGV
    _ENTRY_POINT_ARGV = sys.argv[1:]
    app()


if __name__ == "__main__":
    main()
