"""Run by tests/test_ddp.py under torchrun: train briefly with DDP, then check that every
rank holds the same parameters and power-iteration iterates."""
import os
import sys

import torch
import torch.distributed as dist

from gloro_fast.train import TrainConfig, train

out_dir = sys.argv[1]
metrics = train(TrainConfig(epochs=1, batch_size=128, progress=False, device="cpu",
                            output_dir=out_dir), log=lambda *a: None)
model = metrics["model"]
world = dist.get_world_size()
for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
    gathered = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(gathered, tensor.detach().contiguous())
    for other in gathered[1:]:
        if not torch.equal(gathered[0], other):
            raise SystemExit(f"{name} differs across ranks")
if dist.get_rank() == 0:
    print(f"DDP_OK world={world} vra={metrics['vra']:.4f}")
dist.destroy_process_group()
# Leave without interpreter finalisation: on a busy machine a rank sometimes aborts there
# ("terminate called without an active exception", SIGABRT) after every check above has
# passed and both ranks have destroyed the process group (about 1 run in 10 with both cores
# loaded, with or without TRITON_INTERPRET): torch's teardown, not what this test checks.
sys.stdout.flush()
os._exit(0)
