"""Training API and CLI: a short real run end to end, its files, the training features
(schedules, optimisers, autocast, clipping, presets) and the CLI's one-line errors."""
import copy
import dataclasses
import json
import math
import pickle

import pytest
import torch

import gloro_fast as gf
from gloro_fast import cli
from gloro_fast.data import load_dataset, make_loaders
from gloro_fast.files import read_checkpoint
from gloro_fast.plots import certified_accuracy
from gloro_fast.presets import PRESETS, preset
from gloro_fast.schedules import Schedule
from gloro_fast.train import (
    TrainConfig,
    _AutocastForward,
    compute_loss,
    config_from_dict,
    evaluate,
    load_checkpoint,
    setup_run,
    train,
    train_epoch,
)
from tests.data_files import write_mnist
from tests.helpers import one_error_line


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = cli.main(["train", "--epochs", "2", "--epsilon-schedule", "linear", "--no-progress",
                     "--output-dir", str(out)])
    assert code == 0
    return out


def test_train_writes_checkpoint_and_metrics(run):
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["samples"] == 1000 and metrics["epochs"] == 2
    assert 0.0 <= metrics["vra"] <= metrics["clean_accuracy"] <= 1.0
    assert metrics["vra"] + metrics["rejection_rate"] <= 1.0 + 1e-12
    assert metrics["clean_accuracy"] > 0.5  # two epochs on real digits learn something
    assert metrics["lipschitz"] > 0
    # test ε (0.3) and train ε (1.5 × 0.3, ramped linearly over the 2 epochs) differ
    assert metrics["epsilon"] == 0.3 and metrics["train_epsilon"] == pytest.approx(0.45)
    history = metrics["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    eps = Schedule("linear", 2, 0.45)
    assert history[0]["epsilon"] == 0.0 and history[1]["epsilon"] == pytest.approx(eps.at(1, 15, 16))
    lr = Schedule("decay_after_half_to_1e-6", 2, 1e-3)
    assert history[1]["lr"] == pytest.approx(lr.at(1, 15, 16))
    for row in history:
        for key in ("loss", "train_accuracy", "train_vra", "clean_accuracy", "vra", "rejection_rate",
                    "lipschitz", "lr", "epsilon", "lam", "seconds", "elapsed"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), key
    assert history[-1]["vra"] == metrics["vra"]


def test_metrics_csv_matches_json(run):
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    assert header[:4] == ["epoch", "loss", "train_accuracy", "train_vra"]
    history = json.loads((run / "metrics.json").read_text())["history"]
    for line, row in zip(rows[1:], history):
        values = dict(zip(header, line.split(",")))
        for key in header:
            assert float(values[key]) == pytest.approx(row[key], rel=1e-12)


def test_plots_are_pngs(run):
    for name in ("curves.png", "robustness.png"):
        blob = (run / name).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 10_000


def test_robustness_curve_agrees_with_vra(run):
    metrics = json.loads((run / "metrics.json").read_text())
    curve = metrics["certified_accuracy_curve"]
    assert curve["radius"][0] == 0.0 and curve["radius"][-1] >= 0.6
    acc = curve["certified_accuracy_sound"]
    est = curve["certified_accuracy_estimate"]
    assert len(acc) == len(est) == len(curve["radius"])
    assert all(a >= b for a, b in zip(acc, acc[1:]))  # never rises with the radius
    assert acc[0] <= metrics["clean_accuracy"]
    # Independently: certified at ε means radius > ε; the curve at ε is the VRA.
    model = load_checkpoint(run / "model.pt")
    _, test_set, _ = load_dataset("mnist-sample", split="test")
    x, y = test_set.tensors
    correct = model.head(model.body(x)).argmax(dim=1) == y
    for kind, key in (("sound", "vra_sound"), ("estimate", "vra_estimate")):
        radii = model.certified_radius(x, certificate=kind)
        assert float(certified_accuracy(radii, correct, torch.tensor([0.3]))[0]) == pytest.approx(metrics[key])


def test_checkpoint_reproduces_metrics(run):
    model = load_checkpoint(run / "model.pt")
    _, test_set, _ = load_dataset("mnist-sample", seed=0, split="test")
    _, loader = make_loaders(None, test_set, 500)
    metrics = evaluate(model, loader)
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("clean_accuracy", "vra", "rejection_rate"):
        assert metrics[key] == pytest.approx(saved[key], abs=1e-3)
    assert metrics["lipschitz"] == pytest.approx(saved["lipschitz"], rel=1e-4)
    ckpt = read_checkpoint(run / "model.pt")
    assert ckpt["kind"] == "final" and ckpt["epoch"] == 2
    last = read_checkpoint(run / "last.pt")
    assert last["kind"] == "last" and last["epoch"] == 2
    for name, tensor in ckpt["state_dict"].items():
        assert torch.equal(tensor, last["state_dict"][name])


def test_evaluate_matches_certify(run):
    model = load_checkpoint(run / "model.pt")
    _, test_set, _ = load_dataset("mnist-sample", seed=0, split="test")
    x, y = test_set.tensors
    pred = model.certify(x)
    metrics = evaluate(model, make_loaders(None, test_set, 128)[1])
    assert metrics["vra"] == pytest.approx(float((pred == y).float().mean()))
    assert metrics["rejection_rate"] == pytest.approx(float((pred == 10).float().mean()))
    # a larger ε can only certify fewer points, and evaluate restores the model's ε
    wider = evaluate(model, make_loaders(None, test_set, 128)[1], epsilon=1.0)
    assert wider["vra"] <= metrics["vra"] and model.epsilon == 0.3


def test_cli_certify(run, capsys, monkeypatch):
    import gloro_fast.train as train_module

    reads = []
    read = train_module.read_checkpoint
    monkeypatch.setattr(train_module, "read_checkpoint", lambda path: reads.append(path) or read(path))
    assert cli.main(["certify", str(run / "model.pt"), "--epsilon", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "VRA sound    ε=0.1" in out and "VRA estimate" in out and "clean accuracy" in out
    assert len(reads) == 1  # the checkpoint is read (and its hash checked) once


def test_finished_run_folder_is_replaced_unfinished_refused(run, tmp_path, capsys):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "last.pt").write_bytes((run / "last.pt").read_bytes())
    assert cli.main(["train", "--epochs", "1", "--no-progress", "--output-dir", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds an unfinished run" in err[0] and "--resume" in err[0]
    (folder / "model.pt").write_bytes(b"old model")
    (folder / "robustness.png").write_bytes(b"old plot")
    assert cli.main(["train", "--epochs", "1", "--no-progress", "--output-dir", str(folder)]) == 0
    assert read_checkpoint(folder / "model.pt")["epoch"] == 1
    assert (folder / "robustness.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--epsilon", "-1"], "epsilon"),
        (["train", "--epochs", "0"], "epochs"),
        (["train", "--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
        (["train", "--batch-size", "0"], "batch_size"),
        (["train", "--lr", "0"], "lr"),
        (["train", "--lam", "-1"], "lam"),
        (["train", "--dataset", "mnist"], "data_dir"),
        (["train", "--depth", "3"], "liresnet"),
        (["train", "--device", "meta"], "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'meta'"),
        (["train", "--device", "cuda:0"] if not torch.cuda.is_available() else ["train", "--device", "tpu"], "device"),
        (["train", "--lr-schedule", "sometimes"], "lr_schedule"),
        (["train", "--epsilon-schedule", "[0.]-[5:-1.]"], "epsilon_schedule"),
        (["train", "--optimizer", "lion"], "argument --optimizer: invalid choice"),
        (["train", "--grad-clip", "0"], "grad_clip"),
        (["train", "--crop-padding", "0"], "crop_padding must be >= 1, got 0"),
        (["train", "--crop-padding", "1"], "crop_padding applies to augment 'crop' or 'crop-flip'; augment is 'auto' "
                                           "for dataset 'mnist-sample'"),
        (["train", "--augment", "crop", "--crop-padding", "29"], "crop_padding must be an int in [1, 28]"),
        (["train", "--preset", "mnist-0.3", "--resume", "x"], "--preset cannot be combined with --resume"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys, tmp_path):
    out = tmp_path / "out"
    assert cli.main(argv + ["--output-dir", str(out)]) == 2
    one_error_line(capsys, message)
    assert not (out / "last.pt").exists()  # refused before any training


def test_output_dir_must_be_a_writable_folder(tmp_path, capsys):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    assert cli.main(["train", "--output-dir", str(a_file)]) == 2
    one_error_line(capsys, "is a file, not a folder")
    assert cli.main(["train", "--output-dir", "/sys/gloro_fast_run"]) == 2
    one_error_line(capsys, "is not a writable folder")


def _gzip_mnist(tmp_path):
    folder = write_mnist(tmp_path / "mnist", n_train=64, n_test=32, gz=True)
    path = folder / "train-images-idx3-ubyte.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[:40] + bytes(len(blob) - 40))  # deflate data zeroed
    return folder, path


def test_cli_corrupt_gzip(tmp_path, capsys):
    folder, path = _gzip_mnist(tmp_path)
    assert cli.main(["train", "--dataset", "mnist", "--data-dir", str(folder),
                     "--output-dir", str(tmp_path / "out")]) == 2
    one_error_line(capsys, str(path))
    assert not (tmp_path / "out" / "last.pt").exists()


def test_cli_truncated_cifar_pickle(tmp_path, capsys):
    import numpy as np

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}, f)
    blob = (folder / "data_batch_4").read_bytes()
    (folder / "data_batch_4").write_bytes(blob[: len(blob) // 2])
    assert cli.main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--arch", "6C2F",
                     "--output-dir", str(tmp_path / "out")]) == 2
    one_error_line(capsys, "data_batch_4: truncated or corrupt CIFAR batch")


def test_cli_garbage_jpeg(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "tiny-imagenet-200"
    (root / "train" / "n01" / "images").mkdir(parents=True)
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("n01\n")
    Image.new("RGB", (64, 64)).save(root / "train" / "n01" / "images" / "a.JPEG")
    (root / "train" / "n01" / "images" / "b.JPEG").write_bytes(b"garbage" * 100)
    Image.new("RGB", (64, 64)).save(root / "val" / "images" / "v.JPEG")
    (root / "val" / "val_annotations.txt").write_text("v.JPEG\tn01\t0\t0\t1\t1\n")
    assert cli.main(["train", "--dataset", "tiny-imagenet", "--data-dir", str(tmp_path), "--arch", "8C2F",
                     "--output-dir", str(tmp_path / "out")]) == 2
    one_error_line(capsys, "b.JPEG: not a readable image")


def test_cli_certify_rejects_non_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "x.pt"
    torch.save({"hello": 1}, bogus)
    assert cli.main(["certify", str(bogus)]) == 2
    assert "not a gloro_fast checkpoint" in capsys.readouterr().err


def test_cli_certify_on_a_folder(tmp_path, capsys):
    assert cli.main(["certify", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gloro-fast: error: ") and str(tmp_path) in err[0]


# --------------------------------------------------------------------------- training features


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("tiny"), n_train=32, n_test=16, size=12)


def _config(tiny_data, tmp_path, **kwargs):
    base = dict(dataset="mnist", data_dir=str(tiny_data), arch="2C2F", epochs=1, batch_size=32,
                progress=False, device="cpu", output_dir=str(tmp_path / "run"), n_iter=1,
                epsilon_schedule="fixed", lam_schedule="fixed", lr_schedule="fixed")
    base.update(kwargs)
    return TrainConfig(**base)


@pytest.mark.parametrize("clip", [None, 0.05])
def test_gradient_clipping_bounds_the_step(tiny_data, tmp_path, clip):
    """SGD without momentum moves the weights by lr × the (clipped) gradient: one step of
    one batch moves them by exactly lr × clip when the raw gradient is longer."""
    torch.manual_seed(0)
    config = _config(tiny_data, tmp_path, optimizer="sgd", momentum=0.0, lr=1.0, grad_clip=clip)
    run = setup_run(config)
    before = [p.detach().clone() for p in run.model.parameters()]
    # the raw gradient of the same batch, on a copy
    probe = copy.deepcopy(run.model)
    probe.epsilon = 0.45  # the train ε the step uses (1.5 × the test ε)
    x, y = next(iter(copy.deepcopy(run.train_loader)))  # the same first batch
    compute_loss("trades", probe(x, parts=True), y, 0.45, 1.0).backward()
    raw = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in probe.parameters()))
    train_epoch(run, 0)
    moved = math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(run.model.parameters(), before)))
    if clip is None:
        assert moved == pytest.approx(raw, rel=1e-4)
    else:
        assert raw > 10 * clip and moved == pytest.approx(clip, rel=1e-4)


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                       ("sgd", torch.optim.SGD), ("nadam", torch.optim.NAdam)])
def test_optimizers(tiny_data, tmp_path, name, cls):
    config = _config(tiny_data, tmp_path, optimizer=name, weight_decay=1e-4, lr=3e-3)
    run = setup_run(config)
    assert type(run.optimizer) is cls
    assert run.optimizer.param_groups[0]["weight_decay"] == 1e-4
    before = [p.detach().clone() for p in run.model.parameters()]
    stats = train_epoch(run, 0)
    assert math.isfinite(stats["loss"]) and stats["lr"] == 3e-3
    assert all(not torch.equal(p, b) for p, b in zip(run.model.parameters(), before))


