"""Training and evaluation of GloRo nets: set-up, one epoch, evaluation, checkpoints.

``train(config)`` runs GloRo's recipe: the train ε, the TRADES weight λ and the learning
rate follow GloRo schedules (:mod:`gloro_fast.schedules`); the optimiser is Adam, AdamW,
SGD or NAdam; the network may run under bf16/fp16 autocast while every Lipschitz
computation stays in float32. After every epoch it evaluates the test split at the test ε
and writes, atomically, ``last.pt`` (everything needed to resume bit-identically),
``metrics.csv``, ``metrics.json`` and ``curves.png``; at the end ``model.pt`` and
``robustness.png`` (certified accuracy against radius). ``train(config, resume=...)``
continues a run from its ``last.pt``.

``evaluate`` reports clean accuracy, verified-robust accuracy (VRA: certified and correct)
and the rejection rate (⊥) with converged Lipschitz bounds.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from . import losses, models
from ._validation import BOUNDS, check_choice, check_epsilon, check_positive_int
from .bounds import check_certificate
from .data import DATASETS, STREAMED, Augmented, augmentation, load_dataset, make_loaders
from .files import atomic_write_text, check_output_dir, read_checkpoint, write_checkpoint
from .gloro_net import GloroNet, GloroOutput
from .ops import bottom_logit, class_distances
from .schedules import Schedule

__all__ = ["TrainConfig", "Run", "train", "setup_run", "train_epoch", "evaluate", "compute_loss",
           "save_checkpoint", "load_checkpoint", "model_from_run", "read_run", "resume_config", "certified_radii",
           "robustness_plot",
           "OPTIMIZERS", "AMP_MODES", "AUGMENTATIONS", "RUN_FILES"]

OPTIMIZERS = ("adam", "adamw", "sgd", "nadam")
AMP_MODES = ("none", "bf16", "fp16")
AUGMENTATIONS = ("auto", "none", "crop", "crop-flip")
# What a run writes in its folder; a fresh run removes the previous run's copies first.
RUN_FILES = ("model.pt", "last.pt", "metrics.json", "metrics.csv", "curves.png", "robustness.png")
# vra, rejection_rate, lipschitz: the sound certificate (the estimate where a layer has no
# provable bound); vra_estimate, lipschitz_estimate: the GloRo paper's converged power iteration.
METRIC_COLUMNS = ("epoch", "loss", "train_accuracy", "train_vra", "clean_accuracy", "vra",
                  "vra_estimate", "rejection_rate", "lipschitz", "lipschitz_estimate", "lr",
                  "epsilon", "lam", "seconds", "elapsed")


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in its checkpoints)."""

    dataset: str = "mnist-sample"
    data_dir: Optional[str] = None
    arch: str = "2C2F"
    arch_kwargs: Dict = field(default_factory=dict)
    epsilon: float = 0.3                   # test (certification) radius
    train_epsilon: Optional[float] = None  # radius trained at (default: 1.5 × epsilon)
    epsilon_schedule: str = "[0.]-[20%:1.]-[1.]"
    epochs: int = 100
    pretrain_epochs: int = 0               # epochs of plain cross-entropy before GloRo training
    batch_size: int = 256
    optimizer: str = "adam"
    lr: float = 1e-3
    lr_schedule: str = "decay_after_half_to_1e-6"
    weight_decay: float = 0.0
    momentum: float = 0.9                  # SGD only
    grad_clip: Optional[float] = None      # max gradient l2 norm
    loss: str = "trades"
    lam: float = 1.0                       # TRADES λ (base of lam_schedule)
    lam_schedule: str = "[0.]-[20%:1.]-[1.]"
    bound: str = "margin"
    n_iter: int = 1                        # power iterations per training step
    amp: str = "none"                      # autocast dtype for the network: none, bf16, fp16
    augment: str = "auto"                  # auto: crop-flip for colour images, none for MNIST
    crop_padding: Optional[int] = None     # random crop's zero padding, px (default: 1/8 of the side)
    num_workers: Optional[int] = None      # DataLoader workers (default: 4 for streamed data)
    eval_every: int = 1                    # evaluate the test split every N epochs (and last)
    seed: int = 0
    device: str = "auto"
    output_dir: str = "runs/gloro"
    progress: bool = True
    preset: Optional[str] = None           # the preset the configuration came from, if any

    def validate(self, check_device: bool = True) -> "TrainConfig":
        """Check every field; raise ``ValueError``/``TypeError`` naming the first bad one."""
        check_choice("dataset", self.dataset, DATASETS)
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise TypeError(f"data_dir must be a string path or None, got {type(self.data_dir).__name__}")
        check_choice("arch", self.arch, sorted(models.ARCHITECTURES))
        if not isinstance(self.arch_kwargs, dict):
            raise TypeError(f"arch_kwargs must be a dict, got {type(self.arch_kwargs).__name__}")
        if self.arch_kwargs and self.arch != "liresnet":
            raise ValueError("depth/width (arch_kwargs) apply to arch liresnet only")
        for key, value in self.arch_kwargs.items():
            if key not in ("depth", "width"):
                raise ValueError(f"arch_kwargs may hold depth and width, got {key!r}")
            check_positive_int(key, value)
        check_choice("loss", self.loss, losses.LOSSES)
        check_epsilon(self.epsilon, "epsilon")
        if self.train_epsilon is not None:
            check_epsilon(self.train_epsilon, "train_epsilon")
        check_positive_int("epochs", self.epochs)
        check_positive_int("pretrain_epochs", self.pretrain_epochs, allow_zero=True)
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("eval_every", self.eval_every)
        check_positive_int("n_iter", self.n_iter, allow_zero=True)
        check_positive_int("seed", self.seed, allow_zero=True)
        if self.num_workers is not None:
            check_positive_int("num_workers", self.num_workers, allow_zero=True)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_number("lr", self.lr, positive=True)
        for name in ("weight_decay", "momentum", "lam"):
            _check_number(name, getattr(self, name))
        if self.grad_clip is not None:
            _check_number("grad_clip", self.grad_clip, positive=True)
        check_choice("bound", self.bound, BOUNDS)
        check_choice("amp", self.amp, AMP_MODES)
        check_choice("augment", self.augment, AUGMENTATIONS)
        if self.crop_padding is not None:
            check_positive_int("crop_padding", self.crop_padding)
            if self.resolved_augment == "none":
                raise ValueError(f"crop_padding applies to augment 'crop' or 'crop-flip'; augment is "
                                 f"{self.augment!r} for dataset {self.dataset!r}")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"output_dir must be a non-empty path, got {self.output_dir!r}")
        self.schedules()  # every schedule parses and gives usable values
        if check_device:
            resolve_device(self.device)
        return self

    @property
    def resolved_augment(self) -> str:
        """``augment`` with ``"auto"`` resolved: ``"none"`` for MNIST, ``"crop-flip"`` otherwise."""
        if self.augment != "auto":
            return self.augment
        return "none" if self.dataset in ("mnist", "mnist-sample") else "crop-flip"

    @property
    def effective_train_epsilon(self) -> float:
        return 1.5 * self.epsilon if self.train_epsilon is None else float(self.train_epsilon)

    @property
    def total_epochs(self) -> int:
        return self.pretrain_epochs + self.epochs

    def schedules(self) -> Dict[str, Schedule]:
        """The ε, λ and learning-rate schedules over the GloRo epochs."""
        out = {}
        for name, spec, base in (("epsilon_schedule", self.epsilon_schedule, self.effective_train_epsilon),
                                 ("lam_schedule", self.lam_schedule, self.lam),
                                 ("lr_schedule", self.lr_schedule, self.lr)):
            try:
                out[name] = Schedule(spec, self.epochs, base)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
            if out[name].minimum() < 0:
                raise ValueError(f"{name} {spec!r} goes below 0 (to {out[name].minimum():g})")
        return out


