"""Growth of the time and peak memory of gradients, HVPs and the sharpness analysis with model and data size.

Run from the repository root:

    python benchmarks/bench_scaling.py [--quick] [--threads 2]

The models are tanh MLPs 64-w-w-10 with cross-entropy on synthetic inputs (standard normal,
64 features, like the 8 x 8 digits) and uniform random labels over 10 classes, all drawn from
fixed seeds. The models stay at their initialization, so the timings describe the cost of the
products, not a trained network's spectrum. Two sweeps:

``parameters``
    Widths 72, 280, 960 and 3136 (about 1e4, 1e5, 1e6 and 1e7 parameters) at 512 samples.
``samples``
    Width 280 (99,690 parameters) at 256, 512, 1024, 2048 and 4096 samples.

Each configuration is measured in four fresh child processes, one per operation:

``gradient``
    One full-batch gradient of the objective, as in ``bench_sharpness.py``: the summed chunk
    losses of ``Objective`` differentiated by ``torch.autograd.grad`` on leaf copies.
``hvp-retained`` and ``hvp-recompute``
    Building ``HessianOperator(objective, method=...)`` and then one product ``matvec(v)`` with a
    fixed random ``v``. The building time is reported separately.
``analyze``
    ``stabcheck.analyze(model, (inputs, labels), analyzers=["sharpness"], ...)`` with
    ``EstimatorSettings(lanczos_max_iter=20, lanczos_tol=1e-12, top_k=1)``. The tolerance cannot
    be met in 20 steps, so every run computes the same number of products.

Times are medians over repeats after warm-up calls, except the analysis, which runs once after
an untimed warm-up call on a small model. Every child also times one gradient after its
measured operation, so each ratio to a gradient comes from a single process.

Peak memory is read from ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the child's peak
resident set size. "Added" is that peak minus the child's resident set size (``VmRSS``) just
before the measured operation, after torch, the model and the data were loaded. The gradient
that a child times afterwards for the ratio does not change the peak, because the measured
operation already contains one gradient with at least as much memory.

Before each configuration the script waits up to ``--max-wait`` seconds until other processes
use under 10% of the CPUs, sampled over 2 s. It measures a configuration again, up to
``--attempts`` times in all, while other processes used 10% or more during it, and keeps the
least disturbed attempt. The tables give that share and the attempt count for every row.

The script ends with the least-squares slope of log(time) against log(samples) for each
operation, where 1 means time linear in samples. ``--quick`` runs the three smallest widths
and 256 to 1024 samples with fewer repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

# Helpers shared with the PyHessian comparison (run from the repository root, this script's
# folder is on sys.path).
from bench_sharpness import CpuShareMonitor, format_share, machine_description, median_seconds

INPUT_FEATURES = 64
NUM_CLASSES = 10
PARAMETER_WIDTHS = (72, 280, 960, 3136)
PARAMETER_SAMPLES = 512
SAMPLE_WIDTH = 280
SAMPLE_COUNTS = (256, 512, 1024, 2048, 4096)
QUICK_PARAMETER_WIDTHS = PARAMETER_WIDTHS[:3]
QUICK_SAMPLE_COUNTS = SAMPLE_COUNTS[:3]
OPERATIONS = ("gradient", "hvp-retained", "hvp-recompute", "analyze")
# A fixed Lanczos budget: tol 1e-12 is not reached in 20 steps, so every run spends the same
# number of products (the steps plus the explicit residual checks that lanczos adds).
LANCZOS_STEPS = 20
# Learning rate passed to analyze with optimizer "sgd". It only sets the reported threshold 2/lr.
ANALYZE_LR = 0.1
# A timing repeats its call until about this many seconds have passed, within the bounds below.
TARGET_SECONDS = 2.0
MIN_REPEATS = 5
# Other processes' share of all CPUs below which the machine counts as quiet, and the sample
# length that measures it. On 2 cores, earlier runs of this script slowed down many times over
# while a test suite ran next to them.
QUIET_SHARE = 0.1
QUIET_SAMPLE_SECONDS = 2.0


def build_mlp(width: int) -> nn.Module:
    """Build the 64-width-width-10 tanh MLP with weights from seed 0."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(INPUT_FEATURES, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, NUM_CLASSES),
    )


def count_parameters(width: int) -> int:
    return (INPUT_FEATURES + 1) * width + (width + 1) * width + (width + 1) * NUM_CLASSES


