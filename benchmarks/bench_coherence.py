"""Cost of the gradient-coherence analyzer in batch gradients, and its peak memory at 20M parameters.

Part 1 runs on the first 512 digits of fixtures/digits-true-labels (epoch-01.pt, cross-entropy,
26,122 parameters). It times one batch gradient, a loop of single-example backward passes, one
plain vmap over all examples, the engine's gradient sums (layer rule, per-class sums) and the
whole analyzer (sums, GSNR, per-layer values and the opposing-signal search). Each time is the
fastest of several repeats, reported as a multiple of the batch gradient.

Part 2 runs the gradient sums on a 21-million-parameter MLP over 512 random examples with an
8 GB memory budget, once with the layer rule and once with vmap for every parameter, each in a
fresh process. It reports the peak resident memory that the call added and, with the layer
rule, the time of the whole analyzer as well.

Run from the repository root: ``python benchmarks/bench_coherence.py [--threads 2]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from stabcheck.analyzers.base import AnalysisContext, EstimatorSettings
from stabcheck.analyzers.gradient_coherence import GradientCoherenceAnalyzer
from stabcheck.engine.objective import Objective, builtin_loss
from stabcheck.engine.per_example import gradient_sums, per_example_gradients
from stabcheck.loading.data import materialize
from stabcheck.loading.optimizer import TrainingSettings

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "digits-true-labels"
NUM_EXAMPLES = 512
LARGE_WIDTHS = (64, 4096, 4096, 1024, 10)
LARGE_BUDGET = 8 * 1000**3


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fastest(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def digits_costs(repeats: int) -> None:
    model = load_module(FIXTURE / "model.py").build_model()
    model.load_state_dict(torch.load(FIXTURE / "epoch-01.pt", weights_only=True)["state_dict"])
    inputs, labels = load_module(FIXTURE / "data.py").load_data(NUM_EXAMPLES)
    data = materialize((inputs, labels), max_samples=None)
    objective = Objective(model, data.inputs, data.targets, builtin_loss("cross_entropy"))
    params = {name: p.detach().requires_grad_(True) for name, p in objective.point.items()}
    every = torch.arange(NUM_EXAMPLES)

    def batch_gradient():
        total = objective.per_example_losses(params, objective.inputs, objective.targets).sum()
        torch.autograd.grad(total, list(params.values()))

    def analyzer():
        context = AnalysisContext(
            model=model, objective=objective, data=data, training=TrainingSettings(),
            estimator=EstimatorSettings(), seed=0,
        )
        GradientCoherenceAnalyzer().run(context)

    base = fastest(batch_gradient, 10 * repeats)
    rows = [
        ("batch gradient", base),
        ("loop of single-example backward passes", fastest(lambda: per_example_gradients(objective, every, method="loop"), 1)),
        ("plain vmap over all examples", fastest(lambda: per_example_gradients(objective, every, method="vmap"), repeats)),
        ("gradient sums, per-class sums included", fastest(lambda: gradient_sums(objective, groups=data.labels), repeats)),
        ("gradient-coherence analyzer", fastest(analyzer, repeats)),
    ]
    print(f"digits MLP, {objective.dim:,} parameters, {NUM_EXAMPLES} examples, {torch.get_num_threads()} threads")
    print("| computation | time (ms) | batch gradients |")
    print("|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds * 1e3:.2f} | {seconds / base:.1f} |")


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def large_child(method: str) -> None:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(LARGE_WIDTHS[:-1], LARGE_WIDTHS[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(NUM_EXAMPLES, LARGE_WIDTHS[0], generator=generator)
    labels = torch.randint(0, LARGE_WIDTHS[-1], (NUM_EXAMPLES,), generator=generator)
    objective = Objective(model, inputs, labels, builtin_loss("cross_entropy"))
    params = {name: p.detach().requires_grad_(True) for name, p in objective.point.items()}

    def batch_gradient():
        total = objective.per_example_losses(params, objective.inputs, objective.targets).sum()
        torch.autograd.grad(total, list(params.values()))

    gradient_seconds = fastest(batch_gradient, 3)
    before = resident_bytes()
    start = time.perf_counter()
    sums = gradient_sums(objective, groups=labels, method=method, memory_budget=LARGE_BUDGET)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    analyzer_seconds = None
    if method == "auto":
        data = materialize((inputs, labels), max_samples=None)
        context = AnalysisContext(
            model=model, objective=objective, data=data, training=TrainingSettings(),
            estimator=EstimatorSettings(), seed=0, memory_budget=LARGE_BUDGET,
        )
        start = time.perf_counter()
        GradientCoherenceAnalyzer().run(context)
        analyzer_seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "method": method,
                "parameters": objective.dim,
                "seconds": seconds,
                "batch_gradients": seconds / gradient_seconds,
                "analyzer_batch_gradients": None if analyzer_seconds is None else analyzer_seconds / gradient_seconds,
                "chunk_size": sums.chunk_size,
                "num_chunks": sums.num_chunks,
                "resident_before": before,
                "peak_added": peak - before,
                "m_coherence": float(sums.sum_gradient.pow(2).sum() / sums.sq_norms.sum()),
            }
        )
    )


def large_costs(threads: int) -> None:
    print(f"\nMLP {'-'.join(map(str, LARGE_WIDTHS))}, {NUM_EXAMPLES} random examples, budget {LARGE_BUDGET / 1e9:.0f} GB")
    print("| method | parameters | time (s) | batch gradients | chunk size | chunks | peak memory added (GB) | m_coherence | whole analyzer (batch gradients) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method in ("auto", "vmap"):
        output = subprocess.run(
            [sys.executable, __file__, "--child", method, "--threads", str(threads)],
            check=True, capture_output=True, text=True,
        ).stdout
        row = json.loads(output.strip().splitlines()[-1])
        print(
            f"| {method} | {row['parameters']:,} | {row['seconds']:.1f} | {row['batch_gradients']:.1f} "
            f"| {row['chunk_size']} | {row['num_chunks']} "
            f"| {row['peak_added'] / 1e9:.2f} | {row['m_coherence']:.6f} "
            f"| {'not run' if row['analyzer_batch_gradients'] is None else format(row['analyzer_batch_gradients'], '.1f')} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=20, help="repeats per timing; the fastest counts (default 20)")
    parser.add_argument("--child", choices=("auto", "vmap"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        large_child(args.child)
        return
    print(f"machine: {platform.processor() or platform.machine()}, {platform.platform()}, torch {torch.__version__}")
    digits_costs(args.repeats)
    large_costs(args.threads)


if __name__ == "__main__":
    main()