def _check_number(name: str, value, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


# fields added after the checkpoint format was fixed, with the value that reproduces what
# a checkpoint written before them did (so that such a checkpoint still loads and resumes)
_ADDED_FIELDS: Dict[str, Any] = {"crop_padding": None}


def config_from_dict(values: Dict[str, Any], source: str = "config") -> TrainConfig:
    """A :class:`TrainConfig` from a saved dict holding exactly its fields (a field added
    since, absent from an older checkpoint, takes the value that reproduces the old run)."""
    if not isinstance(values, dict):
        raise ValueError(f"{source}: config must be a dict, got {type(values).__name__}")
    values = {**{k: v for k, v in _ADDED_FIELDS.items() if k not in values}, **values}
    names = {f.name for f in fields(TrainConfig)}
    missing, unknown = sorted(names - values.keys()), sorted(set(values) - names)
    if missing:
        raise ValueError(f"{source}: config is missing key(s) {', '.join(missing)}")
    if unknown:
        raise ValueError(f"{source}: config has unknown key(s) {', '.join(map(str, unknown))}")
    return TrainConfig(**values).validate(check_device=False)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but only {torch.cuda.device_count()} "
                             "CUDA device(s) exist")
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


def evaluate(model: GloroNet, loader, epsilon: Optional[float] = None,
             certificate: str = "sound") -> Dict[str, float]:
    """Clean accuracy, VRA (certified and correct) and rejection rate (⊥), fractions in
    [0, 1], and K, at ``epsilon`` (default: the model's).

    One forward per batch decides both certificates: ``vra_sound``/``rejection_rate_sound``/
    ``lipschitz_sound`` (provable, :mod:`gloro_fast.bounds`) and ``vra_estimate``/… (the
    GloRo paper's converged power iteration); ``vra``, ``rejection_rate`` and ``lipschitz``
    repeat those of ``certificate``. The sound keys are absent when the model has a layer
    without a provable bound and ``certificate="estimate"``. The model is left as it was:
    neither its ε, nor its train/eval mode, nor its iterates change.
    """
    certificate = check_certificate(certificate)
    eps = model.epsilon if epsilon is None else check_epsilon(epsilon)
    try:
        sound = model.sound_bounds()
    except NotImplementedError:
        if certificate == "sound":
            raise
        sound = None
    estimate = model.estimate_bounds()
    device, dtype = model.head.weight.device, model.head.weight.dtype
    zero = torch.zeros((), dtype=torch.int64, device=device)
    total, correct = 0, zero.clone()
    counts = {"sound": [zero.clone(), zero.clone()], "estimate": [zero.clone(), zero.clone()]}
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device=device, dtype=dtype), y.to(device)
            if sound is not None:
                logits, _, allowance = model.sound_forward(x)
                decided = {"sound": sound.bottom(logits, allowance, eps)[1]}
            else:
                logits, decided = model.forward_parts(x, converged=True, certificate="estimate").logits, {}
            bottom, _ = bottom_logit(logits, estimate.distances, estimate.lipschitz, eps)
            top = logits.argmax(dim=1)
            decided["estimate"] = logits.amax(dim=1) > bottom
            right = top == y
            total += y.numel()
            correct += right.sum()
            for kind, certified in decided.items():
                counts[kind][0] += (right & certified).sum()
                counts[kind][1] += (~certified).sum()
    if total == 0:
        raise ValueError("loader yielded no samples")
    metrics = {"clean_accuracy": int(correct) / total}
    kinds = {"estimate": float(estimate.lipschitz)}
    if sound is not None:
        kinds["sound"] = sound.lipschitz
    for kind, lipschitz in kinds.items():
        metrics[f"vra_{kind}"] = int(counts[kind][0]) / total
        metrics[f"rejection_rate_{kind}"] = int(counts[kind][1]) / total
        metrics[f"lipschitz_{kind}"] = lipschitz
    metrics.update(
        vra=metrics[f"vra_{certificate}"],
        rejection_rate=metrics[f"rejection_rate_{certificate}"],
        lipschitz=metrics[f"lipschitz_{certificate}"],
        certificate=certificate,
        epsilon=float(eps),
        samples=total,
    )
    return metrics


