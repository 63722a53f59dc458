"""Compare stabcheck's Hutchinson trace with PyHessian's ``trace()`` on the digits-mlp fixture.

Both draw Rademacher probes on the same float32 objective (the last checkpoint of
fixtures/digits-mlp, MSE over all 1797 digits). The script prints each estimate with its standard
error, whether the two agree within their combined standard errors, and the wall time per probe.

Run from the repository root: ``python benchmarks/bench_trace.py [--probes 200]``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from pyhessian import hessian

from stabcheck.engine.hvp import HessianOperator
from stabcheck.engine.objective import Objective, builtin_loss
from stabcheck.engine.trace import hutchinson

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "digits-mlp"


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=200, help="probes for each tool (default 200)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")

    checkpoint = max(FIXTURE.glob("step-*.pt"))
    model = load_module(FIXTURE / "model.py").build_model()
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model_state_dict"])
    model.eval()
    inputs, targets = load_module(FIXTURE / "data.py").load_data()

    # Warm up both tools (allocator, thread pool) so that neither pays first-call costs in the timing.
    warm = HessianOperator(Objective(model, inputs, targets, builtin_loss("mse")))
    hutchinson(warm.matvec, warm.dim, num_probes=10, seed=99, dtype=warm.dtype)
    hessian(copy.deepcopy(model), torch.nn.MSELoss(), data=(inputs, targets), cuda=False).trace(maxIter=10, tol=0.0)

    start = time.perf_counter()
    operator = HessianOperator(Objective(model, inputs, targets, builtin_loss("mse")))
    ours = hutchinson(operator.matvec, operator.dim, num_probes=args.probes, seed=0, dtype=operator.dtype)
    ours_seconds = time.perf_counter() - start

    # A different seed, so that the two estimates use different probes and the comparison tests
    # agreement within standard errors (with seed 0 both draw the same Rademacher vectors).
    torch.manual_seed(1)
    start = time.perf_counter()
    peer = hessian(copy.deepcopy(model), torch.nn.MSELoss(), data=(inputs, targets), cuda=False)
    # tol=0 keeps PyHessian from stopping on its running mean, so both use the same probe count.
    samples = np.asarray(peer.trace(maxIter=args.probes, tol=0.0))
    peer_seconds = time.perf_counter() - start
    peer_trace = float(samples.mean())
    peer_stderr = float(samples.std(ddof=1) / math.sqrt(len(samples)))

    combined = math.sqrt(ours.trace_stderr**2 + peer_stderr**2)
    difference = abs(ours.trace - peer_trace)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads")
    print(f"checkpoint: {checkpoint.relative_to(FIXTURE.parents[1])}, {operator.dim:,} parameters, {len(inputs)} samples\n")
    print("| tool | probes | trace | standard error | wall time (s) | time per probe (ms) |")
    print("|---|---|---|---|---|---|")
    print(f"| stabcheck hutchinson | {ours.num_probes} | {ours.trace:.4f} | {ours.trace_stderr:.4f} | {ours_seconds:.2f} | {1000 * ours_seconds / ours.num_probes:.2f} |")
    print(f"| PyHessian trace() | {len(samples)} | {peer_trace:.4f} | {peer_stderr:.4f} | {peer_seconds:.2f} | {1000 * peer_seconds / len(samples):.2f} |")
    print(
        f"\ndifference {difference:.4f} = {difference / combined:.2f} combined standard errors "
        f"({'agree' if difference <= 3 * combined else 'DISAGREE'} at 3 standard errors)"
    )
    print(f"stabcheck Frobenius norm: {ours.frobenius_norm:.4f} +/- {ours.frobenius_stderr:.4f}")


if __name__ == "__main__":
    main()
