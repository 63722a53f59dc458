"""Time stabcheck's top Hessian eigenvalue against PyHessian's power iteration.

Run from the repository root:

    python benchmarks/bench_sharpness.py

The script measures two problems, both full batch on all 1797 images of scikit-learn's digits
with the mean squared error over all output elements:

``digits-mlp``
    The checkpoint with the highest step in ``fixtures/digits-mlp`` (64-128-128-10 tanh MLP,
    26,122 parameters).
``wide-mlp``
    A 64-1024-1024-10 tanh MLP (1,126,410 parameters), built from a fixed seed and trained here
    with 200 steps of full-batch gradient descent (by default), so it is not at its initialization.

For each problem it prints markdown tables with:

1. The reference top eigenvalue: stabcheck's Lanczos in float64, run to a residual tolerance
   of 1e-10 relative to the largest Ritz value.
2. stabcheck in float32 (retained HVPs) at a sweep of Lanczos tolerances, up to the first
   tolerance whose relative error against the reference is at most 1e-4 for every seed and at
   least to the CLI's default tolerance. Two more rows follow: the sharpness analyzer's own
   settings (top 3 and bottom 1 eigenvalues), and the first good tolerance again with numpy's
   BLAS limited to one thread.
3. PyHessian's ``hessian.eigenvalues`` in float32 at its default settings, then at tighter
   tolerances until its relative error is at most 1e-4 for every seed.
4. The cost of one HVP per method as a multiple of one full-batch gradient.

Wall times include building the operator. For stabcheck that is ``Objective`` and
``HessianOperator``, and for PyHessian the ``hessian`` constructor, which runs the first backward
pass. HVP counts for PyHessian come from a counting wrapper around
``pyhessian.hessian.hessian_vector_product``, the name that PyHessian's ``eigenvalues`` calls.
The wrapper only counts and forwards the call.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn

from stabcheck.analyzers.base import EstimatorSettings
from stabcheck.engine.hvp import HessianOperator
from stabcheck.engine.lanczos import lanczos
from stabcheck.engine.objective import Objective, builtin_loss

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_DIR = REPO_ROOT / "fixtures" / "digits-mlp"

TARGET_RELATIVE_ERROR = 1e-4
REFERENCE_TOL = 1e-10
REFERENCE_MAX_ITER = 300
# Both sweeps step by about half a decade, so neither tool is favoured by a coarser grid.
STABCHECK_TOLS = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5, 1e-6)
STABCHECK_MAX_ITER = 300
# Lanczos settings that stabcheck's CLI uses unless its options override them.
DEFAULTS = EstimatorSettings()
# PyHessian 0.1's defaults for hessian.eigenvalues.
PYHESSIAN_DEFAULT_TOL = 1e-3
PYHESSIAN_DEFAULT_MAX_ITER = 100
PYHESSIAN_TOLS = (3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7, 1e-8)
VMAP_BATCH = 16
# Row names of the HVP cost table that the summary reads.
GRADIENT = "gradient (torch.autograd.grad of the objective)"
RETAINED_HVP = "HVP stabcheck retained"


@dataclass
class Problem:
    """One model and data set with the repetition counts used to time it."""

    name: str
    description: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    seeds: tuple[int, ...]
    analyzer_seeds: tuple[int, ...]
    pyhessian_max_iter: int
    timing_repeats: int
    setup_seconds: float = 0.0

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


@dataclass
class Run:
    """One eigenvalue estimate: its value, HVP count, wall time and stopping state."""

    value: float
    hvps: int
    seconds: float
    converged: bool
    top: tuple[float, ...] = ()
    bottom: tuple[float, ...] = ()
    # Residual norms of the Ritz pairs above, divided by the largest Ritz value in absolute value.
    top_residuals: tuple[float, ...] = ()
    bottom_residuals: tuple[float, ...] = ()


@dataclass
class SweepRow:
    """The runs of one method at one setting, one run per seed."""

    method: str
    setting: str
    tol: float
    runs: list[Run] = field(default_factory=list)

    def errors(self, reference: float) -> list[float]:
        return [abs(run.value - reference) / abs(reference) for run in self.runs]

    def max_error(self, reference: float) -> float:
        return max(self.errors(reference))

    @property
    def median_seconds(self) -> float:
        return statistics.median(run.seconds for run in self.runs)

    @property
    def median_hvps(self) -> float:
        return statistics.median(run.hvps for run in self.runs)


# ---------------------------------------------------------------------------------------------
# Problems


def load_module(path: Path) -> ModuleType:
    """Import a Python file by its path under a name derived from its folder."""
    name = f"bench_{path.parent.name.replace('-', '_')}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def latest_checkpoint(folder: Path) -> Path:
    """Return the step-NNNNNN.pt file with the highest step in ``folder``."""
    steps = {}
    for path in folder.glob("step-*.pt"):
        match = re.fullmatch(r"step-(\d+)\.pt", path.name)
        if match:
            steps[int(match.group(1))] = path
    if not steps:
        raise FileNotFoundError(
            f"no step-NNNNNN.pt checkpoint found in {folder}. Run fixtures/make_digits_fixtures.py to write them."
        )
    return steps[max(steps)]


def fixture_problem() -> Problem:
    model_module = load_module(FIXTURE_DIR / "model.py")
    data_module = load_module(FIXTURE_DIR / "data.py")
    checkpoint_path = latest_checkpoint(FIXTURE_DIR)
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    model = model_module.build_model()
    model.load_state_dict(checkpoint["model_state_dict"])
    model.eval()
    inputs, targets = data_module.load_data()
    return Problem(
        name="digits-mlp",
        description=f"fixtures/digits-mlp/{checkpoint_path.name}, 64-128-128-10 tanh MLP",
        model=model,
        inputs=inputs,
        targets=targets,
        seeds=(0, 1, 2, 3, 4),
        analyzer_seeds=(0, 1, 2, 3, 4),
        pyhessian_max_iter=5000,
        timing_repeats=30,
    )


def wide_problem(width: int, steps: int, lr: float, seed: int, name: str = "wide-mlp") -> Problem:
    """Build a 64-width-width-10 tanh MLP from ``seed`` and train it with full-batch GD on MSE."""
    data_module = load_module(FIXTURE_DIR / "data.py")
    inputs, targets = data_module.load_data()

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(inputs.shape[1], width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, targets.shape[1]),
    )

    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        final_loss = float(F.mse_loss(model(inputs), targets))

    return Problem(
        name=name,
        description=(
            f"64-{width}-{width}-10 tanh MLP, seed {seed}, {steps} full-batch GD steps at lr {lr} "
            f"(final loss {final_loss:.6f})"
        ),
        model=model,
        inputs=inputs,
        targets=targets,
        seeds=(0, 1),
        analyzer_seeds=(0,),
        pyhessian_max_iter=1000,
        timing_repeats=10,
        setup_seconds=seconds,
    )


# ---------------------------------------------------------------------------------------------
# Eigenvalue estimates


def make_objective(problem: Problem, dtype: torch.dtype) -> Objective:
    return Objective(problem.model, problem.inputs, problem.targets, builtin_loss("mse"), dtype=dtype)


def reference_eigenvalue(problem: Problem) -> tuple[Run, float]:
    """Run float64 Lanczos to REFERENCE_TOL and return the run and its residual bound."""
    start = time.perf_counter()
    operator = HessianOperator(make_objective(problem, torch.float64), method="retained")
    result = lanczos(
        operator.matvec,
        operator.dim,
        num_top=1,
        num_bottom=0,
        max_iter=REFERENCE_MAX_ITER,
        tol=REFERENCE_TOL,
        seed=0,
        dtype=torch.float64,
    )
    seconds = time.perf_counter() - start
    if not result.converged:
        raise RuntimeError(
            f"{problem.name}: the float64 reference Lanczos did not reach tol {REFERENCE_TOL} in "
            f"{REFERENCE_MAX_ITER} steps (residual {result.top_residuals[0]:.3e}). Raise REFERENCE_MAX_ITER."
        )
    run = Run(float(result.top[0]), result.num_matvecs, seconds, result.converged)
    return run, float(result.top_residuals[0])


def run_stabcheck(
    problem: Problem,
    tol: float,
    seed: int,
    *,
    num_top: int = 1,
    num_bottom: int = 0,
    max_iter: int = STABCHECK_MAX_ITER,
) -> Run:
    start = time.perf_counter()
    operator = HessianOperator(make_objective(problem, torch.float32), method="retained")
    result = lanczos(
        operator.matvec,
        operator.dim,
        num_top=num_top,
        num_bottom=num_bottom,
        max_iter=max_iter,
        tol=tol,
        seed=seed,
        dtype=operator.dtype,
    )
    seconds = time.perf_counter() - start
    return Run(
        float(result.top[0]),
        result.num_matvecs,
        seconds,
        result.converged,
        top=tuple(float(value) for value in result.top),
        bottom=tuple(float(value) for value in result.bottom),
        top_residuals=tuple(float(value) / result.scale for value in result.top_residuals),
        bottom_residuals=tuple(float(value) / result.scale for value in result.bottom_residuals),
    )


class HvpCounter:
    """Counter of calls to PyHessian's module-level hessian_vector_product while it is installed."""

    def __init__(self) -> None:
        self.count = 0
        self.module = importlib.import_module("pyhessian.hessian")

    @contextmanager
    def installed(self) -> Iterator[None]:
        original = self.module.hessian_vector_product

        def counting_hvp(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        self.module.hessian_vector_product = counting_hvp
        try:
            yield
        finally:
            self.module.hessian_vector_product = original


def run_pyhessian(problem: Problem, counter: HvpCounter, tol: float, max_iter: int, seed: int) -> Run:
    """Run PyHessian's power iteration on a fresh float32 copy of the model."""
    model_copy = copy.deepcopy(problem.model).float().eval()
    criterion = nn.MSELoss()
    counter.count = 0
    torch.manual_seed(seed)
    with counter.installed():
        start = time.perf_counter()
        estimator = counter.module.hessian(
            model_copy, criterion, data=(problem.inputs, problem.targets), cuda=False
        )
        eigenvalues, _ = estimator.eigenvalues(maxIter=max_iter, tol=tol, top_n=1)
        seconds = time.perf_counter() - start
    # PyTorch warns that backward(create_graph=True) makes a reference cycle between each
    # parameter and its .grad. Setting .grad to None breaks the cycle, so the graph is freed.
    model_copy.zero_grad(set_to_none=True)
    # PyHessian stops when two consecutive estimates agree within tol, or after max_iter HVPs.
    return Run(float(eigenvalues[0]), counter.count, seconds, counter.count < max_iter)


@dataclass
class StabcheckSweep:
    """All stabcheck rows of one problem and the ones the summary compares with PyHessian."""

    rows: list[SweepRow]
    # The first tolerance whose relative error is at most TARGET_RELATIVE_ERROR for every seed.
    best: SweepRow | None
    # The CLI's default tolerance.
    default: SweepRow | None
    # The best tolerance again, with numpy's BLAS limited to one thread.
    one_blas_thread: SweepRow | None
    # The sharpness analyzer's settings, which also estimate the next eigenvalues and the smallest.
    analyzer: SweepRow


def sweep_stabcheck(problem: Problem, reference: float) -> StabcheckSweep:
    """Run stabcheck at each tolerance of STABCHECK_TOLS, then at the sharpness analyzer's settings."""
    rows = []
    best = None
    default_row = None
    for tol in STABCHECK_TOLS:
        row = SweepRow(
            "stabcheck Lanczos, float32, retained", f"tol={tol:g}, max_iter={STABCHECK_MAX_ITER}", tol
        )
        for seed in problem.seeds:
            row.runs.append(run_stabcheck(problem, tol, seed))
        rows.append(row)
        if tol == DEFAULTS.lanczos_tol:
            default_row = row
        if best is None and row.max_error(reference) <= TARGET_RELATIVE_ERROR:
            best = row
        # Continue through stabcheck's default tolerance so that its row is always shown.
        if best is not None and tol <= DEFAULTS.lanczos_tol:
            break

    # The sharpness analyzer's own call: top_k largest and the smallest eigenvalue, CLI defaults.
    analyzer_row = SweepRow(
        "stabcheck sharpness analyzer settings, float32",
        f"num_top={DEFAULTS.top_k}, num_bottom=1, tol={DEFAULTS.lanczos_tol:g}, max_iter={DEFAULTS.lanczos_max_iter}",
        DEFAULTS.lanczos_tol,
    )
    for seed in problem.analyzer_seeds:
        analyzer_row.runs.append(
            run_stabcheck(
                problem,
                DEFAULTS.lanczos_tol,
                seed,
                num_top=DEFAULTS.top_k,
                num_bottom=1,
                max_iter=DEFAULTS.lanczos_max_iter,
            )
        )
    rows.append(analyzer_row)

    # Diagnostic: lanczos calls numpy.linalg.eigh at every step, and numpy's OpenBLAS threads can
    # compete with torch's OpenMP threads for the cores. This row limits OpenBLAS to one thread.
    one_blas_thread = None
    if best is not None:
        one_blas_thread = SweepRow(
            "stabcheck Lanczos, float32, retained, numpy BLAS limited to 1 thread", best.setting, best.tol
        )
        with threadpool_limits(limits=1, user_api="blas"):
            for seed in problem.seeds:
                one_blas_thread.runs.append(run_stabcheck(problem, best.tol, seed))
        rows.append(one_blas_thread)
    return StabcheckSweep(rows, best, default_row, one_blas_thread, analyzer_row)


def sweep_pyhessian(problem: Problem, reference: float) -> tuple[list[SweepRow], SweepRow | None]:
    counter = HvpCounter()
    settings = [(PYHESSIAN_DEFAULT_TOL, PYHESSIAN_DEFAULT_MAX_ITER)]
    settings += [(tol, problem.pyhessian_max_iter) for tol in PYHESSIAN_TOLS]
    rows = []
    for tol, max_iter in settings:
        row = SweepRow("PyHessian power iteration, float32", f"tol={tol:g}, maxIter={max_iter}", tol)
        for seed in problem.seeds:
            row.runs.append(run_pyhessian(problem, counter, tol, max_iter, seed))
        rows.append(row)
        if row.max_error(reference) <= TARGET_RELATIVE_ERROR:
            return rows, row
    return rows, None


# ---------------------------------------------------------------------------------------------
# Cost of one HVP


def median_seconds(function: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        function()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def hvp_costs(problem: Problem) -> list[tuple[str, float, float | None]]:
    """Time one gradient and one HVP of each method; return (name, seconds, difference) rows.

    The difference is the relative 2-norm distance of the method's product from the retained
    product on the same vector, a check that every method computes the same H v.
    """
    objective = make_objective(problem, torch.float32)
    layout = objective.layout
    repeats = problem.timing_repeats
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(VMAP_BATCH, objective.dim, generator=generator)
    vector = vectors[0].clone()
    rows: list[tuple[str, float, float | None]] = []

    leaves = [objective.point[name].clone().requires_grad_(True) for name in layout.names]
    leaf_dict = dict(zip(layout.names, leaves))

    def gradient() -> tuple[torch.Tensor, ...]:
        loss = sum(objective.chunk_loss(leaf_dict, x, y) for x, y in objective.chunks())
        return torch.autograd.grad(loss, leaves)

    gradient_seconds = median_seconds(gradient, repeats)
    rows.append((GRADIENT, gradient_seconds, None))

    build_seconds = median_seconds(lambda: HessianOperator(objective, method="retained"), repeats)
    rows.append(("build HessianOperator retained (gradient with create_graph=True)", build_seconds, None))

    retained = HessianOperator(objective, method="retained")
    reference_product = retained.matvec(vector)
    rows.append((RETAINED_HVP, median_seconds(lambda: retained.matvec(vector), repeats), 0.0))

    recompute = HessianOperator(objective, method="recompute")
    difference = relative_difference(recompute.matvec(vector), reference_product)
    rows.append(
        ("HVP stabcheck recompute", median_seconds(lambda: recompute.matvec(vector), repeats), difference)
    )

    point = {name: objective.point[name] for name in layout.names}

    def loss_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(objective.chunk_loss(params, x, y) for x, y in objective.chunks())

    gradient_function = torch.func.grad(loss_of)

    def forward_over_reverse(flat: torch.Tensor) -> torch.Tensor:
        tangent = dict(zip(layout.names, layout.unflatten(flat)))
        _, product = torch.func.jvp(gradient_function, (point,), (tangent,))
        return layout.flatten(product)

    difference = relative_difference(forward_over_reverse(vector), reference_product)
    rows.append(
        (
            "HVP forward-over-reverse (torch.func.jvp of torch.func.grad)",
            median_seconds(lambda: forward_over_reverse(vector), repeats),
            difference,
        )
    )

    batched = torch.func.vmap(forward_over_reverse)
    difference = relative_difference(batched(vectors)[0], reference_product)
    batch_seconds = median_seconds(lambda: batched(vectors), max(3, repeats // 4), warmup=1)
    rows.append(
        (
            f"HVP forward-over-reverse, vmap over {VMAP_BATCH} vectors, per vector",
            batch_seconds / VMAP_BATCH,
            difference,
        )
    )

    # PyHessian's product: double backward through the .grad fields of a module copy.
    counter = HvpCounter()
    model_copy = copy.deepcopy(problem.model).float().eval()
    estimator = counter.module.hessian(
        model_copy, nn.MSELoss(), data=(problem.inputs, problem.targets), cuda=False
    )
    pieces = [piece.clone() for piece in layout.unflatten(vector)]
    hvp = counter.module.hessian_vector_product
    difference = relative_difference(
        layout.flatten(hvp(estimator.gradsH, estimator.params, pieces)), reference_product
    )
    rows.append(
        (
            "HVP PyHessian hessian_vector_product",
            median_seconds(lambda: hvp(estimator.gradsH, estimator.params, pieces), repeats),
            difference,
        )
    )
    model_copy.zero_grad(set_to_none=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Report


class CpuShareMonitor:
    """Monitor of the CPU time that other processes use while a part of the benchmark runs.

    Timings on a 2-core machine are only meaningful while nothing else runs. The share is the
    busy CPU time of the whole machine (from /proc/stat) minus this process's own CPU time,
    divided by the machine's capacity over the same wall time. It is reported as unknown where
    /proc/stat does not exist.
    """

    def __init__(self) -> None:
        self.start_busy = self._machine_busy_seconds()
        self.start_own = self._own_seconds()
        self.start_wall = time.perf_counter()

    @staticmethod
    def _machine_busy_seconds() -> float | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except OSError:
            return None
        ticks = [int(value) for value in fields[:8]]
        idle = ticks[3] + ticks[4]  # idle and iowait
        return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_seconds() -> float:
        times = os.times()
        return times.user + times.system

    def other_share(self) -> float | None:
        """Return the fraction of all CPUs' capacity that other processes used since creation."""
        busy = self._machine_busy_seconds()
        if busy is None or self.start_busy is None:
            return None
        wall = time.perf_counter() - self.start_wall
        others = (busy - self.start_busy) - (self._own_seconds() - self.start_own)
        return max(0.0, others) / (wall * (os.cpu_count() or 1))


def format_share(share: float | None) -> str:
    return "unknown" if share is None else f"{share:.0%}"


def stabcheck_revision() -> str:
    """Describe the git commit of the repository and whether stabcheck/ differs from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--", "stabcheck"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "git revision unknown"
    state = "with uncommitted changes in stabcheck/" if changes else "stabcheck/ as committed"
    return f"commit {commit}, {state}"


def machine_description() -> list[str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    lines = [
        f"- CPU: {cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}",
        f"- stabcheck: {stabcheck_revision()}",
        (
            f"- python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
            f"pyhessian {importlib.metadata.version('pyhessian')}"
        ),
        f"- command: python {' '.join(sys.argv)}",
    ]
    if load is not None:
        lines.append(f"- load average at start (1, 5, 15 min): {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}")
    return lines


def format_hvps(row: SweepRow) -> str:
    counts = sorted(run.hvps for run in row.runs)
    return str(counts[0]) if counts[0] == counts[-1] else f"{counts[0]}-{counts[-1]}"


def format_value(row: SweepRow, reference: float) -> str:
    errors = row.errors(reference)
    worst = row.runs[int(np.argmax(errors))]
    return f"{worst.value:.8f}"


def print_eigenvalue_table(
    problem: Problem, reference_run: Run, residual: float, rows: list[SweepRow]
) -> None:
    reference = reference_run.value
    print(f"\n### {problem.name}: top Hessian eigenvalue\n")
    print(
        f"{problem.description}; {problem.num_parameters:,} parameters; seeds {list(problem.seeds)} "
        f"(value and error: the seed with the largest error; time: median over seeds; HVPs: range)\n"
    )
    print("| method | setting | value | relative error | wall time (s) | HVPs | stopped by tol |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| reference: stabcheck Lanczos, float64 | tol={REFERENCE_TOL:g}, seed 0 | {reference:.10f} | "
        f"(residual {residual:.1e}) | {reference_run.seconds:.2f} | {reference_run.hvps} | yes |"
    )
    for row in rows:
        stopped = sum(run.converged for run in row.runs)
        print(
            f"| {row.method} | {row.setting} | {format_value(row, reference)} | {row.max_error(reference):.2e} | "
            f"{row.median_seconds:.3f} | {format_hvps(row)} | {stopped}/{len(row.runs)} |"
        )


def print_cost_table(problem: Problem, rows: list[tuple[str, float, float | None]]) -> None:
    gradient_seconds = next(seconds for name, seconds, _ in rows if name == GRADIENT)
    print(f"\n### {problem.name}: cost of one HVP\n")
    print(
        f"Median over {problem.timing_repeats} timings after warm-up; ratio = time / time of one gradient.\n"
    )
    print("| operation | time (ms) | gradients | relative difference from retained H v |")
    print("|---|---|---|---|")
    for name, seconds, difference in rows:
        difference_text = "" if difference is None else f"{difference:.1e}"
        print(f"| {name} | {seconds * 1e3:.2f} | {seconds / gradient_seconds:.2f} | {difference_text} |")


def benchmark(problem: Problem) -> dict[str, float | None]:
    monitor = CpuShareMonitor()
    print(f"\n## {problem.name}", flush=True)
    if problem.setup_seconds:
        print(f"\nTraining the model took {problem.setup_seconds:.1f} s.")
    reference_run, residual = reference_eigenvalue(problem)
    # Untimed warm-up, because the first float32 runs in a process are slower than later ones.
    run_stabcheck(problem, STABCHECK_TOLS[0], seed=0)
    run_pyhessian(problem, HvpCounter(), PYHESSIAN_DEFAULT_TOL, PYHESSIAN_DEFAULT_MAX_ITER, seed=0)
    stabcheck = sweep_stabcheck(problem, reference_run.value)
    stabcheck_best = stabcheck.best
    pyhessian_rows, pyhessian_best = sweep_pyhessian(problem, reference_run.value)
    print_eigenvalue_table(problem, reference_run, residual, stabcheck.rows + pyhessian_rows)

    summary: dict[str, float | None] = {}
    first = stabcheck.analyzer.runs[0]
    top_values = ", ".join(
        f"{value:.5f} ({residual:.1e})" for value, residual in zip(first.top, first.top_residuals)
    )
    bottom_values = ", ".join(
        f"{value:.5f} ({residual:.1e})" for value, residual in zip(first.bottom, first.bottom_residuals)
    )
    print(
        f"\nRitz values (relative residual) of the analyzer-settings run with seed 0, tol "
        f"{DEFAULTS.lanczos_tol:g}: top {top_values}, bottom {bottom_values}."
    )
    print()
    if stabcheck_best is None or pyhessian_best is None:
        missing = [
            name
            for name, row in (("stabcheck", stabcheck_best), ("PyHessian", pyhessian_best))
            if row is None
        ]
        print(
            f"No speed-up at equal accuracy: {', '.join(missing)} did not reach relative error {TARGET_RELATIVE_ERROR:g}."
        )
    else:
        speedup = pyhessian_best.median_seconds / stabcheck_best.median_seconds
        hvp_ratio = pyhessian_best.median_hvps / stabcheck_best.median_hvps
        summary = {"speedup": speedup, "hvp_ratio": hvp_ratio}
        print(
            f"At relative error <= {TARGET_RELATIVE_ERROR:g}: stabcheck ({stabcheck_best.setting}) "
            f"{stabcheck_best.median_seconds:.3f} s and {stabcheck_best.median_hvps:g} HVPs, PyHessian "
            f"({pyhessian_best.setting}) {pyhessian_best.median_seconds:.3f} s and {pyhessian_best.median_hvps:g} HVPs: "
            f"speed-up {speedup:.1f}x in wall time, {hvp_ratio:.1f}x in HVPs."
        )
        if stabcheck.default is not None:
            default_speedup = pyhessian_best.median_seconds / stabcheck.default.median_seconds
            summary["default_speedup"] = default_speedup
            print(
                f"With stabcheck at its default tolerance ({stabcheck.default.setting}, relative error "
                f"{stabcheck.default.max_error(reference_run.value):.1e}): {stabcheck.default.median_seconds:.3f} s, "
                f"speed-up {default_speedup:.1f}x."
            )
        if stabcheck.one_blas_thread is not None:
            blas_speedup = pyhessian_best.median_seconds / stabcheck.one_blas_thread.median_seconds
            summary["one_blas_thread_speedup"] = blas_speedup
            print(
                f"With numpy's BLAS limited to 1 thread during stabcheck's Lanczos: "
                f"{stabcheck.one_blas_thread.median_seconds:.3f} s, speed-up {blas_speedup:.1f}x."
            )
    sys.stdout.flush()

    cost_rows = hvp_costs(problem)
    print_cost_table(problem, cost_rows)
    seconds_by_name = {name: seconds for name, seconds, _ in cost_rows}
    summary["retained_in_gradients"] = seconds_by_name[RETAINED_HVP] / seconds_by_name[GRADIENT]
    share = monitor.other_share()
    summary["other_share"] = share
    print(f"\nOther processes used {format_share(share)} of the machine's CPU time while {problem.name} ran.")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--problem",
        choices=("all", "digits-mlp", "wide-mlp", "wide-mlp-edge"),
        default="all",
        help="problem to run (default all)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument(
        "--wide-width", type=int, default=1024, help="hidden width of wide-mlp (default 1024)"
    )
    parser.add_argument(
        "--wide-steps", type=int, default=200, help="GD steps that train wide-mlp (default 200)"
    )
    parser.add_argument(
        "--wide-lr", type=float, default=0.5, help="GD learning rate of wide-mlp (default 0.5)"
    )
    parser.add_argument(
        "--edge-steps",
        type=int,
        default=1000,
        help="GD steps that train wide-mlp-edge, the same model trained on to the edge of stability (default 1000)",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    # PyHessian calls backward(create_graph=True), and PyTorch warns about the reference cycle
    # on every call. run_pyhessian breaks the cycle, so the warning is silenced.
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    start = time.perf_counter()
    print("# stabcheck sharpness benchmark\n")
    print("\n".join(machine_description()))

    summaries = {}
    if args.problem in ("all", "digits-mlp"):
        summaries["digits-mlp"] = benchmark(fixture_problem())
    if args.problem in ("all", "wide-mlp"):
        summaries["wide-mlp"] = benchmark(
            wide_problem(args.wide_width, args.wide_steps, args.wide_lr, seed=0)
        )
    if args.problem in ("all", "wide-mlp-edge"):
        # Trained on at the same lr, the sharpness settles at 2/lr and the top eigenvalues crowd
        # together, the regime that stabcheck's sharpness analyzer exists for.
        summaries["wide-mlp-edge"] = benchmark(
            wide_problem(args.wide_width, args.edge_steps, args.wide_lr, seed=0, name="wide-mlp-edge")
        )

    print("\n## Targets\n")
    print(
        "| problem | speed-up over PyHessian (target >= 3x) | same, numpy BLAS 1 thread "
        "| retained HVP in gradients (target <= 2) | CPU share of other processes |"
    )
    print("|---|---|---|---|---|")
    for name, summary in summaries.items():
        speedup = f"{summary['speedup']:.1f}x" if "speedup" in summary else "not reached"
        blas = summary.get("one_blas_thread_speedup")
        blas_speedup = "not reached" if blas is None else f"{blas:.1f}x"
        print(
            f"| {name} | {speedup} | {blas_speedup} | {summary['retained_in_gradients']:.2f} "
            f"| {format_share(summary['other_share'])} |"
        )
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load is not None:
        print(f"\nLoad average at end (1, 5, 15 min): {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}")
    print(f"Total time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
