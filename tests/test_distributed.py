"""Two CPU processes (gloo on 127.0.0.1) against one process: same metrics to 1e-6 relative."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stabcheck.cli import app
from stabcheck.engine.distributed import shard_bounds
from toy_project import write_toy_project

ALL_ANALYZERS = "sharpness,hessian-trace,gradient-coherence,lmc,softmax-collapse,neural-collapse"
RTOL = 1e-6
# Absolute floor for values near 0, such as a barrier or a zero share.
ATOL = 1e-9
# Diagnostics that describe one process's own work, not the analysis set.
PER_RANK_DIAGNOSTICS = ("chunk_size", "num_chunks", "bytes_per_example")
LAUNCH_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_environment() -> dict[str, str]:
    environment = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        environment.pop(name, None)
    return environment


def launch_ranks(arguments: list[str], world_size: int = 2, timeout: float = LAUNCH_TIMEOUT_S) -> list[tuple[int, str, str]]:
    """Start one `python -m stabcheck` per rank, again on a new port if the first was taken meanwhile.

    free_port() releases the port before rank 0 binds it, so another process can take it in
    between; only that failure is retried.
    """
    outcomes = _launch_once(arguments, world_size, timeout)
    if any("address already in use" in stderr.lower() for _, _, stderr in outcomes):
        outcomes = _launch_once(arguments, world_size, timeout)
    return outcomes


def _launch_once(arguments: list[str], world_size: int, timeout: float) -> list[tuple[int, str, str]]:
    """Start one `python -m stabcheck` per rank with the variables torchrun would set."""
    port = str(free_port())
    processes = []
    for rank in range(world_size):
        environment = base_environment()
        environment.update(MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "stabcheck", *arguments],
                env=environment,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outcomes = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=timeout)
            outcomes.append((process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return outcomes


def numeric_leaves(value, path=""):
    """Yield (path, value) for every number in a JSON tree, and (path, value) for other scalars."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from numeric_leaves(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from numeric_leaves(item, f"{path}[{index}]")
    else:
        yield path, value


def largest_differences(distributed: dict, single: dict, section: str) -> dict[str, tuple[float, str]]:
    """Compare one section of every analyzer's result; return the largest relative difference per analyzer.

    Numbers must agree to RTOL relative (ATOL near 0); every other value must be equal.
    """
    largest: dict[str, tuple[float, str]] = {}
    for result_d, result_s in zip(distributed["results"], single["results"], strict=True):
        assert result_d["analyzers"].keys() == result_s["analyzers"].keys()
        for analyzer_id, expected in result_s["analyzers"].items():
            actual = result_d["analyzers"][analyzer_id]
            assert actual["status"] == expected["status"], analyzer_id
            got = dict(numeric_leaves(actual[section]))
            for path, want in numeric_leaves(expected[section]):
                if path.rsplit(".", 1)[-1] in PER_RANK_DIAGNOSTICS:
                    continue
                where = f"{analyzer_id}{path}"
                assert path in got, f"{where} is missing from the distributed report"
                value = got[path]
                if isinstance(want, (int, float)) and not isinstance(want, bool) and value is not None:
                    assert value == pytest.approx(want, rel=RTOL, abs=ATOL), where
                    relative = abs(value - want) / max(abs(want), ATOL)
                    if relative >= largest.get(analyzer_id, (-1.0, ""))[0]:
                        largest[analyzer_id] = (relative, path)
                else:
                    assert value == want, where
    return largest


@pytest.fixture(scope="module")
def batchnorm_runs(tmp_path_factory):
    """One two-rank run and one single-process run of every analyzer on a BatchNorm model."""
    folder = tmp_path_factory.mktemp("distributed")
    first = write_toy_project(folder / "a", model="build_bn_model", steps=30)
    second = write_toy_project(folder / "b", model="build_bn_model", steps=5)
    # 301 examples: uneven shards (151 and 150) and two BatchNorm batches (256 and 45).
    arguments = [
        "analyze", str(first.checkpoint),
        "--model", first.spec("build_bn_model"), "--data", first.spec("load_data"),
        "--data-kwargs", '{"num_samples": 301}', "--dtype", "float64", "--weight-decay", "0.01",
        "--lmc-with", str(second.checkpoint), "--lmc-points", "5", "--analyzers", ALL_ANALYZERS,
    ]
    ranks = launch_ranks([*arguments, "--json", str(folder / "two.json")])
    single = CliRunner().invoke(app, [*arguments, "--json", str(folder / "one.json"), "--quiet"])
    assert single.exit_code == 0, single.output
    for rank, (code, _, stderr) in enumerate(ranks):
        assert code == 0, f"rank {rank}: {stderr}"
    return {
        "ranks": ranks,
        "distributed": json.loads((folder / "two.json").read_text()),
        "single": json.loads((folder / "one.json").read_text()),
    }


