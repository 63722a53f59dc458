"""Compare stabcheck's trace estimates with PyHessian's ``trace()`` at equal accuracy on digits-mlp.

Both tools draw Rademacher probes on the same float32 objective (the last checkpoint of
fixtures/digits-mlp, MSE over all 1797 digits). For each target relative standard error, every
run stops by the same rule. It draws at least 30 probes and stops at the first count whose
standard error (sample standard deviation over the square root of the count) is at most the
target times the estimate.
stabcheck's ``deflated`` method and its plain Hutchinson run that rule themselves. PyHessian
has no such rule: its own stops when the running mean changes by less than ``tol``, which
bounds no error. So it first runs with ``tol=0`` for as many probes as the tightest target
needs, and the count each target needs is read from that run's samples. Then PyHessian runs
again, timed, with exactly that count.

Each tool and target runs with several seeds. The exact trace, the sum of the diagonal of the
float64 Hessian from one product per unit vector, checks that the errors match the reported
standard errors: their ratios should have an RMS near 1. The script prints one table row per tool
and target (means over the seeds, and the median time), and the CPU share that other processes
used.

A second table runs the deflated method alone with more seeds (``--calibration-seeds``) for the
same check.

Run from the repository root: ``python benchmarks/bench_trace.py`` (about 10 minutes on 2 cores,
3 of them for the exact trace; ``--no-exact`` skips it and the second table).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from pyhessian import hessian

from stabcheck.engine.hvp import HessianOperator
from stabcheck.engine.objective import Objective, builtin_loss
from stabcheck.engine.trace import MIN_SEQUENTIAL_PROBES, deflated_hutchinson, hutchinson

# Run as a script, the benchmarks folder is on sys.path.
from bench_sharpness import CpuShareMonitor, machine_description

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "digits-mlp"
TARGETS = (0.01, 0.005, 0.0025)


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def probes_for_target(samples: np.ndarray, target: float) -> int | None:
    """Return the first count of at least 30 samples whose standard error meets the target."""
    for count in range(MIN_SEQUENTIAL_PROBES, len(samples) + 1):
        head = samples[:count]
        if head.std(ddof=1) / math.sqrt(count) <= target * abs(head.mean()):
            return count
    return None


def exact_trace(model, inputs, targets) -> tuple[float, float]:
    """Sum e_i^T H e_i over all unit vectors in float64; return the trace and the seconds taken."""
    operator = HessianOperator(Objective(model, inputs, targets, builtin_loss("mse"), dtype=torch.float64))
    start = time.perf_counter()
    unit = torch.zeros(operator.dim, dtype=torch.float64)
    total = 0.0
    for index in range(operator.dim):
        unit[index] = 1.0
        total += float(operator.matvec(unit)[index])
        unit[index] = 0.0
    return total, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--no-exact", action="store_true", help="skip the exact trace (26,122 products in float64)")
    parser.add_argument("--repeats", type=int, default=5, help="seeds per tool and target (default 5)")
    parser.add_argument("--calibration-seeds", type=int, default=40, help="seeds for the deflated method's error check (default 40)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")

    checkpoint = max(FIXTURE.glob("step-*.pt"))
    model = load_module(FIXTURE / "model.py").build_model()
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model_state_dict"])
    model.eval()
    inputs, targets = load_module(FIXTURE / "data.py").load_data()

    def objective():
        return Objective(model, inputs, targets, builtin_loss("mse"))

    # Warm up both tools (allocator, thread pool) so that neither pays first-call costs in the timing.
    warm = HessianOperator(objective())
    hutchinson(warm.matvec, warm.dim, num_probes=10, seed=99, dtype=warm.dtype)
    hessian(copy.deepcopy(model), torch.nn.MSELoss(), data=(inputs, targets), cuda=False).trace(maxIter=10, tol=0.0)

    monitor = CpuShareMonitor()
    runs = []  # (target, tool, seed, products, basis, trace, stderr, seconds)
    for seed in range(args.repeats):
        for target in TARGETS:
            for method in ("deflated", "hutchinson"):
                estimator = deflated_hutchinson if method == "deflated" else hutchinson
                start = time.perf_counter()
                operator = HessianOperator(objective())
                estimate = estimator(
                    operator.matvec, operator.dim, target_rel_stderr=target, max_probes=20000, seed=seed, dtype=operator.dtype
                )
                seconds = time.perf_counter() - start
                runs.append((target, f"stabcheck {method}", seed, estimate.num_matvecs, estimate.basis_size, estimate.trace, estimate.trace_stderr, seconds))

        # PyHessian: each target's count is read from the samples of one long run. Then a timed
        # run of exactly that count follows, from the same seed, for each target.
        tightest = max(run[3] for run in runs if run[1] == "stabcheck hutchinson" and run[2] == seed)
        torch.manual_seed(1000 + seed)
        pilot = np.asarray(peer_trace(model, inputs, targets, int(1.5 * tightest)))
        for target in TARGETS:
            count = probes_for_target(pilot, target)
            if count is None:
                raise SystemExit(f"PyHessian's {len(pilot)} samples do not reach a relative standard error of {target}")
            torch.manual_seed(1000 + seed)
            start = time.perf_counter()
            samples = np.asarray(peer_trace(model, inputs, targets, count))
            seconds = time.perf_counter() - start
            stderr = float(samples.std(ddof=1) / math.sqrt(len(samples)))
            runs.append((target, "PyHessian trace()", seed, len(samples), 0, float(samples.mean()), stderr, seconds))
    share = monitor.other_share()

    reference, reference_seconds = (None, 0.0) if args.no_exact else exact_trace(model, inputs, targets)
    # More seeds for the deflated method alone, whose runs take about a second: enough to tell
    # whether its standard errors describe its errors.
    calibration = {}
    if reference is not None:
        operator = HessianOperator(objective())
        for target in TARGETS:
            z = []
            for seed in range(args.calibration_seeds):
                estimate = deflated_hutchinson(
                    operator.matvec, operator.dim, target_rel_stderr=target, max_probes=20000, seed=seed, dtype=operator.dtype
                )
                z.append((estimate.trace - reference) / estimate.trace_stderr)
            calibration[target] = np.asarray(z)

    print("\n".join(machine_description()))
    print(f"checkpoint: {checkpoint.relative_to(FIXTURE.parents[1])}, {warm.dim:,} parameters, {len(inputs)} samples")
    print(f"runs: {args.repeats} seeds per tool and target")
    print(f"other processes used {share:.0%} of the CPU time during the timed runs" if share is not None else "CPU share of other processes: unknown")
    if reference is not None:
        print(f"exact trace (float64, {warm.dim:,} unit-vector products, {reference_seconds:.0f} s): {reference:.4f}\n")
    print(
        "| target rel. stderr | tool | mean products | mean basis | mean standard error | RMS of error / stderr "
        "| largest abs. error / stderr | median wall time (s) | PyHessian time / this time |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for target in TARGETS:
        tools = ("stabcheck deflated", "stabcheck hutchinson", "PyHessian trace()")
        median = {tool: float(np.median([run[7] for run in runs if run[0] == target and run[1] == tool])) for tool in tools}
        for tool in tools:
            group = [run for run in runs if run[0] == target and run[1] == tool]
            products = np.mean([run[3] for run in group])
            basis = np.mean([run[4] for run in group])
            stderr = np.mean([run[6] for run in group])
            if reference is None:
                rms, worst = "n/a", "n/a"
            else:
                z = np.asarray([(run[5] - reference) / run[6] for run in group])
                rms, worst = f"{math.sqrt(np.mean(z**2)):.2f}", f"{np.max(np.abs(z)):.2f}"
            speedup = median["PyHessian trace()"] / median[tool]
            print(f"| {target:g} | {tool} | {products:.0f} | {basis:.0f} | {stderr:.4f} | {rms} | {worst} | {median[tool]:.2f} | {speedup:.2f}x |")

    if calibration:
        print(f"\nstabcheck deflated over {args.calibration_seeds} seeds (error / stderr against the exact trace):\n")
        print("| target rel. stderr | mean | RMS | share within 2 | largest abs. |")
        print("|---|---|---|---|---|")
        for target, z in calibration.items():
            print(f"| {target:g} | {np.mean(z):+.2f} | {math.sqrt(np.mean(z**2)):.2f} | {np.mean(np.abs(z) <= 2):.0%} | {np.max(np.abs(z)):.2f} |")


def peer_trace(model, inputs, targets, count: int) -> list[float]:
    """Run PyHessian's trace() for exactly ``count`` probes (``tol=0`` turns off its early stop)."""
    peer = hessian(copy.deepcopy(model), torch.nn.MSELoss(), data=(inputs, targets), cuda=False)
    return peer.trace(maxIter=count, tol=0.0)


if __name__ == "__main__":
    main()
