"""A run killed by PID in the middle of an epoch and resumed ends bit-identical to a run that
was never interrupted; a damaged or mismatched run folder is refused with one error line."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gloro_fast import cli
from gloro_fast.files import read_checkpoint, write_checkpoint
from tests.data_files import write_mnist
from tests.helpers import one_error_line

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1",  # one thread: the same reductions in every process
           PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
# Augmentation and a non-trivial schedule so RNG and schedule state both matter.
ARGS = ["train", "--dataset", "mnist", "--arch", "2C2F", "--epochs", "3", "--batch-size", "32",
        "--augment", "crop", "--epsilon-schedule", "linear", "--lam-schedule", "logarithmic",
        "--lr-schedule", "cos", "--n-iter", "2", "--no-progress", "--device", "cpu"]


def _cli(args, timeout=300):
    return subprocess.run([sys.executable, "-m", "gloro_fast", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("mnist"), n_train=256, n_test=64)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """An uninterrupted run, and one killed at step 3 of epoch 2 and then resumed."""
    whole = tmp_path_factory.mktemp("whole")
    done = _cli(ARGS + ["--data-dir", str(data), "--output-dir", str(whole)])
    assert done.returncode == 0, done.stderr[-2000:]

    cut = tmp_path_factory.mktemp("cut")
    worker = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("resume_worker.py")), *ARGS,
         "--data-dir", str(data), "--output-dir", str(cut), "--stop-at", "2", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    seen = []
    for line in worker.stdout:
        seen.append(line.strip())
        if line.strip() == "STEP 2 3":
            os.kill(worker.pid, signal.SIGKILL)
            break
    worker.wait(timeout=60)
    assert worker.returncode == -signal.SIGKILL, seen[-5:] + [worker.stderr.read()[-2000:]]
    assert "STEP 1 7" in seen and "STEP 2 3" in seen  # epoch 1 finished, killed inside epoch 2
    killed = read_checkpoint(cut / "last.pt")
    assert killed["epoch"] == 1 and not (cut / "model.pt").exists()

    resumed = _cli(["train", "--resume", str(cut), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return whole, cut


def test_killed_and_resumed_run_is_bit_identical(runs):
    whole, cut = runs
    a, b = read_checkpoint(whole / "model.pt"), read_checkpoint(cut / "model.pt")
    assert a["epoch"] == b["epoch"] == 3
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():  # weights and power-iteration iterates
        assert torch.equal(tensor, b["state_dict"][name]), name
    for key in ("optimizer", "scaler", "rng"):  # the whole training state, not only the weights
        flat_a, flat_b = _flatten(a[key]), _flatten(b[key])
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            same = torch.equal(flat_a[k], flat_b[k]) if isinstance(flat_a[k], torch.Tensor) else flat_a[k] == flat_b[k]
            assert same, (key, k)
    timing = {"seconds", "elapsed"}
    rows_a = [{k: v for k, v in r.items() if k not in timing} for r in a["history"]]
    rows_b = [{k: v for k, v in r.items() if k not in timing} for r in b["history"]]
    assert rows_a == rows_b and len(rows_a) == 3
    ma, mb = json.loads((whole / "metrics.json").read_text()), json.loads((cut / "metrics.json").read_text())
    for key in ("clean_accuracy", "vra", "rejection_rate", "lipschitz"):
        assert ma[key] == mb[key]
    csv_rows = (cut / "metrics.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 4 and csv_rows[0].startswith("epoch,loss,")


def _flatten(obj, prefix=""):
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}/{i}"))
    else:
        out[prefix] = obj
    return out


def test_an_interrupted_schedule_differs_without_resume(runs, data, tmp_path):
    """Control: starting over from the killed run's weights alone (fresh RNG and optimiser)
    does not give the same result, so the comparison above can fail."""
    whole, cut = runs
    ckpt = read_checkpoint(whole / "model.pt")
    other = _cli(ARGS + ["--data-dir", str(data), "--output-dir", str(tmp_path), "--seed", "1"])
    assert other.returncode == 0, other.stderr[-2000:]
    different = read_checkpoint(tmp_path / "model.pt")
    assert any(not torch.equal(t, different["state_dict"][k]) for k, t in ckpt["state_dict"].items())


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_resume_refuses_damaged_checkpoint(runs, tmp_path, capsys, damage):
    _, cut = runs
    folder = tmp_path / "run"
    folder.mkdir()
    blob = (cut / "last.pt").read_bytes()
    blob = {"truncated": blob[: len(blob) // 3], "empty": b"",
            "random": os.urandom(len(blob))}[damage]
    (folder / "last.pt").write_bytes(blob)
    assert cli.main(["train", "--resume", str(folder)]) == 2
    one_error_line(capsys, str(folder / "last.pt"), "empty" if damage == "empty" else "corrupt")


def _rewrite(src, dst, change):
    ckpt = read_checkpoint(src)
    ckpt.pop("format")
    change(ckpt)
    dst.mkdir(exist_ok=True)
    write_checkpoint(dst / "last.pt", ckpt)


def test_resume_refuses_missing_config_key(runs, tmp_path, capsys):
    _, cut = runs
    _rewrite(cut / "last.pt", tmp_path / "run", lambda c: c["config"].pop("arch"))
    assert cli.main(["train", "--resume", str(tmp_path / "run")]) == 2
    one_error_line(capsys, "config is missing key(s) arch")


def test_resume_refuses_architecture_mismatch(runs, tmp_path, capsys):
    _, cut = runs
    # weights of a 2C2F under a config that says 4C3F
    _rewrite(cut / "last.pt", tmp_path / "run", lambda c: c["config"].update(arch="4C3F"))
    assert cli.main(["train", "--resume", str(tmp_path / "run")]) == 2
    one_error_line(capsys, "weights do not fit architecture 4C3F")
    # a different architecture asked for on the command line
    assert cli.main(["train", "--resume", str(cut), "--arch", "4C3F"]) == 2
    one_error_line(capsys, "--arch '4C3F' conflicts with the resumed run's arch '2C2F'")


def test_resume_may_move_the_data(runs, data, tmp_path, capsys):
    _, cut = runs
    assert cli.main(["train", "--resume", str(cut), "--data-dir", str(tmp_path / "gone")]) == 2
    one_error_line(capsys, str(tmp_path / "gone"))
    assert cli.main(["train", "--resume", str(tmp_path)]) == 2
    one_error_line(capsys, "holds no last.pt")