@torch.no_grad()
def certified_radii(model: GloroNet, loader, certificate: str = "sound") -> Tuple[torch.Tensor, torch.Tensor]:
    """Certified radius (``certificate``: sound or estimate) of every test point and whether
    its prediction is correct (CPU tensors), for the certified-accuracy-against-radius curve."""
    device, dtype = model.head.weight.device, model.head.weight.dtype
    radii, correct = [], []
    for x, y in loader:
        x, y = x.to(device=device, dtype=dtype), y.to(device)
        radii.append(model.certified_radius(x, certificate=certificate).cpu())
        correct.append((model.head(model.body(x)).argmax(dim=1) == y).cpu())
    return torch.cat(radii), torch.cat(correct)


# --------------------------------------------------------------------------- checkpoints


def _model_from(ckpt: Dict[str, Any], config: TrainConfig, source: str) -> GloroNet:
    shape, classes = ckpt.get("input_shape"), ckpt.get("num_classes")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ValueError(f"{source}: input_shape must be a list of 3 positive ints, got {shape!r}")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise ValueError(f"{source}: num_classes must be an int >= 2, got {classes!r}")
    model = models.build(config.arch, tuple(shape), classes, config.epsilon, bound=config.bound,
                         n_iter=config.n_iter, **config.arch_kwargs)
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise ValueError(f"{source}: state_dict must be a dict of tensors")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise ValueError(f"{source}: its weights do not fit architecture {config.arch}"
                         f"{config.arch_kwargs or ''} for input {tuple(shape)}: {detail[:300]}") from None
    return model