def test_shard_bounds_cover_set_in_order():
    bounds = [shard_bounds(7, rank, 3) for rank in range(3)]
    assert bounds == [(0, 3), (3, 5), (5, 7)]


def test_shard_bounds_even_split():
    assert [shard_bounds(6, rank, 2) for rank in range(2)] == [(0, 3), (3, 6)]


def test_two_ranks_metrics_match_one_process(batchnorm_runs):
    largest = largest_differences(batchnorm_runs["distributed"], batchnorm_runs["single"], "metrics")
    print("largest relative difference per analyzer (metrics):", largest)
    assert set(largest) == set(ALL_ANALYZERS.split(","))


def test_two_ranks_diagnostics_match_one_process(batchnorm_runs):
    largest_differences(batchnorm_runs["distributed"], batchnorm_runs["single"], "diagnostics")


def test_report_counts_every_rank_examples(batchnorm_runs):
    document = batchnorm_runs["distributed"]
    assert document["data"]["num_samples"] == 301
    coherence = document["results"][0]["analyzers"]["gradient-coherence"]
    assert coherence["metrics"]["num_examples"] == 301
    assert document["run"]["world_size"] == 2
    assert document["run"]["backend"] == "gloo"
    assert batchnorm_runs["single"]["run"]["world_size"] == 1


def test_only_rank_zero_prints_summary(batchnorm_runs):
    (code_0, stdout_0, _), (code_1, stdout_1, _) = batchnorm_runs["ranks"]
    assert code_0 == batchnorm_runs["distributed"]["exit_code"]
    assert code_1 == 0
    assert "verdict:" in stdout_0
    assert stdout_1 == ""


def test_torchrun_prints_one_json_report(tmp_path):
    project = write_toy_project(tmp_path / "toy")
    arguments = [
        "analyze", str(project.checkpoint), "--model", project.spec("build_model"),
        "--data", project.spec("load_data"), "--max-samples", "95", "--dtype", "float64",
        "--analyzers", "sharpness,gradient-coherence,softmax-collapse,neural-collapse",
    ]
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "stabcheck",
    ]
    completed = subprocess.run(
        [*launcher, *arguments, "--json", "-"],
        env=base_environment(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
    )
    assert completed.returncode == 0, completed.stderr
    # Rank 0 alone writes the report, so stdout contains exactly one JSON document.
    distributed = json.loads(completed.stdout)
    single = CliRunner().invoke(app, [*arguments, "--json", str(tmp_path / "one.json"), "--quiet"])
    assert single.exit_code == 0, single.output
    largest = largest_differences(distributed, json.loads((tmp_path / "one.json").read_text()), "metrics")
    print("largest relative difference per analyzer (torchrun, metrics):", largest)
    assert distributed["data"]["num_samples"] == 95


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [("--model-mode", "train-bn-batch-stats", "--model-mode"), ("--lanczos-iters", "1", "--lanczos-iters")],
)
def test_bad_option_exits_2_on_every_rank(tmp_path, option, value, named):
    project = write_toy_project(tmp_path / "toy", steps=1)
    arguments = [
        "analyze", str(project.checkpoint), "--model", project.spec("build_model"),
        "--data", project.spec("load_data"), "--json", str(tmp_path / "r.json"), option, value,
    ]
    outcomes = launch_ranks(arguments, timeout=60)
    assert [code for code, _, _ in outcomes] == [2, 2], outcomes
    assert named in outcomes[0][2]
    assert outcomes[1][2] == ""
    assert not Path(tmp_path / "r.json").exists()
