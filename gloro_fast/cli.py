"""Command line: ``gloro-fast train``, ``certify``, ``info`` and ``export`` (also ``python -m gloro_fast``).

Every expected failure (a bad argument, a missing or damaged file, a folder that cannot be
written) is reported as one line, ``gloro-fast: error: …``, with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import losses, models
from ._validation import BOUNDS, check_epsilon, check_positive_int
from .bounds import CERTIFICATES
from .data import DATASETS, load_dataset, make_loaders
from .files import check_output_dir
from .ops import get_backend, resolve_backend
from .presets import PRESETS, preset
from .train import (
    AMP_MODES,
    AUGMENTATIONS,
    OPTIMIZERS,
    TrainConfig,
    evaluate,
    load_checkpoint,
    model_from_run,
    read_run,
    resolve_device,
    resume_config,
    robustness_plot,
    train,
)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``gloro-fast: error:`` line (exit 2), like every
    other expected failure."""

    def error(self, message):
        raise _UsageError(message)


# Train options whose value is a TrainConfig field: (flags, field, argparse keywords).
_TRAIN_OPTIONS = [
    (("--dataset",), "dataset", dict(choices=DATASETS)),
    (("--data-dir",), "data_dir", dict(help="folder with the dataset's standard files")),
    (("--arch",), "arch", dict(choices=sorted(models.ARCHITECTURES))),
    (("--epsilon",), "epsilon", dict(type=float, help="certification (test) radius, l2")),
    (("--train-epsilon",), "train_epsilon",
     dict(type=float, help="radius trained at, the base of --epsilon-schedule (default: 1.5 × --epsilon)")),
    (("--epsilon-schedule",), "epsilon_schedule", dict(help="GloRo schedule of the train ε")),
    (("--epochs",), "epochs", dict(type=int)),
    (("--pretrain-epochs",), "pretrain_epochs",
     dict(type=int, help="epochs of plain cross-entropy before GloRo training")),
    (("--batch-size",), "batch_size", dict(type=int, help="per process under torchrun")),
    (("--optimizer",), "optimizer", dict(choices=OPTIMIZERS)),
    (("--lr",), "lr", dict(type=float, help="learning rate, the base of --lr-schedule")),
    (("--lr-schedule",), "lr_schedule", dict(help="GloRo schedule of the learning rate")),
    (("--weight-decay",), "weight_decay", dict(type=float)),
    (("--momentum",), "momentum", dict(type=float, help="SGD momentum")),
    (("--grad-clip",), "grad_clip", dict(type=float, help="clip the gradient's l2 norm to this")),
    (("--loss",), "loss", dict(choices=losses.LOSSES)),
    (("--lam",), "lam", dict(type=float, help="TRADES λ, the base of --lam-schedule")),
    (("--lam-schedule",), "lam_schedule", dict(help="GloRo schedule of the TRADES λ")),
    (("--bound",), "bound", dict(choices=BOUNDS)),
    (("--n-iter",), "n_iter", dict(type=int, help="power iterations per training step")),
    (("--amp",), "amp", dict(choices=AMP_MODES, help="autocast the network (Lipschitz bounds stay float32)")),
    (("--augment",), "augment", dict(choices=AUGMENTATIONS, help="auto: crop-flip for colour images")),
    (("--crop-padding",), "crop_padding",
     dict(type=int, help="zero padding of the random crop, pixels (default: 1/8 of the image side)")),
    (("--num-workers",), "num_workers", dict(type=int, help="DataLoader workers (default: 4 for streamed data)")),
    (("--eval-every",), "eval_every", dict(type=int, help="evaluate the test split every N epochs")),
    (("--seed",), "seed", dict(type=int)),
    (("--device",), "device", dict(help="auto, cpu, cuda, cuda:N")),
    (("--output-dir",), "output_dir", dict(help="run folder: checkpoints, metrics, plots")),
]


def _add_train(sub) -> None:
    d = TrainConfig()
    p = sub.add_parser(
        "train", help="train a GloRo net, certify its test set, save checkpoints, metrics and plots",
        description="Train a GloRo net. Precedence: options given here, then --preset, then the "
                    "defaults shown. Schedules: fixed, linear, linear_half, logarithmic, "
                    "logarithmic_half, cos, decay_to_V, decay_after_half_to_V or the compact form "
                    "[0.01]-log-[50%:1.]-[1.] (values are multiples of the base).")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a paper's settings (see README)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last.pt (its configuration is kept)")
    for flags, name, kwargs in _TRAIN_OPTIONS:
        default = getattr(d, name)
        shown = f"default: {default}".replace("%", "%%") if default is not None else ""
        help_text = "; ".join(filter(None, [kwargs.pop("help", ""), shown]))
        p.add_argument(*flags, dest=name, default=None, help=help_text, **kwargs)
    p.add_argument("--depth", type=int, default=None, help="LiResNet depth")
    p.add_argument("--width", type=int, default=None, help="LiResNet width")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                   help="no progress bars or per-epoch lines")