def read_run(path) -> Tuple[Dict[str, Any], TrainConfig]:
    """Read and check a checkpoint (``model.pt`` or ``last.pt``): ``(checkpoint, config)``."""
    ckpt = read_checkpoint(path)
    source = f"checkpoint {str(path)!r}"
    for key in ("config", "input_shape", "num_classes", "state_dict", "epoch"):
        if key not in ckpt:
            raise ValueError(f"{source} lacks {key!r}")
    return ckpt, config_from_dict(ckpt["config"], source)


def model_from_run(ckpt: Dict[str, Any], config: TrainConfig, path, map_location="cpu") -> GloroNet:
    """The GloroNet of a checkpoint that :func:`read_run` has read from ``path`` (no second read)."""
    model = _model_from(ckpt, config, f"checkpoint {str(path)!r}")
    return model.to(map_location) if map_location is not None else model


def load_checkpoint(path, map_location="cpu") -> GloroNet:
    """Rebuild the GloroNet saved by :func:`train` (architecture, test ε, bound, weights);
    a damaged or foreign file is a ``ValueError`` naming it."""
    ckpt, config = read_run(path)
    return model_from_run(ckpt, config, path, map_location)


def resume_config(run_dir, overrides: Optional[Dict[str, Any]] = None) -> Tuple[TrainConfig, Dict[str, Any]]:
    """The configuration and state to continue the run in ``run_dir`` (a run folder or its
    ``last.pt``). ``overrides`` may change only what does not alter the result: ``data_dir``
    (the data moved), ``device``, ``progress``, ``num_workers``."""
    path = Path(run_dir).expanduser()
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        path = path / "last.pt"
        if not path.is_file():
            raise FileNotFoundError(f"resume: {str(folder)!r} holds no last.pt (not a run folder)")
    ckpt, config = read_run(path)
    for key in ("optimizer", "scaler", "rng", "history", "elapsed"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {str(path)!r} lacks {key!r}: it cannot be resumed")
    allowed = {"data_dir", "device", "progress", "num_workers"}
    for key, value in (overrides or {}).items():
        if key not in allowed and getattr(config, key) != value:
            raise ValueError(f"--{key.replace('_', '-')} {value!r} conflicts with the resumed run's "
                             f"{key} {getattr(config, key)!r} (a resumed run keeps its configuration; "
                             f"only --data-dir, --device, --num-workers and --no-progress may change)")
        setattr(config, key, value)
    config.output_dir = str(folder)
    return config.validate(), ckpt


# --------------------------------------------------------------------------- set-up


class _AutocastForward(nn.Module):
    """The GloRo training forward with the network under autocast and every Lipschitz
    computation (power iteration, σ̂, class distances, the ⊥ logit) in float32 — the same
    computation as ``GloroNet.forward_parts`` in training mode."""

    def __init__(self, net: GloroNet, dtype: torch.dtype) -> None:
        super().__init__()
        self.net, self.dtype = net, dtype

    def forward(self, x: torch.Tensor) -> GloroOutput:
        net = self.net
        with torch.autocast(x.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            logits = net.head(net.body(x))
        with torch.autocast(x.device.type, enabled=False):
            logits = logits.float()
            ref = net.head.weight
            lipschitz = net.body.lipschitz_bound(net.n_iter)
            if not isinstance(lipschitz, torch.Tensor):
                lipschitz = torch.tensor(float(lipschitz), dtype=ref.dtype, device=ref.device)
            if net.bound == "margin":
                distances = class_distances(ref)
            else:
                off = 1.0 - torch.eye(net.num_classes, dtype=ref.dtype, device=ref.device)
                distances = (math.sqrt(2.0) * net.head.lipschitz_bound(net.n_iter)) * off
            bottom, _ = bottom_logit(logits, distances, lipschitz, net.epsilon)
        return GloroOutput(logits, bottom, lipschitz, distances)


class _PartsForward(nn.Module):
    """``net(x, parts=True)``: one module whose forward is the whole training step, so
    DistributedDataParallel sees it."""

    def __init__(self, net: GloroNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> GloroOutput:
        return self.net(x, parts=True)


@dataclass
class Run:
    """A training run in progress: what :func:`train_epoch` and the checkpoints need."""

    config: TrainConfig
    device: torch.device
    rank: int
    world: int
    info: Dict[str, Any]
    model: GloroNet
    step: nn.Module                      # the training forward (DDP-wrapped under torchrun)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_loader: DataLoader
    test_loader: DataLoader
    sampler: Optional[DistributedSampler]
    generator: torch.Generator           # the train loader's shuffling and worker seeds
    schedules: Dict[str, Schedule]
    out_dir: Optional[Path]              # None on ranks other than 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    elapsed: float = 0.0


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


def _fused(params) -> Dict[str, bool]:
    """``{"fused": True}`` where torch has a fused kernel for these parameters (floating
    point, on CPU or CUDA): one kernel per step instead of several per parameter (4C3F on
    the MNIST sample: Adam's share of an epoch 0.32 → 0.08 s on 2 CPU cores); else ``{}``."""
    ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if params and ok else {}


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    wd = config.weight_decay
    params = list(params)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=wd, **_fused(params))
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=wd, **_fused(params))
    if config.optimizer == "nadam":
        return torch.optim.NAdam(params, lr=config.lr, weight_decay=wd)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=wd, **_fused(params))
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}")