@pytest.mark.parametrize("bound", ["margin", "global"])
def test_autocast_forward_matches_forward_parts_in_float32(bound):
    torch.manual_seed(0)
    net = gf.models.cnn_2C2F(input_shape=(1, 12, 12), epsilon=0.4, bound=bound, n_iter=2).train()
    twin = copy.deepcopy(net)
    x = torch.rand(8, 1, 12, 12)
    ref = net.forward_parts(x)
    out = _AutocastForward(twin, torch.float32)(x)  # float32 "autocast": the same numbers
    for a, b in zip(ref, out):
        assert torch.equal(a, b)
    for name, buf in net.named_buffers():  # the iterates advanced identically
        assert torch.equal(buf, dict(twin.named_buffers())[name])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_lipschitz_in_float32(dtype):
    torch.manual_seed(0)
    net = gf.models.cnn_2C2F(input_shape=(1, 12, 12), epsilon=0.4, n_iter=1).train()
    twin = copy.deepcopy(net)
    x = torch.rand(8, 1, 12, 12)
    ref = net.forward_parts(x)
    out = _AutocastForward(twin, dtype)(x)
    assert out.logits.dtype == out.bottom.dtype == out.lipschitz.dtype == torch.float32
    # the Lipschitz part is not autocast at all: bit-identical to the float32 forward
    assert torch.equal(out.lipschitz, ref.lipschitz) and torch.equal(out.distances, ref.distances)
    # the network part is computed in reduced precision: close, not equal
    assert not torch.equal(out.logits, ref.logits)
    assert torch.allclose(out.logits, ref.logits, atol=0.05, rtol=0.05)
    loss = compute_loss("trades", out, torch.arange(8) % 10, 0.4, 1.0)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in twin.parameters())


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_run(tiny_data, tmp_path, amp):
    metrics = train(_config(tiny_data, tmp_path, amp=amp, epochs=2), log=lambda *a: None)
    assert math.isfinite(metrics["history"][-1]["loss"]) if "history" in metrics else True
    ckpt = read_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["config"]["amp"] == amp and ckpt["scaler"] is not None
    assert all(t.dtype == torch.float32 for t in ckpt["state_dict"].values())


