"""A thin training and evaluation API for GloRo nets.

``train(config)`` follows the GloRo recipe: Adam, ε ramped up from 0 over the first
``warmup`` epochs, the TRADES weight λ ramped up alongside, and the learning rate held
for half the epochs, then decayed geometrically to ``lr_final``. ``evaluate`` reports
clean accuracy, verified-robust accuracy (VRA: certified and correct) and the rejection
rate (⊥) at the model's ε, with converged Lipschitz bounds.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from . import losses, models
from ._validation import check_epsilon, check_positive_int
from .data import DATASETS, load_dataset, make_loaders
from .model import GloroNet, GloroOutput

__all__ = ["TrainConfig", "train", "evaluate", "compute_loss", "save_checkpoint", "load_checkpoint"]

CHECKPOINT_FORMAT = "gloro_fast.checkpoint.v1"


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in the checkpoint)."""

    dataset: str = "mnist-sample"
    data_dir: Optional[str] = None
    arch: str = "2C2F"
    epsilon: float = 0.3            # certification radius
    train_epsilon: Optional[float] = None  # radius trained at (default: 1.5 × epsilon)
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    lr_final: float = 1e-6
    warmup: int = 20                # epochs of ε and λ ramp-up
    loss: str = "trades"
    lam: float = 1.0                # final TRADES λ
    bound: str = "margin"
    n_iter: int = 1                 # power iterations per training step
    seed: int = 0
    device: str = "auto"
    output_dir: str = "runs/gloro"
    progress: bool = True
    arch_kwargs: Dict = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.arch not in models.ARCHITECTURES:
            raise ValueError(f"arch must be one of {sorted(models.ARCHITECTURES)}, got {self.arch!r}")
        if self.loss not in losses.LOSSES:
            raise ValueError(f"loss must be one of {losses.LOSSES}, got {self.loss!r}")
        check_epsilon(self.epsilon, "epsilon")
        if self.train_epsilon is not None:
            check_epsilon(self.train_epsilon, "train_epsilon")
        check_positive_int("epochs", self.epochs)
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("warmup", self.warmup, allow_zero=True)
        check_positive_int("n_iter", self.n_iter, allow_zero=True)
        for name in ("lr", "lr_final"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam!r}")
        if self.bound not in ("margin", "global"):
            raise ValueError(f"bound must be 'margin' or 'global', got {self.bound!r}")
        resolve_device(self.device)
        return self

    @property
    def effective_train_epsilon(self) -> float:
        return 1.5 * self.epsilon if self.train_epsilon is None else float(self.train_epsilon)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def compute_loss(name: str, out: GloroOutput, labels: torch.Tensor, epsilon: float,
                 lam: float = 1.0) -> torch.Tensor:
    """The training loss ``name`` (one of :data:`gloro_fast.losses.LOSSES`) of a forward."""
    if name == "gloro_ce":
        return losses.gloro_cross_entropy(out.augmented, labels)
    if name == "trades":
        return losses.trades_loss(out.augmented, labels, lam, form="kl")
    if name == "trades_ce":
        return losses.trades_loss(out.augmented, labels, lam, form="ce")
    if name == "emma":
        return losses.emma_loss(out.logits, labels, out.margin_lipschitz, epsilon)
    if name == "margin":
        return losses.margin_loss(out.logits, labels, out.margin_lipschitz, epsilon)
    raise ValueError(f"loss must be one of {losses.LOSSES}, got {name!r}")


def _ramp(epoch_progress: float, warmup: int) -> float:
    """0 → 1 over the warm-up epochs (smooth start, as GloRo's ε schedule)."""
    if warmup == 0:
        return 1.0
    t = min(epoch_progress / warmup, 1.0)
    return t * t * (3 - 2 * t)


def _lr_at(epoch_progress: float, config: TrainConfig) -> float:
    half = config.epochs / 2
    if epoch_progress <= half:
        return config.lr
    t = (epoch_progress - half) / half
    return config.lr * (config.lr_final / config.lr) ** t