def _prepare_output(config: TrainConfig, resuming: bool) -> Path:
    out_dir = check_output_dir(config.output_dir, "output_dir")
    if not resuming:
        if (out_dir / "last.pt").exists() and not (out_dir / "model.pt").exists():
            raise ValueError(f"output_dir {str(out_dir)!r} holds an unfinished run (last.pt without "
                             f"model.pt): continue it with --resume {out_dir}, or choose another "
                             "--output-dir")
    return out_dir


def setup_run(config: TrainConfig, resume: Optional[Dict[str, Any]] = None) -> Run:
    """Check everything and build the run: arguments, output folder, data (both splits read
    and checked), model, optimiser; with ``resume`` (a checkpoint from :func:`resume_config`)
    restore the model, optimiser, scaler, RNG states and history. Nothing is trained yet, so
    every expected failure happens here."""
    config.validate()
    rank, world, device = _init_distributed(resolve_device(config.device))
    out_dir = _prepare_output(config, resume is not None) if rank == 0 else None
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    train_set, test_set, info = load_dataset(config.dataset, config.data_dir, seed=config.seed)
    transform = augmentation(config.resolved_augment, info["input_shape"], config.crop_padding)
    if transform is not None:
        train_set = Augmented(train_set, transform)
    workers = config.num_workers
    if workers is None:
        workers = min(4, os.cpu_count() or 1) if config.dataset in STREAMED else 0
    generator = torch.Generator().manual_seed(config.seed)
    pin = device.type == "cuda"
    train_loader, test_loader = make_loaders(train_set, test_set, config.batch_size, seed=config.seed,
                                             num_workers=workers, pin_memory=pin, generator=generator)
    sampler = None
    if world > 1:
        sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=config.seed)
        train_loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler,
                                  num_workers=workers, pin_memory=pin, generator=generator)
    if resume is not None:
        if [*info["input_shape"]] != resume["input_shape"] or info["num_classes"] != resume["num_classes"]:
            raise ValueError(f"the data (input {info['input_shape']}, {info['num_classes']} classes) does "
                             f"not fit the resumed run's model (input {tuple(resume['input_shape'])}, "
                             f"{resume['num_classes']} classes)")
        model = _model_from(resume, config, "resumed checkpoint")
    else:
        model = models.build(config.arch, info["input_shape"], info["num_classes"], config.epsilon,
                             bound=config.bound, n_iter=config.n_iter, **config.arch_kwargs)
    model = model.to(device)
    step: nn.Module = _PartsForward(model)
    if config.amp != "none":
        step = _AutocastForward(model, torch.bfloat16 if config.amp == "bf16" else torch.float16)
    if world > 1:
        step = DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(config, model.parameters())
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    run = Run(config, device, rank, world, info, model, step, optimizer, scaler, train_loader,
              test_loader, sampler, generator, config.schedules(), out_dir)
    if resume is not None:
        _restore(run, resume)
    elif out_dir is not None:
        # Everything checked: a finished run in the folder is replaced whole, never mixed with
        # this one (and left untouched when a check above failed).
        for name in RUN_FILES:
            (out_dir / name).unlink(missing_ok=True)
    return run