def test_pretrain_epochs_use_plain_cross_entropy(tiny_data, tmp_path):
    train(_config(tiny_data, tmp_path, epochs=1, pretrain_epochs=1, epsilon_schedule="linear"),
          log=lambda *a: None)
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert [r["epsilon"] for r in history] == [0.0, 0.0] and history[0]["lam"] == 0.0
    assert len(history) == 2


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_cited(name):
    values = preset(name)
    config = TrainConfig(**values).validate(check_device=False)
    assert config.preset == name
    assert PRESETS[name]["source"] and 0 < PRESETS[name]["paper_vra"] < 1
    assert max(config.schedules()["lr_schedule"].values) == pytest.approx(config.lr)


def test_paper_preset_values():
    """The settings read from the authors' scripts (leino21 snapshot), spot-checked."""
    c = preset("mnist-0.3")
    assert (c["arch"], c["epochs"], c["batch_size"], c["train_epsilon"], c["epsilon"]) == ("2C2F", 500, 256, 0.45, 0.3)
    lam = Schedule(c["lam_schedule"], c["epochs"], c["lam"])
    assert lam[0] == 0.0 and lam[499] == pytest.approx(2.0 * 499 / 500)  # trades,0.0,2.0,500
    lr = Schedule(c["lr_schedule"], c["epochs"], c["lr"])
    assert lr[249] == 1e-3 and lr[250] == 1e-3 and lr[499] == pytest.approx(1e-3 * 1e-3 ** (249 / 250))
    c = preset("mnist-1.58")
    assert (c["arch"], c["epochs"], c["train_epsilon"], c["lam"]) == ("4C3F", 300, 1.75, 3.0)
    c = preset("cifar10-0.141")
    assert c["train_epsilon"] == pytest.approx(0.1551) and c["pretrain_epochs"] == 20


