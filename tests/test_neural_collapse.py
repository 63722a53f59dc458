"""Neural-collapse metrics against hand-computed cases and a plain numpy reference."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from stabcheck.analyzers.base import EstimatorSettings
from stabcheck.api import analyze
from stabcheck.errors import DataError, UsageError


def feature_model(classifier_weight, bias=None):
    """A model whose penultimate features are its inputs: Identity, then a Linear classifier."""
    classes, dim = classifier_weight.shape
    head = nn.Linear(dim, classes, bias=bias is not None).double()
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(classifier_weight, dtype=torch.float64))
        if bias is not None:
            head.bias.copy_(torch.as_tensor(bias, dtype=torch.float64))
    return nn.Sequential(nn.Identity(), head)


def run(model, features, labels, **settings):
    report = analyze(
        model,
        (torch.as_tensor(features, dtype=torch.float64), torch.as_tensor(labels)),
        analyzers=["neural-collapse"],
        dtype="float64",
        estimator=EstimatorSettings(**settings),
    )
    return report.results[0]["analyzers"]["neural-collapse"]


def simplex_etf(classes, dim):
    """C unit vectors in ``dim`` dimensions with pairwise cosine -1/(C-1)."""
    frame = np.eye(classes) - 1.0 / classes
    frame /= np.linalg.norm(frame, axis=1, keepdims=True)
    embedded = np.zeros((classes, dim))
    embedded[:, :classes] = frame
    rotation, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((dim, dim)))
    return embedded @ rotation.T


def test_exact_simplex_etf_gives_zero():
    means = 3.0 * simplex_etf(4, 6)
    features = np.repeat(means, 5, axis=0)
    labels = np.repeat(np.arange(4), 5)
    result = run(feature_model(means), features, labels)
    metrics = result["metrics"]
    assert result["status"] == "ok"
    for name in ("nc1", "nc2_equinorm", "nc2_equiangularity", "nc2_etf_error", "nc3_self_duality"):
        assert abs(metrics[name]) <= 1e-10, name
    assert metrics["nc4_ncc_mismatch"] == 0.0
    assert metrics["feature_layer"] == "1"


def test_two_classes_on_a_line():
    """Means (-1, 0) and (1, 0), spread s along x: Sigma_W = diag(s^2, 0), Sigma_B = diag(1, 0)."""
    s = 0.3
    features = [[-1 - s, 0], [-1 + s, 0], [1 - s, 0], [1 + s, 0]]
    labels = [0, 0, 1, 1]
    result = run(feature_model(np.array([[-1.0, 0.0], [1.0, 0.0]])), features, labels)
    assert result["metrics"]["nc1"] == pytest.approx(s**2 / 2, rel=1e-12)
    assert result["metrics"]["nc2_equinorm"] == pytest.approx(0.0, abs=1e-15)


def test_three_classes_in_the_plane():
    """Unit means at 120 degrees with offsets (+-t, 0), (0, +-t): Sigma_W = t^2/2 I, Sigma_B = I/2."""
    t = 0.2
    angles = [0.0, 2 * math.pi / 3, 4 * math.pi / 3]
    means = np.array([[math.cos(a), math.sin(a)] for a in angles])
    offsets = np.array([[t, 0], [-t, 0], [0, t], [0, -t]])
    features = np.concatenate([mean + offsets for mean in means])
    labels = np.repeat(np.arange(3), 4)
    result = run(feature_model(means), features, labels)
    assert result["metrics"]["nc1"] == pytest.approx(2 * t**2 / 3, rel=1e-12)
    assert result["metrics"]["nc2_equiangularity"] == pytest.approx(0.0, abs=1e-12)


def test_rank_cut_keeps_nc1_positive():
    """Three classes whose means span a plane in 4-D, far from the origin, in float32.

    A float32 computation with an unrestricted pseudo-inverse turns the round-off eigenvalues
    of Sigma_B outside that plane into a large negative NC1. Cutting at rank C - 1 does not.
    """
    rng = np.random.default_rng(0)
    base = np.array([[1, 0, 0, 0], [-0.5, math.sqrt(3) / 2, 0, 0], [-0.5, -math.sqrt(3) / 2, 0, 0]]) + np.array([50.0, 20.0, 3.0, 1.0])
    features = np.concatenate([base[c] + 0.05 * rng.standard_normal((20, 4)) for c in range(3)]).astype(np.float32)
    labels = np.repeat(np.arange(3), 20)

    means32 = np.stack([features[labels == c].mean(0) for c in range(3)]).astype(np.float32)
    centered32 = (means32 - means32.mean(0)).astype(np.float32)
    between32 = (centered32.T @ centered32 / np.float32(3)).astype(np.float32)
    deviations32 = (features - means32[labels]).astype(np.float32)
    within32 = (deviations32.T @ deviations32 / np.float32(60)).astype(np.float32)
    naive = float(np.trace(within32 @ np.linalg.pinv(between32, rcond=1e-12)) / 3)
    assert naive < 0

    reference = numpy_reference(features.astype(np.float64), labels, np.eye(3, 4))["nc1"]
    result = run(feature_model(np.eye(3, 4)), features.astype(np.float64), labels)
    assert result["metrics"]["nc1"] >= 0
    assert result["metrics"]["nc1"] == pytest.approx(reference, rel=1e-8)


def numpy_reference(features, labels, weights):
    """NC1 to NC3 as defined, written directly in numpy, in float64."""
    classes = weights.shape[0]
    means = np.stack([features[labels == c].mean(0) for c in range(classes)])
    global_mean = means.mean(0)
    centered = means - global_mean
    deviations = features - means[labels]
    within = deviations.T @ deviations / len(features)
    between = centered.T @ centered / classes
    values, vectors = np.linalg.eigh(between)
    values, vectors = values[-(classes - 1) :], vectors[:, -(classes - 1) :]
    pinv = vectors @ np.diag(1 / values) @ vectors.T
    norms = np.linalg.norm(centered, axis=1)
    unit = centered / norms[:, None]
    cosines = unit @ unit.T
    pairs = ~np.eye(classes, dtype=bool)
    gram = centered @ centered.T
    simplex = np.eye(classes) - 1 / classes
    return {
        "nc1": np.trace(within @ pinv) / classes,
        "nc2_equinorm": norms.std() / norms.mean(),
        "nc2_equiangularity": np.abs(cosines[pairs] + 1 / (classes - 1)).mean(),
        "nc2_etf_error": np.linalg.norm(gram / np.linalg.norm(gram) - simplex / np.linalg.norm(simplex)),
        "nc3_self_duality": np.linalg.norm(weights / np.linalg.norm(weights) - centered / np.linalg.norm(centered)) ** 2,
        "means": means,
    }


def test_random_features_match_numpy_reference():
    rng = np.random.default_rng(4)
    classes, dim = 5, 8
    labels = np.concatenate([np.arange(classes), rng.integers(0, classes, 295)])
    features = rng.standard_normal((300, dim)) + 2 * rng.standard_normal((classes, dim))[labels]
    weights = rng.standard_normal((classes, dim))
    bias = rng.standard_normal(classes)
    result = run(feature_model(weights, bias), features, labels)
    reference = numpy_reference(features, labels, weights)
    for name in ("nc1", "nc2_equinorm", "nc2_equiangularity", "nc2_etf_error", "nc3_self_duality"):
        assert result["metrics"][name] == pytest.approx(reference[name], rel=1e-10, abs=1e-12), name
    predicted = (features @ weights.T + bias).argmax(1)
    nearest = np.linalg.norm(features[:, None, :] - reference["means"][None], axis=2).argmin(1)
    assert result["metrics"]["nc4_ncc_mismatch"] == pytest.approx(float((predicted != nearest).mean()))
    assert result["diagnostics"]["class_counts"] == {str(c): int((labels == c).sum()) for c in range(classes)}


def test_missing_class_is_an_error_naming_it():
    features = np.random.default_rng(0).standard_normal((6, 3))
    with pytest.raises(DataError, match=r"class\(es\) 2 of the 4 classes have no samples"):
        run(feature_model(np.eye(4, 3)), features, [0, 0, 1, 1, 3, 3])


def test_single_sample_class_is_flagged():
    features = np.random.default_rng(0).standard_normal((5, 3))
    result = run(feature_model(np.eye(3, 3)), features, [0, 0, 1, 1, 2])
    assert result["status"] == "ok"
    assert any("class(es) 2 have one sample" in note for note in result["notes"])


def test_low_dimension_skips_etf_metrics():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(5), 4)
    features = rng.standard_normal((20, 2)) + 3 * rng.standard_normal((5, 2))[labels]
    result = run(feature_model(rng.standard_normal((5, 2))), features, labels)
    assert result["metrics"]["nc2_equiangularity"] is None
    assert result["metrics"]["nc2_etf_error"] is None
    assert result["metrics"]["nc1"] is not None
    assert any("simplex ETF" in note for note in result["notes"])


def test_unknown_feature_layer_lists_linear_modules():
    features = np.random.default_rng(0).standard_normal((6, 3))
    with pytest.raises(UsageError, match="Linear modules: 1"):
        run(feature_model(np.eye(3, 3)), features, [0, 0, 1, 1, 2, 2], feature_layer="head")


def test_digits_fixture_nc1_falls_in_terminal_phase():
    """The fixture script computed the same NC1 values with its own numpy code."""
    from pathlib import Path

    from test_fixtures import load_module

    folder = Path(__file__).resolve().parent.parent / "fixtures" / "digits-neural-collapse"
    model = load_module(folder / "model.py").build_model()
    data = load_module(folder / "data.py").load_data()
    report = analyze(model, data, checkpoints=sorted(folder.glob("epoch-*.pt")), analyzers=["neural-collapse"], dtype="float64")
    metrics = [entry["analyzers"]["neural-collapse"]["metrics"] for entry in report.results]
    nc1 = [m["nc1"] for m in metrics]
    assert len(nc1) == 6
    assert all(later < earlier for earlier, later in zip(nc1, nc1[1:]))
    assert nc1[0] == pytest.approx(0.3261, abs=1e-4)
    assert nc1[-1] == pytest.approx(0.2603, abs=1e-4)
    assert metrics[-1]["nc4_ncc_mismatch"] == 0.0
    assert metrics[0]["feature_layer"] == metrics[-1]["feature_layer"]