def synthetic_data(num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw standard normal inputs and uniform labels from seed 1."""
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(num_samples, INPUT_FEATURES, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (num_samples,), generator=generator)
    return inputs, labels


# ---------------------------------------------------------------------------------------------
# Child process: one operation on one configuration


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def peak_resident_bytes() -> int:
    # Linux reports ru_maxrss in kilobytes.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def adaptive_median(function, max_repeats: int) -> float:
    """Return the median time of ``function`` over about TARGET_SECONDS of repeats.

    One untimed call measures the cost, which sets the repeat count between MIN_REPEATS and
    ``max_repeats``, and ``median_seconds`` then warms up once more and times the repeats.
    """
    start = time.perf_counter()
    function()
    trial = time.perf_counter() - start
    repeats = int(min(max_repeats, max(MIN_REPEATS, TARGET_SECONDS / max(trial, 1e-6))))
    return median_seconds(function, repeats, warmup=1)


def gradient_timer(objective):
    layout = objective.layout
    leaves = [objective.point[name].clone().requires_grad_(True) for name in layout.names]
    leaf_dict = dict(zip(layout.names, leaves))

    def gradient() -> tuple[torch.Tensor, ...]:
        loss = sum(objective.chunk_loss(leaf_dict, x, y) for x, y in objective.chunks())
        return torch.autograd.grad(loss, leaves)

    return gradient


def warm_up_analyze(estimator) -> None:
    """Run one small analysis so that the timed call does not pay for first-call imports."""
    import stabcheck

    inputs, labels = synthetic_data(16)
    stabcheck.analyze(
        build_mlp(8), (inputs, labels), loss="cross_entropy", analyzers=["sharpness"],
        lr=ANALYZE_LR, optimizer="sgd", estimator=estimator, seed=0,
    )


def run_child(operation: str, width: int, num_samples: int, max_repeats: int) -> dict:
    import stabcheck
    from stabcheck.analyzers.base import EstimatorSettings
    from stabcheck.engine.hvp import HessianOperator
    from stabcheck.engine.objective import Objective, builtin_loss

    model = build_mlp(width)
    model.eval()
    inputs, labels = synthetic_data(num_samples)
    objective = Objective(model, inputs, labels, builtin_loss("cross_entropy"))
    gradient = gradient_timer(objective)
    estimator = EstimatorSettings(lanczos_max_iter=LANCZOS_STEPS, lanczos_tol=1e-12, top_k=1)
    if operation == "analyze":
        warm_up_analyze(estimator)
    row: dict = {"operation": operation, "width": width, "samples": num_samples, "parameters": objective.dim}

    before = resident_bytes()
    if operation == "gradient":
        row["seconds"] = adaptive_median(gradient, max_repeats)
    elif operation in ("hvp-retained", "hvp-recompute"):
        method = operation.removeprefix("hvp-")
        start = time.perf_counter()
        operator = HessianOperator(objective, method=method)
        row["build_seconds"] = time.perf_counter() - start
        vector = torch.randn(operator.dim, generator=torch.Generator().manual_seed(2))
        row["seconds"] = adaptive_median(lambda: operator.matvec(vector), max_repeats)
    elif operation == "analyze":
        start = time.perf_counter()
        report = stabcheck.analyze(
            model, (inputs, labels), loss="cross_entropy", analyzers=["sharpness"],
            lr=ANALYZE_LR, optimizer="sgd", estimator=estimator, seed=0,
        )
        row["seconds"] = time.perf_counter() - start
        result = report.results[0]["analyzers"]["sharpness"]
        row["status"] = result["status"]
        row["matvecs"] = result["diagnostics"].get("lanczos", {}).get("matvecs")
        row["lambda_max"] = result["metrics"].get("lambda_max")
    else:
        raise ValueError(f"unknown operation {operation!r}; use one of {OPERATIONS}")
    row["peak_bytes"] = peak_resident_bytes()
    row["resident_before"] = before
    row["peak_added"] = row["peak_bytes"] - before

    row["gradient_seconds"] = row["seconds"] if operation == "gradient" else adaptive_median(gradient, max_repeats)
    return row


# ---------------------------------------------------------------------------------------------
# Parent process: run the children and print the tables


@dataclass
class Configuration:
    """One model width and sample count with the rows of its four operations."""

    width: int
    samples: int
    rows: dict[str, dict]
    other_share: float | None
    attempts: int = 1

    @property
    def parameters(self) -> int:
        return self.rows["gradient"]["parameters"]

    def seconds(self, operation: str) -> float:
        return self.rows[operation]["seconds"]

    def in_gradients(self, operation: str) -> float:
        row = self.rows[operation]
        return row["seconds"] / row["gradient_seconds"]


class ChildCpuShareMonitor(CpuShareMonitor):
    """CpuShareMonitor that counts the CPU time of finished child processes as this process's own."""

    @staticmethod
    def _own_seconds() -> float:
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system


def wait_for_quiet(max_wait_seconds: float) -> float:
    """Sleep until other processes use under QUIET_SHARE of the CPUs, and return the seconds waited.

    Gives up after ``max_wait_seconds``, so a busy machine delays the run but does not stop it.
    """
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_seconds:
        monitor = ChildCpuShareMonitor()
        time.sleep(QUIET_SAMPLE_SECONDS)
        share = monitor.other_share()
        if share is None or share < QUIET_SHARE:
            break
    return time.perf_counter() - start


def measure_once(width: int, samples: int, threads: int, max_repeats: int) -> Configuration:
    monitor = ChildCpuShareMonitor()
    rows = {}
    for operation in OPERATIONS:
        command = [
            sys.executable, __file__, "--child", operation, "--width", str(width),
            "--samples", str(samples), "--threads", str(threads), "--max-repeats", str(max_repeats),
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows[operation] = json.loads(output.strip().splitlines()[-1])
    return Configuration(width, samples, rows, monitor.other_share())


def measure(width: int, samples: int, threads: int, max_repeats: int, max_wait: float, attempts: int) -> Configuration:
    """Measure one configuration, again after a quiet wait while other processes disturbed it.

    Returns the attempt during which other processes used the least CPU time.
    """
    best: Configuration | None = None
    for attempt in range(1, attempts + 1):
        waited = wait_for_quiet(max_wait)
        configuration = measure_once(width, samples, threads, max_repeats)
        share = configuration.other_share
        print(
            f"  width {width}, {samples} samples, attempt {attempt}: waited {waited:.0f} s, "
            f"analyze {configuration.seconds('analyze'):.2f} s, other processes {format_share(share)}",
            file=sys.stderr,
            flush=True,
        )
        if best is None or (share is not None and (best.other_share is None or share < best.other_share)):
            best = configuration
        if share is None or share < QUIET_SHARE:
            break
    assert best is not None
    best.attempts = attempt
    return best


def megabytes(value: int) -> str:
    return f"{value / 1e6:,.0f}"


def print_time_table(configurations: list[Configuration]) -> None:
    print(
        "| parameters | width | samples | gradient (ms) | HVP retained (ms) | retained in gradients "
        "| build retained (ms) | HVP recompute (ms) | recompute in gradients "
        "| analyze sharpness (s) | HVPs | analyze in gradients | status | other CPU | attempts |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for item in configurations:
        analyze = item.rows["analyze"]
        print(
            f"| {item.parameters:,} | {item.width} | {item.samples} "
            f"| {item.seconds('gradient') * 1e3:.2f} "
            f"| {item.seconds('hvp-retained') * 1e3:.2f} | {item.in_gradients('hvp-retained'):.2f} "
            f"| {item.rows['hvp-retained']['build_seconds'] * 1e3:.2f} "
            f"| {item.seconds('hvp-recompute') * 1e3:.2f} | {item.in_gradients('hvp-recompute'):.2f} "
            f"| {analyze['seconds']:.2f} | {analyze['matvecs']} | {item.in_gradients('analyze'):.0f} "
            f"| {analyze['status']} | {format_share(item.other_share)} | {item.attempts} |"
        )


def print_memory_table(configurations: list[Configuration]) -> None:
    print(
        "| parameters | samples | resident before (MB) | gradient: peak added (MB) "
        "| HVP retained: peak added (MB) | HVP recompute: peak added (MB) "
        "| analyze: peak added (MB) | analyze: peak resident (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for item in configurations:
        rows = item.rows
        print(
            f"| {item.parameters:,} | {item.samples} | {megabytes(rows['gradient']['resident_before'])} "
            f"| {megabytes(rows['gradient']['peak_added'])} | {megabytes(rows['hvp-retained']['peak_added'])} "
            f"| {megabytes(rows['hvp-recompute']['peak_added'])} | {megabytes(rows['analyze']['peak_added'])} "
            f"| {megabytes(rows['analyze']['peak_bytes'])} |"
        )


def log_slope(sizes: list[int], values: list[float]) -> float:
    """Return the least-squares slope of log(value) against log(size)."""
    slope, _ = np.polyfit(np.log(sizes), np.log(values), 1)
    return float(slope)


def print_slopes(configurations: list[Configuration], label: str, size_of) -> None:
    sizes = [size_of(item) for item in configurations]
    print(f"| operation | slope of log(time) against log({label}) | time ratio, largest to smallest {label} ({sizes[-1] / sizes[0]:.0f}x as many) |")
    print("|---|---|---|")
    for operation in OPERATIONS:
        values = [item.seconds(operation) for item in configurations]
        print(f"| {operation} | {log_slope(sizes, values):.2f} | {values[-1] / values[0]:.1f}x |")
    memory = [item.rows["analyze"]["peak_added"] for item in configurations]
    if min(memory) > 0:
        print(f"| analyze: peak memory added | {log_slope(sizes, memory):.2f} | {memory[-1] / memory[0]:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="run the three smallest widths and 256 to 1024 samples, with at most 5 repeats per timing")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads in each child (default 2)")
    parser.add_argument(
        "--max-wait", type=float, default=120.0,
        help="seconds to wait before each configuration for other processes to use under 10%% of the CPUs (default 120)",
    )
    parser.add_argument(
        "--attempts", type=int, default=3,
        help="maximum number of measurements of one configuration, which is measured again while other processes used 10%% or more (default 3)",
    )
    parser.add_argument("--child", choices=OPERATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-repeats", type=int, default=30, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_child(args.child, args.width, args.samples, args.max_repeats)))
        return

    start = time.perf_counter()
    widths = QUICK_PARAMETER_WIDTHS if args.quick else PARAMETER_WIDTHS
    sample_counts = QUICK_SAMPLE_COUNTS if args.quick else SAMPLE_COUNTS
    max_repeats = 5 if args.quick else 30
    print("# Scaling of gradients, HVPs and the sharpness analysis\n")
    print("\n".join(machine_description()))
    print(
        f"- models: tanh MLP {INPUT_FEATURES}-w-w-{NUM_CLASSES}, cross-entropy, synthetic normal inputs and "
        f"random labels; analyze: sharpness only, {LANCZOS_STEPS} Lanczos steps, top_k=1"
    )
    print(
        f"- each configuration waits up to {args.max_wait:g} s for other processes to use under "
        f"{QUIET_SHARE:.0%} of the CPUs, and is measured up to {args.attempts} times until they do"
    )
    print("- peak memory: ru_maxrss of a fresh child process per operation; added = peak minus VmRSS just before the operation")
    sys.stdout.flush()

    total = ChildCpuShareMonitor()
    by_parameters = [measure(width, PARAMETER_SAMPLES, args.threads, max_repeats, args.max_wait, args.attempts) for width in widths]
    reused = {item.width: item for item in by_parameters}
    by_samples = []
    for samples in sample_counts:
        if samples == PARAMETER_SAMPLES and SAMPLE_WIDTH in reused:
            by_samples.append(reused[SAMPLE_WIDTH])
        else:
            by_samples.append(measure(SAMPLE_WIDTH, samples, args.threads, max_repeats, args.max_wait, args.attempts))

    print(f"\n## Growth with parameter count ({PARAMETER_SAMPLES} samples)\n")
    print_time_table(by_parameters)
    print()
    print_memory_table(by_parameters)
    print()
    print_slopes(by_parameters, "parameters", lambda item: item.parameters)

    print(f"\n## Growth with sample count ({count_parameters(SAMPLE_WIDTH):,} parameters, width {SAMPLE_WIDTH})\n")
    print_time_table(by_samples)
    print()
    print_memory_table(by_samples)
    print()
    print_slopes(by_samples, "samples", lambda item: item.samples)

    load = os.getloadavg()
    print(f"\nload average at the end (1, 5, 15 min): {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}")
    print(f"Other processes used {format_share(total.other_share())} of the machine's CPU time during the run.")
    print(f"Total time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