def test_preset_and_explicit_options(tmp_path, monkeypatch):
    captured = {}

    def fake_train(config, resume=None, log=print):
        captured["config"] = config
        raise ValueError("stop here")

    monkeypatch.setattr(cli, "train", fake_train)
    assert cli.main(["train", "--preset", "mnist-1.58-sample", "--epochs", "7", "--lr", "0.002",
                     "--output-dir", str(tmp_path)]) == 2
    config = captured["config"]
    assert config.preset == "mnist-1.58-sample" and config.arch == "4C3F"
    assert config.epochs == 7 and config.lr == 0.002  # explicit options win
    assert config.train_epsilon == PRESETS["mnist-1.58-sample"]["config"]["train_epsilon"]


# --------------------------------------------------------------------------- losses


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
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8").validate()
    with pytest.raises(ValueError, match="depth"):
        TrainConfig(arch="liresnet", arch_kwargs={"depth": 0}).validate()
    with pytest.raises(TypeError, match="crop_padding must be an int"):
        TrainConfig(augment="crop", crop_padding=1.5).validate()
    with pytest.raises(ValueError, match="crop_padding applies"):
        TrainConfig(augment="none", crop_padding=2).validate()
    assert TrainConfig(dataset="cifar10", data_dir="d", crop_padding=2).validate(check_device=False).resolved_augment \
        == "crop-flip"


