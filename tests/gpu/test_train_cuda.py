"""Training on CUDA end to end through the CLI, on each backend that runs there: the run
learns, its checkpoint reloads on CPU and reproduces the metrics written on the GPU."""
from __future__ import annotations

import json

import pytest

from gloro_fast import cli
from gloro_fast.data import load_dataset, make_loaders
from gloro_fast.train import evaluate, load_checkpoint
from tests.gpu.gpu_env import CUDA_BACKENDS, backend, requires_cuda

pytestmark = requires_cuda


@pytest.mark.parametrize("name", CUDA_BACKENDS)
def test_cli_train_on_cuda(name, tmp_path):
    with backend(name):
        code = cli.main(["train", "--epochs", "2", "--warmup", "1", "--device", "cuda", "--no-progress",
                         "--output-dir", str(tmp_path)])
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["clean_accuracy"] > 0.5  # as the CPU run in test_train_cli
    assert 0.0 <= metrics["vra"] <= metrics["clean_accuracy"]
    model = load_checkpoint(tmp_path / "model.pt")  # onto the CPU
    _, test_set, _ = load_dataset("mnist-sample", seed=0)
    again = evaluate(model, make_loaders(test_set, test_set, 500)[1])
    for key in ("clean_accuracy", "vra", "rejection_rate"):
        # another device rounds differently: a handful of the 1,000 points may flip
        assert again[key] == pytest.approx(metrics[key], abs=5e-3), key
    assert again["lipschitz"] == pytest.approx(metrics["lipschitz"], rel=1e-4)