def _rng_state(run: Run) -> Dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "loader": run.generator.get_state(),
    }


def _restore(run: Run, ckpt: Dict[str, Any]) -> None:
    try:
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scaler.load_state_dict(ckpt["scaler"])
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(rng["python"])
        run.generator.set_state(rng["loader"])
        epoch, history, elapsed = ckpt["epoch"], ckpt["history"], ckpt["elapsed"]
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"resumed checkpoint: optimiser or RNG state does not fit this run ({exc})") from None
    if not (isinstance(epoch, int) and 0 <= epoch <= run.config.total_epochs and isinstance(history, list)):
        raise ValueError(f"resumed checkpoint: epoch {epoch!r} is outside the run's "
                         f"{run.config.total_epochs} epochs")
    run.start_epoch, run.history, run.elapsed = epoch, history[:epoch], float(elapsed)


def save_checkpoint(path, run: Run, epoch: int, kind: str = "last",
                    metrics: Optional[Dict[str, Any]] = None) -> None:
    """Write the run's state after ``epoch`` completed epochs, atomically and hashed."""
    write_checkpoint(path, {
        "kind": kind,
        "config": asdict(run.config),
        "input_shape": list(run.info["input_shape"]),
        "num_classes": int(run.info["num_classes"]),
        "state_dict": run.model.state_dict(),
        "epoch": int(epoch),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": _rng_state(run),
        "history": run.history,
        "elapsed": float(run.elapsed),
        "metrics": _plain(metrics or {}),
    })