def test_config_of_a_checkpoint_written_before_crop_padding_loads():
    values = dataclasses.asdict(TrainConfig())
    del values["crop_padding"]
    assert config_from_dict(values).crop_padding is None  # what such a run did: 1/8 of the side
    values["colour"] = "red"
    with pytest.raises(ValueError, match="unknown key"):
        config_from_dict(values)


# --------------------------------------------------------------------------- certify: data and outputs


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """A 1-epoch run on MNIST IDX files, then only the test files left in a second folder."""
    data = write_mnist(tmp_path_factory.mktemp("mnist_full"), n_train=64, n_test=48, size=12)
    out = tmp_path_factory.mktemp("mnist_run")
    assert cli.main(["train", "--dataset", "mnist", "--data-dir", str(data), "--epochs", "1",
                     "--batch-size", "32", "--no-progress", "--output-dir", str(out)]) == 0
    test_only = tmp_path_factory.mktemp("mnist_test_only")
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (test_only / name).write_bytes((data / name).read_bytes())
    return out, data, test_only


def test_certify_reads_only_the_test_split(mnist_run, capsys):
    out, _, test_only = mnist_run
    assert cli.main(["certify", str(out / "model.pt"), "--data-dir", str(test_only),
                     "--certificate", "estimate"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed.strip().splitlines()[-1])
    assert result["samples"] == 48
    saved = json.loads((out / "metrics.json").read_text())
    assert result["vra_estimate"] == saved["vra_estimate"]


def test_certify_never_takes_the_data_folder_from_the_checkpoint(mnist_run, capsys):
    out, data, _ = mnist_run
    assert read_checkpoint(out / "model.pt")["config"]["data_dir"] == str(data)
    # the checkpoint names mnist and its folder; without --data-dir certify must refuse
    assert cli.main(["certify", str(out / "model.pt")]) == 2
    one_error_line(capsys, "needs data_dir")


def test_certify_several_epsilons_and_plot(mnist_run, tmp_path, capsys):
    out, _, test_only = mnist_run
    plot = tmp_path / "plots" / "robust.png"
    assert cli.main(["certify", str(out / "model.pt"), "--data-dir", str(test_only),
                     "--epsilon", "0.05", "0.2", "0.6", "--plot", str(plot)]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["epsilon"] for r in results] == [0.05, 0.2, 0.6]
    model = load_checkpoint(out / "model.pt")
    _, test_set, _ = load_dataset("mnist", test_only, split="test")
    for r in results:  # each against evaluate at that ε
        alone = evaluate(model, make_loaders(None, test_set, 256)[1], r["epsilon"])
        assert r["vra_sound"] == alone["vra_sound"] and r["vra_estimate"] == alone["vra_estimate"]
    assert results[0]["vra_sound"] >= results[1]["vra_sound"] >= results[2]["vra_sound"]
    assert plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_certify_refuses_damaged_checkpoints(mnist_run, tmp_path, capsys, damage):
    out, _, test_only = mnist_run
    blob = (out / "model.pt").read_bytes()
    bad = tmp_path / "model.pt"
    bad.write_bytes({"truncated": blob[: len(blob) // 2], "empty": b"",
                     "random": bytes(reversed(blob))}[damage])
    assert cli.main(["certify", str(bad), "--data-dir", str(test_only)]) == 2
    one_error_line(capsys, str(bad))


def test_certify_rejects_a_bad_epsilon_before_work(mnist_run, capsys):
    out, _, test_only = mnist_run
    assert cli.main(["certify", str(out / "model.pt"), "--data-dir", str(test_only),
                     "--epsilon", "0.1", "-2"]) == 2
    captured = capsys.readouterr()
    assert "VRA" not in captured.out  # refused before certifying at 0.1
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gloro-fast: error: ") and "epsilon" in lines[0]


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "nadam"])
def test_optimizers_take_the_fused_kernels_where_torch_has_them(name):
    """Adam, AdamW and SGD run fused on CPU float parameters and take the same step as the
    per-tensor implementation (to rounding); NAdam has no fused kernel."""
    from gloro_fast.train import TrainConfig, make_optimizer

    config = TrainConfig(optimizer=name, lr=1e-2, weight_decay=0.1, momentum=0.9)
    torch.manual_seed(0)
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    opt = make_optimizer(config, params)
    assert opt.defaults.get("fused") is (None if name == "nadam" else True)
    plain = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
             "nadam": torch.optim.NAdam}[name]
    kwargs = {"momentum": 0.9} if name == "sgd" else {}
    ref = plain(twins, lr=1e-2, weight_decay=0.1, foreach=False, **kwargs)
    for _ in range(3):
        for group, o in ((params, opt), (twins, ref)):
            o.zero_grad()
            sum((p * p).sum() for p in group).backward()
            o.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