@torch.no_grad()
def evaluate(model: GloroNet, loader, epsilon: Optional[float] = None) -> Dict[str, float]:
    """Clean accuracy, VRA and rejection rate (fractions in [0, 1]) and K, at ``epsilon``
    (default: the model's), with converged bounds. The model's ε is restored afterwards."""
    was_training, old_eps = model.training, model.epsilon
    if epsilon is not None:
        model.epsilon = check_epsilon(epsilon)
    model.eval()
    device = model.head.weight.device
    dtype = model.head.weight.dtype
    total = correct = verified = rejected = 0
    try:
        for x, y in loader:
            x, y = x.to(device=device, dtype=dtype), y.to(device)
            out = model.forward_parts(x, converged=True)
            top = out.logits.argmax(dim=1)
            certified = out.logits.gather(1, top.unsqueeze(1)).squeeze(1) > out.bottom
            total += y.numel()
            correct += int((top == y).sum())
            verified += int(((top == y) & certified).sum())
            rejected += int((~certified).sum())
        lipschitz = float(model.lipschitz_constant())
    finally:
        model.epsilon = old_eps
        model.train(was_training)
    if total == 0:
        raise ValueError("loader yielded no samples")
    return {
        "clean_accuracy": correct / total,
        "vra": verified / total,
        "rejection_rate": rejected / total,
        "lipschitz": lipschitz,
        "epsilon": model.epsilon if epsilon is None else float(epsilon),
        "samples": total,
    }


def save_checkpoint(path, model: GloroNet, config: TrainConfig, info: Dict, metrics: Dict) -> None:
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "config": asdict(config),
            "input_shape": list(info["input_shape"]),
            "num_classes": info["num_classes"],
            "state_dict": model.state_dict(),
            "metrics": metrics,
        },
        path,
    )


def load_checkpoint(path, map_location="cpu") -> GloroNet:
    """Rebuild the GloroNet saved by :func:`train` (architecture, ε, bound, weights)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a gloro_fast checkpoint ({CHECKPOINT_FORMAT})")
    config = ckpt["config"]
    model = models.build(config["arch"], tuple(ckpt["input_shape"]), ckpt["num_classes"],
                         config["epsilon"], bound=config["bound"], **config.get("arch_kwargs", {}))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(map_location) if map_location is not None else model


def _init_distributed(device: torch.device):
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1).

    Returns (rank, world_size, device); each rank takes its own GPU (LOCAL_RANK).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def train(config: TrainConfig, log=print) -> Dict:
    """Train ``config.arch`` on ``config.dataset``, evaluate, save ``model.pt`` and
    ``metrics.json`` in ``config.output_dir``. Returns the metrics with the model.

    Under ``torchrun --nproc_per_node N`` the batch is split over N DistributedDataParallel
    processes (``batch_size`` per process); buffers, the power-iteration iterates among
    them, are broadcast from rank 0 at every step, so all ranks share one bound. Rank 0
    evaluates and writes the files.
    """
    config.validate()
    rank, world, device = _init_distributed(resolve_device(config.device))
    torch.manual_seed(config.seed)
    train_set, test_set, info = load_dataset(config.dataset, config.data_dir, seed=config.seed)
    train_loader, test_loader = make_loaders(train_set, test_set, config.batch_size, seed=config.seed)
    sampler = None
    if world > 1:
        sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=config.seed)
        train_loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler)
    model = models.build(config.arch, info["input_shape"], info["num_classes"], config.epsilon,
                         bound=config.bound, n_iter=config.n_iter, **config.arch_kwargs).to(device)
    step_model = model
    if world > 1:
        step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    train_eps = config.effective_train_epsilon
    steps_per_epoch = len(train_loader)
    start = time.perf_counter()
    progress_shown = config.progress and rank == 0
    for epoch in range(config.epochs):
        model.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
        running, seen = 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=not progress_shown)
        for step, (x, y) in enumerate(bar):
            progress = epoch + step / steps_per_epoch
            ramp = _ramp(progress, config.warmup)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(progress, config)
            model.epsilon = train_eps * ramp
            x, y = x.to(device), y.to(device)
            out = step_model(x, parts=True)
            loss = compute_loss(config.loss, out, y, model.epsilon, config.lam * ramp)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += float(loss.detach()) * y.numel()
            seen += y.numel()
            bar.set_postfix(loss=f"{running / seen:.4f}")
        if progress_shown or (rank == 0 and epoch + 1 == config.epochs):
            log(f"epoch {epoch + 1:3d}/{config.epochs}  loss {running / seen:.4f}  "
                f"train ε {model.epsilon:.3f}  lr {optimizer.param_groups[0]['lr']:.2e}")
    train_seconds = time.perf_counter() - start
    model.epsilon = config.epsilon
    metrics = evaluate(model, test_loader)
    metrics.update(train_seconds=train_seconds, device=str(device), epochs=config.epochs,
                   dataset=config.dataset, arch=config.arch, train_epsilon=train_eps,
                   world_size=world)
    if rank == 0:
        out_dir = Path(config.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(out_dir / "model.pt", model, config, info, metrics)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if world > 1:
        dist.barrier()
    metrics["model"] = model
    metrics["rank"] = rank
    return metrics
