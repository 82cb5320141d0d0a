"""benchmark.py: the time-to-accuracy rule, and one small end-to-end run through the real training command."""
import json
import sys

import pytest

import benchmark
from conftest import DEVICE


def run(epochs, seed, acc, secs):
    return {"epochs": epochs, "seed": seed, "test_accuracy": acc, "training_seconds": secs,
            "images_per_second": 1000.0}


def test_time_to_a_mark_is_the_shortest_budget_whose_mean_reaches_it():
    runs = [run(1, 0, 0.991, 10), run(1, 1, 0.987, 12),   # mean 98.9%: does not reach 99.0%
            run(3, 0, 0.993, 30), run(3, 1, 0.992, 32)]   # mean 99.25%
    s = benchmark.summarise("simple", runs, [0.99, 0.995])
    assert s["time_to"] == {"99.0%": 31, "99.5%": None}
    first = s["budgets"][0]
    assert first["epochs"] == 1 and first["test_accuracy_mean"] == pytest.approx(0.989)
    assert first["test_accuracy_std"] == pytest.approx(0.0028284, abs=1e-6)


@pytest.mark.slow
def test_a_small_benchmark_writes_json_and_markdown(tmp_path, monkeypatch, python):
    monkeypatch.setattr(sys, "executable", python)  # its training runs through the warm `python` (conftest)
    code = benchmark.main(["--models", "tiny", "--epochs", "1", "--seeds", "2", "--no_baseline", "--device", DEVICE,
                           "--extra", "--train_subset 6000", "--save_dir", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "benchmark.json").read_text())
    (tiny,) = result["models"]
    assert [r["seed"] for r in tiny["runs"]] == [0, 1]
    assert all(0.8 < r["test_accuracy"] < 1 and r["training_seconds"] > 0 for r in tiny["runs"])
    assert tiny["inference"]["latency_ms_batch1"] > 0
    table = (tmp_path / "benchmark.md").read_text()
    assert "| tiny | 1 | 2 |" in table and result["machine"]["cpu_cores"] >= 1