def _add_certify(sub) -> None:
    p = sub.add_parser("certify", help="certify a test set with a saved checkpoint")
    p.add_argument("checkpoint", help="model.pt written by `gloro-fast train`")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="default: the name of the checkpoint's training dataset")
    p.add_argument("--data-dir", default=None,
                   help="folder with the dataset's files (only its test split is read); never "
                        "taken from the checkpoint")
    p.add_argument("--epsilon", type=float, nargs="+", default=None, metavar="EPS",
                   help="one or more radii (default: the checkpoint's ε)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also write certified accuracy against radius to this PNG file")
    p.add_argument("--certificate", choices=CERTIFICATES, default="sound",
                   help="which certificate 'VRA' and 'rejection rate' refer to (both are printed): "
                        "sound (provable, the default) or estimate (the GloRo paper's)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print a checkpoint's model, each layer's Lipschitz bracket "
                                    "[lower, upper] and the backend in use")
    p.add_argument("checkpoint", help="model.pt or last.pt written by `gloro-fast train`")
    p.add_argument("--device", default="cpu")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="freeze a checkpoint into a standalone certified program "
                                      "(torch.export .pt2 or ONNX) that needs no gloro_fast to run")
    p.add_argument("checkpoint", help="model.pt or last.pt written by `gloro-fast train`")
    p.add_argument("--format", choices=("pt2", "onnx"), required=True)
    p.add_argument("-o", "--output", required=True, help="file to write (e.g. model.onnx)")
    p.add_argument("--certificate", choices=CERTIFICATES, default="sound",
                   help="the certificate the program decides with (default: sound)")
    p.add_argument("--epsilon", type=float, default=None, help="default: the checkpoint's ε")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gloro-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_certify(sub)
    _add_info(sub)
    _add_export(sub)
    return parser


def _report(metrics, seconds: Optional[float] = None) -> None:
    """Clean accuracy, then VRA / rejection rate / K of each certificate evaluated."""
    print(f"clean accuracy      : {metrics['clean_accuracy'] * 100:.2f}%")
    for kind in ("sound", "estimate"):
        if f"vra_{kind}" not in metrics:
            continue
        print(f"VRA {kind:<8} ε={metrics['epsilon']:<6g}: {metrics[f'vra_{kind}'] * 100:.2f}%   "
              f"rejected {metrics[f'rejection_rate_{kind}'] * 100:.2f}%   "
              f"K {metrics[f'lipschitz_{kind}']:.6g}")
    if "vra_sound" not in metrics and "vra" in metrics:  # metrics of an older format
        print(f"VRA (ε={metrics['epsilon']:g})         : {metrics['vra'] * 100:.2f}%")
    if seconds is not None:
        print(f"wall time           : {seconds:.1f} s")


def _print_brackets(model) -> None:
    """Each layer's provable bracket lower ≤ Lip ≤ upper (power iteration converged)."""
    brackets = model.lipschitz_bracket()
    width = max(len(b.name) for b in brackets)
    print(f"{'layer':<{width}}  {'type':<10} {'lower':>12} {'upper':>12} {'upper/lower':>12}  iterations")
    for b in brackets:
        ratio = "exact" if b.ratio == 1.0 else f"{b.ratio:.6f}"
        steps = f"{b.iterations} ({b.status})" if b.iterations is not None else "-"
        print(f"{b.name:<{width}}  {b.layer:<10} {b.lower:>12.6g} {b.upper:>12.6g} {ratio:>12}  {steps}")


def _explicit_train_options(args) -> Dict[str, Any]:
    given = {name: getattr(args, name) for _, name, _ in _TRAIN_OPTIONS if getattr(args, name) is not None}
    if args.progress is not None:
        given["progress"] = args.progress
    arch_kwargs = {k: getattr(args, k) for k in ("depth", "width") if getattr(args, k) is not None}
    if arch_kwargs:
        given["arch_kwargs"] = arch_kwargs
    return given


