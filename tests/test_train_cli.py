"""Training API and CLI: a short real run end to end, checkpoints, and argument errors."""
import json

import pytest
import torch

import gloro_fast as gf
from gloro_fast import cli
from gloro_fast.data import load_dataset, make_loaders
from gloro_fast.train import TrainConfig, compute_loss, evaluate, load_checkpoint, train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = cli.main(["train", "--epochs", "2", "--warmup", "1", "--no-progress", "--output-dir", str(out)])
    assert code == 0
    return out


def test_train_writes_checkpoint_and_metrics(run, capsys):
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["samples"] == 1000 and metrics["epochs"] == 2
    assert 0.0 <= metrics["vra"] <= metrics["clean_accuracy"] <= 1.0
    assert metrics["vra"] + metrics["rejection_rate"] <= 1.0 + 1e-12
    assert metrics["clean_accuracy"] > 0.5  # two epochs on real digits learn something
    assert metrics["lipschitz"] > 0


def test_checkpoint_reproduces_metrics(run):
    model = load_checkpoint(run / "model.pt")
    _, test_set, _ = load_dataset("mnist-sample", seed=0)
    _, loader = make_loaders(test_set, test_set, 500)
    metrics = evaluate(model, loader)
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("clean_accuracy", "vra", "rejection_rate"):
        assert metrics[key] == pytest.approx(saved[key], abs=1e-3)
    assert metrics["lipschitz"] == pytest.approx(saved["lipschitz"], rel=1e-4)


def test_evaluate_matches_certify(run):
    model = load_checkpoint(run / "model.pt")
    _, test_set, _ = load_dataset("mnist-sample", seed=0)
    x, y = test_set.tensors
    pred = model.certify(x)
    metrics = evaluate(model, make_loaders(test_set, test_set, 128)[1])
    assert metrics["vra"] == pytest.approx(float((pred == y).float().mean()))
    assert metrics["rejection_rate"] == pytest.approx(float((pred == 10).float().mean()))
    # a larger ε can only certify fewer points, and evaluate restores the model's ε
    wider = evaluate(model, make_loaders(test_set, test_set, 128)[1], epsilon=1.0)
    assert wider["vra"] <= metrics["vra"] and model.epsilon == 0.3


def test_cli_certify(run, capsys):
    assert cli.main(["certify", str(run / "model.pt"), "--epsilon", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "VRA (ε=0.1)" in out and "clean accuracy" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--epsilon", "-1"], "epsilon"),
        (["train", "--epochs", "0"], "epochs"),
        (["train", "--batch-size", "0"], "batch_size"),
        (["train", "--lr", "0"], "lr"),
        (["train", "--lam", "-1"], "lam"),
        (["train", "--dataset", "mnist"], "data_dir"),
        (["train", "--depth", "3"], "liresnet"),
        (["train", "--device", "cuda:0"] if not torch.cuda.is_available() else ["train", "--device", "tpu"], "device"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys, tmp_path):
    assert cli.main(argv + ["--output-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_cli_certify_rejects_non_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "x.pt"
    torch.save({"hello": 1}, bogus)
    assert cli.main(["certify", str(bogus)]) == 2
    assert "not a gloro_fast checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("loss", ["gloro_ce", "trades", "trades_ce", "emma", "margin"])
def test_every_loss_trains(loss):
    torch.manual_seed(0)
    body = gf.nn.Sequential(gf.nn.Linear(4, 8), gf.nn.MinMax())
    model = gf.GloroNet(body, gf.nn.Linear(8, 3), epsilon=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    out = model.forward_parts(x)
    value = compute_loss(loss, out, y, 0.1, lam=1.0)
    value.backward()
    assert torch.isfinite(value)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_compute_loss_rejects_unknown():
    model = gf.GloroNet(gf.nn.Sequential(gf.nn.Linear(4, 4)), gf.nn.Linear(4, 3), epsilon=0.1)
    out = model.forward_parts(torch.randn(2, 4))
    with pytest.raises(ValueError, match="loss"):
        compute_loss("hinge", out, torch.tensor([0, 1]), 0.1)


def test_config_validation_names_field():
    with pytest.raises(ValueError, match="arch"):
        train(TrainConfig(arch="resnet50"))
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="hinge").validate()
