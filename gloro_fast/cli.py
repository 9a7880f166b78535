"""Command line: ``gloro-fast train`` and ``gloro-fast certify`` (also ``python -m gloro_fast``)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional

import torch

from . import losses, models
from .data import DATASETS, load_dataset, make_loaders
from .train import TrainConfig, evaluate, load_checkpoint, resolve_device, train


def _add_train(sub) -> None:
    d = TrainConfig()
    p = sub.add_parser("train", help="train a GloRo net, certify its test set, save a checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    p.add_argument("--data-dir", default=d.data_dir, help="folder with the dataset's standard files")
    p.add_argument("--arch", choices=sorted(models.ARCHITECTURES), default=d.arch)
    p.add_argument("--epsilon", type=float, default=d.epsilon, help="certification radius (l2)")
    p.add_argument("--train-epsilon", type=float, default=None,
                   help="radius used in training (default: 1.5 × --epsilon)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--lr-final", type=float, default=d.lr_final)
    p.add_argument("--warmup", type=int, default=d.warmup, help="epochs of ε/λ ramp-up")
    p.add_argument("--loss", choices=losses.LOSSES, default=d.loss)
    p.add_argument("--lam", type=float, default=d.lam, help="TRADES λ (after ramp-up)")
    p.add_argument("--bound", choices=("margin", "global"), default=d.bound)
    p.add_argument("--n-iter", type=int, default=d.n_iter, help="power iterations per step")
    p.add_argument("--depth", type=int, default=None, help="LiResNet depth")
    p.add_argument("--width", type=int, default=None, help="LiResNet width")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--output-dir", default=d.output_dir)
    p.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")


def _add_certify(sub) -> None:
    p = sub.add_parser("certify", help="certify a test set with a saved checkpoint")
    p.add_argument("checkpoint", help="model.pt written by `gloro-fast train`")
    p.add_argument("--dataset", choices=DATASETS, default=None, help="default: the training dataset")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epsilon", type=float, default=None, help="default: the checkpoint's ε")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gloro-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_certify(sub)
    return parser


def _report(metrics, seconds: Optional[float] = None) -> None:
    print(f"clean accuracy : {metrics['clean_accuracy'] * 100:.2f}%")
    print(f"VRA (ε={metrics['epsilon']:g}) : {metrics['vra'] * 100:.2f}%")
    print(f"rejection rate : {metrics['rejection_rate'] * 100:.2f}%")
    print(f"Lipschitz K    : {metrics['lipschitz']:.4f}")
    if seconds is not None:
        print(f"wall time      : {seconds:.1f} s")


def _train(args) -> int:
    arch_kwargs = {k: getattr(args, k) for k in ("depth", "width") if getattr(args, k) is not None}
    if arch_kwargs and args.arch != "liresnet":
        raise ValueError("--depth/--width apply to --arch liresnet only")
    config = TrainConfig(
        dataset=args.dataset, data_dir=args.data_dir, arch=args.arch, epsilon=args.epsilon,
        train_epsilon=args.train_epsilon, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, lr_final=args.lr_final, warmup=args.warmup, loss=args.loss, lam=args.lam,
        bound=args.bound, n_iter=args.n_iter, seed=args.seed, device=args.device,
        output_dir=args.output_dir, progress=not args.no_progress, arch_kwargs=arch_kwargs,
    )
    start = time.perf_counter()
    metrics = train(config)
    seconds = time.perf_counter() - start
    if metrics["rank"] != 0:
        return 0
    print(f"{config.arch} on {config.dataset}, {config.epochs} epochs, {metrics['device']}"
          + (f" × {metrics['world_size']} processes" if metrics["world_size"] > 1 else ""))
    _report(metrics, seconds)
    print(f"checkpoint     : {config.output_dir}/model.pt")
    return 0


def _certify(args) -> int:
    device = resolve_device(args.device)
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    model = load_checkpoint(args.checkpoint, map_location=device)
    config = ckpt.get("config", {})
    dataset = args.dataset or config.get("dataset")
    data_dir = args.data_dir if args.data_dir is not None else config.get("data_dir")
    _, test_set, _ = load_dataset(dataset, data_dir, seed=config.get("seed", 0))
    _, loader = make_loaders(test_set, test_set, args.batch_size)
    start = time.perf_counter()
    metrics = evaluate(model, loader, args.epsilon)
    _report(metrics, time.perf_counter() - start)
    print(json.dumps({k: v for k, v in metrics.items()}, sort_keys=True))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _train(args) if args.command == "train" else _certify(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"gloro-fast: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
