"""Multi-process training with torchrun (gloo on CPU): ranks stay in lock-step."""
import json
import os
import subprocess
import sys
from pathlib import Path


def test_torchrun_two_processes_agree(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(worker), str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "DDP_OK world=2" in result.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["samples"] == 1000
    assert (tmp_path / "model.pt").exists()