def _plain(metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (str, int, float, bool, type(None), list, dict))}


# --------------------------------------------------------------------------- one epoch


def _values_at(run: Run, epoch: int, step: int, steps: int) -> Tuple[float, float, float]:
    """(ε, λ, lr) at ``step`` of ``epoch``; plain cross-entropy (ε = λ = 0) while pretraining."""
    gloro_epoch = epoch - run.config.pretrain_epochs
    if gloro_epoch < 0:
        return 0.0, 0.0, run.config.lr
    s = run.schedules
    return (s["epsilon_schedule"].at(gloro_epoch, step, steps), s["lam_schedule"].at(gloro_epoch, step, steps),
            s["lr_schedule"].at(gloro_epoch, step, steps))


def train_epoch(run: Run, epoch: int) -> Dict[str, float]:
    """Train one epoch (0-based ``epoch``). Returns the mean loss, the training clean
    accuracy and the training VRA (at the training ε, with the training bounds)."""
    config, model, device = run.config, run.model, run.device
    model.train()
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
    steps = len(run.train_loader)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss·n, correct, verified, n
    # A bar fed by hand: wrapping the DataLoader itself, tqdm would start (and drop) an extra
    # iterator, drawing one more shuffle from the loader's generator than the epoch uses.
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{config.total_epochs}", leave=False,
               disable=not (config.progress and run.rank == 0))
    eps = lam = lr = 0.0
    for step, (x, y) in enumerate(run.train_loader):
        eps, lam, lr = _values_at(run, epoch, step, steps)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        model.epsilon = eps
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        out = run.step(x)
        if epoch < config.pretrain_epochs:
            loss = torch.nn.functional.cross_entropy(out.logits, y)
        else:
            loss = compute_loss(config.loss, out, y, eps, lam)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if config.grad_clip is not None:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        with torch.no_grad():
            top = out.logits.argmax(dim=1)
            right = top == y
            certified = out.logits.gather(1, top.unsqueeze(1)).squeeze(1) > out.bottom
            sums += torch.stack([loss.detach().double() * y.numel(), right.sum().double(),
                                 (right & certified).sum().double(),
                                 torch.tensor(float(y.numel()), dtype=torch.float64, device=device)])
        bar.update(1)
        if run.rank == 0 and config.progress and step % 10 == 0:
            bar.set_postfix(loss=f"{float(sums[0] / sums[3]):.4f}")
    bar.close()
    if run.world > 1:
        dist.all_reduce(sums)
    loss_sum, correct, verified, n = sums.tolist()
    if n == 0:
        raise ValueError("the training split yielded no samples")
    return {"loss": loss_sum / n, "train_accuracy": correct / n, "train_vra": verified / n,
            "lr": lr, "epsilon": eps, "lam": lam}


# --------------------------------------------------------------------------- the run


def _write_metrics(run: Run, final: Optional[Dict[str, Any]] = None) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in run.history:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_COLUMNS})
    atomic_write_text(run.out_dir / "metrics.csv", buf.getvalue())
    doc = dict(_plain(final)) if final is not None else {"status": "running"}
    doc["history"] = run.history
    atomic_write_text(run.out_dir / "metrics.json", json.dumps(doc, indent=2) + "\n")


def _plot(kind: str, *args) -> None:
    from . import plots

    getattr(plots, kind)(*args)


