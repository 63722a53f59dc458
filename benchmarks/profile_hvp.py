"""Split the time of one gradient and one retained HVP into matrix products and everything else.

The model is the tanh MLP 64-w-w-10 of ``bench_scaling.py`` with cross-entropy on 512 synthetic
examples. For a layer with weight W, a gradient needs three products of W's size (forward, the
weight gradient, the input gradient). An exact HVP by differentiating the gradient graph again
needs six, so the products alone set a floor of about 2 gradients per HVP. The script
times both operations (median of 15 calls) and runs torch.profiler over 5 calls of each, then
prints the time in ``aten::mm`` and ``aten::addmm`` against the rest, and the largest other ops.

Run from the repository root: ``python benchmarks/profile_hvp.py [--width 960] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch.profiler import profile

from stabcheck.engine.hvp import HessianOperator
from stabcheck.engine.objective import Objective, builtin_loss

MATRIX_PRODUCTS = ("aten::mm", "aten::addmm")


def median_seconds(function, calls: int = 15) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return sorted(times)[calls // 2]


def profile_split(function, calls: int = 5) -> tuple[float, float, list[tuple[str, float]]]:
    """Return seconds per call in matrix products, in other ops, and the three largest other ops."""
    with profile() as recorder:
        for _ in range(calls):
            function()
    events = recorder.key_averages()
    # Self times, so that nested ops are counted once.
    products = sum(event.self_cpu_time_total for event in events if event.key in MATRIX_PRODUCTS)
    total = sum(event.self_cpu_time_total for event in events)
    others = sorted(
        ((event.key, event.self_cpu_time_total) for event in events if event.key not in MATRIX_PRODUCTS),
        key=lambda item: -item[1],
    )
    scale = 1e-6 / calls
    return products * scale, (total - products) * scale, [(name, value * scale) for name, value in others[:3]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=960, help="hidden width w (default 960, about 1e6 parameters)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")

    torch.manual_seed(0)
    width = args.width
    model = torch.nn.Sequential(
        torch.nn.Linear(64, width), torch.nn.Tanh(), torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 10)
    )
    inputs = torch.randn(512, 64)
    labels = torch.randint(0, 10, (512,))
    objective = Objective(model, inputs, labels, builtin_loss("cross_entropy"))
    operator = HessianOperator(objective)
    vector = torch.randn(operator.dim)
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    names = [name for name, _ in model.named_parameters()]

    def gradient():
        output = torch.func.functional_call(model, dict(zip(names, params)), (inputs,))
        return torch.autograd.grad(torch.nn.functional.cross_entropy(output, labels), params)

    def product():
        return operator.matvec(vector)

    for _ in range(3):
        gradient()
        product()
    gradient_seconds = median_seconds(gradient)
    product_seconds = median_seconds(product)
    print(f"MLP 64-{width}-{width}-10, {operator.dim:,} parameters, 512 examples, {args.threads} threads")
    print(f"median: gradient {gradient_seconds * 1e3:.2f} ms, HVP {product_seconds * 1e3:.2f} ms, HVP in gradients {product_seconds / gradient_seconds:.2f}\n")
    print("| operation | matrix products (ms) | other ops (ms) | largest other ops (ms) |")
    print("|---|---|---|---|")
    split = {}
    for label, function in (("gradient", gradient), ("HVP", product)):
        products, others, largest = profile_split(function)
        split[label] = products
        listed = ", ".join(f"{name} {value * 1e3:.2f}" for name, value in largest)
        print(f"| {label} | {products * 1e3:.2f} | {others * 1e3:.2f} | {listed} |")
    print(f"\nmatrix products of one HVP over those of one gradient: {split['HVP'] / split['gradient']:.2f}")


if __name__ == "__main__":
    main()