def _train(args) -> int:
    given = _explicit_train_options(args)
    resume = None
    if args.resume is not None:
        if args.preset is not None:
            raise ValueError("--preset cannot be combined with --resume (a resumed run keeps its configuration)")
        config, resume = resume_config(args.resume, given)
    else:
        values = preset(args.preset) if args.preset else {}
        if "arch_kwargs" in given and values.get("arch_kwargs"):
            given["arch_kwargs"] = {**values["arch_kwargs"], **given["arch_kwargs"]}
        values.update(given)
        arch = values.get("arch", TrainConfig.arch)
        if values.get("arch_kwargs") and arch != "liresnet":
            raise ValueError("--depth/--width apply to --arch liresnet only")
        try:
            config = TrainConfig(**values)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
    start = time.perf_counter()
    metrics = train(config, resume=resume)
    seconds = time.perf_counter() - start
    if metrics["rank"] != 0:
        return 0
    print(f"{config.arch} on {config.dataset}, {config.total_epochs} epochs, {metrics['device']}"
          + (f" × {metrics['world_size']} processes" if metrics["world_size"] > 1 else ""))
    _report(metrics, seconds)
    _print_brackets(metrics["model"])
    print(f"run folder     : {config.output_dir} (model.pt, last.pt, metrics.csv/json, curves.png, "
          "robustness.png)")
    return 0


def _certify(args) -> int:
    device = resolve_device(args.device)
    epsilons = [check_epsilon(e, "--epsilon") for e in args.epsilon] if args.epsilon else None
    check_positive_int("--batch-size", args.batch_size)
    if args.plot is not None:
        check_output_dir(Path(args.plot).expanduser().parent, "--plot folder")
    ckpt, config = read_run(args.checkpoint)  # read and hash-checked once
    model = model_from_run(ckpt, config, args.checkpoint, map_location=device)
    # Files carry no authority: the data comes from this command line only. The checkpoint
    # may name the dataset (the name picks a reader), never the folder it is read from.
    dataset = args.dataset or config.dataset
    _, test_set, info = load_dataset(dataset, args.data_dir, seed=config.seed, split="test")
    if [*info["input_shape"]] != ckpt["input_shape"] or info["num_classes"] != ckpt["num_classes"]:
        raise ValueError(f"{dataset} (input {info['input_shape']}, {info['num_classes']} classes) does not "
                         f"fit the checkpoint's model (input {tuple(ckpt['input_shape'])}, "
                         f"{ckpt['num_classes']} classes)")
    _, loader = make_loaders(None, test_set, args.batch_size, pin_memory=device.type == "cuda")
    results = []
    for eps in epsilons or [model.epsilon]:
        start = time.perf_counter()
        metrics = evaluate(model, loader, eps, certificate=args.certificate)
        _report(metrics, time.perf_counter() - start)
        results.append(metrics)
    _print_brackets(model)
    if args.plot is not None:
        robustness_plot(model, loader, [r["epsilon"] for r in results], Path(args.plot).expanduser())
        print(f"plot                : {args.plot}")
    print(json.dumps(results[0] if len(results) == 1 else results, sort_keys=True))
    return 0


def _info(args) -> int:
    device = resolve_device(args.device)
    model = load_checkpoint(args.checkpoint, map_location=device)
    print(model)
    print(f"backend        : {get_backend()} → " + ", ".join(
        f"{op} {resolve_backend(device, op)}" for op in
        ("power_iteration_conv", "power_iteration_linear", "class_distances", "bottom_logit")))
    print(f"device, dtype  : {device}, {model.head.weight.dtype}")
    sound = model.sound_bounds()
    estimate = model.estimate_bounds()
    print(f"K sound        : {sound.lipschitz:.6g}")
    print(f"K estimate     : {float(estimate.lipschitz):.6g}  (sound / estimate = "
          f"{sound.lipschitz / float(estimate.lipschitz):.6f})")
    kind = "per sample, from activation norms" if sound.steps is not None else "a priori"
    print(f"rounding allowance: forward pass in {sound.dtype} ({kind}); a-priori body error ≤ "
          f"{sound.body_error.a:.3g}·‖x‖ + {sound.body_error.b:.3g}")
    _print_brackets(model)
    return 0




def _export(args) -> int:
    from .export import export_onnx, export_pt2  # torch.onnx loads only when exporting

    model = load_checkpoint(args.checkpoint)
    write = export_onnx if args.format == "onnx" else export_pt2
    write(model, args.output, certificate=args.certificate, epsilon=args.epsilon)
    eps = model.epsilon if args.epsilon is None else args.epsilon
    shape = ", ".join(map(str, model.input_shape))
    print(f"wrote {args.output} ({args.format}, certificate {args.certificate}, ε = {eps:g}, "
          f"K = {float(model.lipschitz_constant(args.certificate)):.6g})")
    print(f"input x (B, {shape}) {model.head.weight.dtype}; outputs logits (B, {model.num_classes + 1}) "
          f"[f, f_⊥], certified (B,) int64 ({model.num_classes} = ⊥), radius (B,)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return {"train": _train, "certify": _certify, "info": _info,
                "export": _export}[args.command](args)
    except _UsageError as exc:
        print(f"gloro-fast: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"gloro-fast: error: {message}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