def train(config: TrainConfig, log: Callable[..., None] = print,
          resume: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Train ``config.arch`` on ``config.dataset`` and certify its test split; returns the
    final metrics, with the trained model under ``"model"`` and this process's ``"rank"``.

    With ``resume`` (the checkpoint from :func:`resume_config`), continue from its epoch;
    the result is bit-identical to a run that was never interrupted (same device and
    thread count). Under ``torchrun --nproc_per_node N`` the batch is split over N
    DistributedDataParallel processes (``batch_size`` per process); buffers, the
    power-iteration iterates among them, are broadcast from rank 0 at every step, so all
    ranks share one bound. Rank 0 writes the files.
    """
    run = setup_run(config, resume)
    config = run.config
    model = run.model
    last_plot = time.perf_counter()
    for epoch in range(run.start_epoch, config.total_epochs):
        start = time.perf_counter()
        stats = train_epoch(run, epoch)
        row: Dict[str, Any] = {"epoch": epoch + 1, **stats}
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.total_epochs:
            result = _evaluate(model, run.test_loader, config.epsilon)
            row.update({k: result[k] for k in ("clean_accuracy", "vra", "vra_estimate", "rejection_rate",
                                               "lipschitz", "lipschitz_estimate")})
        seconds = time.perf_counter() - start
        run.elapsed += seconds
        row.update(seconds=seconds, elapsed=run.elapsed)
        run.history.append(row)
        if run.rank == 0:
            save_checkpoint(run.out_dir / "last.pt", run, epoch + 1)
            _write_metrics(run)
            if time.perf_counter() - last_plot > 30:  # drawing costs ~0.3 s: not every short epoch
                _plot("training_curves", run.history, config.epsilon, run.out_dir / "curves.png")
                last_plot = time.perf_counter()
            if config.progress:
                test = (f"  clean {row['clean_accuracy']:.4f}  VRA {row['vra']:.4f}"
                        if "vra" in row else "")
                log(f"epoch {epoch + 1:3d}/{config.total_epochs}  loss {row['loss']:.4f}{test}  "
                    f"ε {row['epsilon']:.3f}  λ {row['lam']:.3g}  lr {row['lr']:.2e}  {seconds:.1f}s")
    model.epsilon = config.epsilon
    metrics = _evaluate(model, run.test_loader, config.epsilon)
    metrics.update(train_seconds=run.elapsed, device=str(run.device), epochs=config.total_epochs,
                   dataset=config.dataset, arch=config.arch,
                   train_epsilon=config.effective_train_epsilon, world_size=run.world,
                   preset=config.preset)
    if run.rank == 0:
        metrics["certified_accuracy_curve"] = robustness_plot(model, run.test_loader, [config.epsilon],
                                                             run.out_dir / "robustness.png")
        save_checkpoint(run.out_dir / "model.pt", run, config.total_epochs, kind="final", metrics=metrics)
        _write_metrics(run, metrics)
        _plot("training_curves", run.history, config.epsilon, run.out_dir / "curves.png")
    if run.world > 1:
        dist.barrier()
    metrics["model"] = model
    metrics["rank"] = run.rank
    return metrics


def _evaluate(model: GloroNet, loader, epsilon: float) -> Dict[str, Any]:
    """Both certificates; the estimate alone for a model with a layer that has no provable bound."""
    try:
        return evaluate(model, loader, epsilon, certificate="sound")
    except NotImplementedError:
        return evaluate(model, loader, epsilon, certificate="estimate")


def robustness_plot(model: GloroNet, loader, epsilons: List[float], path) -> Dict[str, List[float]]:
    """Certified accuracy against radius for the sound certificate and the estimate (the
    estimate alone where a layer has no provable bound), plotted to ``path``."""
    from . import plots

    radii: Dict[str, torch.Tensor] = {}
    for kind in ("sound", "estimate"):
        try:
            radii[kind], correct = certified_radii(model, loader, kind)
        except NotImplementedError:
            continue
    return plots.robustness_curve(radii, correct, epsilons, path)
