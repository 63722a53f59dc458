"""The shipped fixtures: real training runs that reach the edge of stability."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

from stabcheck.analyzers.base import EstimatorSettings
from stabcheck.api import analyze
from stabcheck.engine.hvp import HessianOperator
from stabcheck.engine.objective import Objective, builtin_loss
from stabcheck.loading.checkpoint import load_checkpoint

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"fixture_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fixture(name: str):
    folder = FIXTURES / name
    model = load_module(folder / "model.py").build_model()
    data = load_module(folder / "data.py").load_data()
    checkpoints = sorted(folder.glob("step-*.pt"))
    return model, data, checkpoints


def edge_ratios(name: str, checkpoints: list[Path]) -> list[float]:
    model, data, _ = fixture(name)
    report = analyze(
        model,
        data,
        checkpoints=checkpoints,
        loss="mse",
        estimator=EstimatorSettings(top_k=1, lanczos_max_iter=60),
    )
    assert [entry["step"] for entry in report.checkpoints] == sorted(entry["step"] for entry in report.checkpoints)
    ratios = []
    for entry in report.results:
        result = entry["analyzers"]["sharpness"]
        assert result["status"] == "ok", result["notes"]
        ratios.append(result["metrics"]["edge_ratio"])
    return ratios


def test_gradient_descent_fixture_reaches_the_edge():
    _, _, checkpoints = fixture("digits-mlp")
    assert len(checkpoints) >= 5
    first, *_, last = edge_ratios("digits-mlp", [checkpoints[0], checkpoints[-2], checkpoints[-1]])
    assert first < 0.5
    assert 0.9 <= last <= 1.1


def test_adam_fixture_reaches_the_preconditioned_edge():
    _, _, checkpoints = fixture("digits-adam")
    first, last = edge_ratios("digits-adam", [checkpoints[0], checkpoints[-1]])
    assert first < 0.5
    assert 0.9 <= last <= 1.1


def test_fixture_sharpness_matches_arpack():
    """Check Lanczos against SciPy's ARPACK on the same float64 Hessian-vector products."""
    model, (inputs, targets), checkpoints = fixture("digits-mlp")
    model.load_state_dict(load_checkpoint(checkpoints[-1]).weights)
    operator = HessianOperator(Objective(model, inputs, targets, builtin_loss("mse"), dtype=torch.float64))
    linear_operator = LinearOperator(
        (operator.dim, operator.dim),
        matvec=lambda v: operator.matvec(torch.from_numpy(np.ascontiguousarray(v).reshape(-1))).numpy(),
        dtype=np.float64,
    )
    start = np.random.default_rng(0).standard_normal(operator.dim)
    reference = float(eigsh(linear_operator, k=1, which="LA", tol=1e-10, v0=start, return_eigenvectors=False)[0])

    report = analyze(model, (inputs, targets), loss="mse", dtype="float64", estimator=EstimatorSettings(top_k=1, lanczos_tol=1e-8, lanczos_max_iter=150))
    metrics = report.results[0]["analyzers"]["sharpness"]["metrics"]
    assert metrics["lambda_max"] == pytest.approx(reference, rel=1e-6)
