"""``gloro-fast certify`` / ``info`` print both certificates and the per-layer bracket;
``evaluate`` decides both in one pass and never modifies the model (threads included)."""
from __future__ import annotations

import json
import threading

import pytest
import torch

from gloro_fast import cli
from gloro_fast.data import load_dataset, make_loaders
from gloro_fast.train import evaluate, load_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert cli.main(["train", "--epochs", "1", "--no-progress", "--output-dir", str(out)]) == 0
    return out / "model.pt"


@pytest.fixture(scope="module")
def test_split():
    _, test_set, _ = load_dataset("mnist-sample", seed=0, split="test")
    return test_set


def test_certify_prints_both_certificates_and_brackets(checkpoint, capsys):
    assert cli.main(["certify", str(checkpoint), "--dataset", "mnist-sample"]) == 0
    out = capsys.readouterr().out
    assert "VRA sound" in out and "VRA estimate" in out and "clean accuracy" in out
    rows = [line for line in out.splitlines() if line.startswith("body.")]
    assert [r.split()[:2] for r in rows] == [
        ["body.0", "Conv2d"], ["body.1", "MinMax"], ["body.2", "Conv2d"], ["body.3", "MinMax"],
        ["body.4", "Flatten"], ["body.5", "Linear"], ["body.6", "MinMax"]]
    for row in rows:
        lower, upper = float(row.split()[2]), float(row.split()[3])
        assert 0 < lower <= upper
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["certificate"] == "sound" and metrics["vra"] == metrics["vra_sound"]
    assert metrics["vra_sound"] <= metrics["vra_estimate"] + 0.01
    assert metrics["lipschitz_sound"] >= metrics["lipschitz_estimate"]
    assert cli.main(["certify", str(checkpoint), "--dataset", "mnist-sample", "--certificate", "estimate"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["certificate"] == "estimate" and metrics["vra"] == metrics["vra_estimate"]


def test_certify_rejects_an_unknown_certificate(checkpoint, capsys):
    assert cli.main(["certify", str(checkpoint), "--certificate", "optimistic"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "certificate" in err[0]


def test_info(checkpoint, capsys):
    assert cli.main(["info", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "GloroNet(" in out and "backend" in out and "power_iteration_conv" in out
    k_sound = float(next(ln for ln in out.splitlines() if ln.startswith("K sound")).split(":")[1])
    k_est = float(next(ln for ln in out.splitlines() if ln.startswith("K estimate")).split(":")[1].split()[0])
    assert k_sound >= k_est > 0
    model = load_checkpoint(checkpoint)
    assert k_sound == pytest.approx(model.sound_bounds().lipschitz, rel=1e-5)
    assert sum(line.startswith("body.") for line in out.splitlines()) == 7


def test_info_on_a_missing_file(tmp_path, capsys):
    assert cli.main(["info", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gloro-fast: error: ")


def test_evaluate_leaves_the_model_alone(checkpoint, test_split):
    model = load_checkpoint(checkpoint).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = make_loaders(None, test_split, 250)[1]
    metrics = evaluate(model, loader, epsilon=0.5)
    assert metrics["epsilon"] == 0.5 and model.epsilon == 0.3 and model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    x, y = test_split.tensors
    for kind in ("sound", "estimate"):
        pred = model.certify(x, epsilon=0.5, certificate=kind)
        assert metrics[f"vra_{kind}"] == pytest.approx(float((pred == y).double().mean()))
        assert metrics[f"rejection_rate_{kind}"] == pytest.approx(float((pred == 10).double().mean()))


def test_concurrent_evaluations_at_different_radii(checkpoint, test_split):
    model = load_checkpoint(checkpoint)
    loader = make_loaders(None, test_split, 100)[1]
    expect = {eps: evaluate(model, loader, eps)["vra"] for eps in (0.1, 0.5)}
    results = {}

    def run(eps):
        for _ in range(3):
            results.setdefault(eps, []).append(evaluate(model, loader, eps)["vra"])

    threads = [threading.Thread(target=run, args=(eps,)) for eps in (0.1, 0.5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {eps: [v] * 3 for eps, v in expect.items()}
    assert expect[0.1] > expect[0.5] and model.epsilon == 0.3
