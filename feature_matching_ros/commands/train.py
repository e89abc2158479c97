"""``fmr train MODEL``: training commands, one sub-subcommand per model (lightglue, sandesc, eloftr); a new
model joins by adding a ``_register_<model>`` function to :data:`MODELS`.

Every model takes the same data and run options (:func:`_add_data_arguments`, :func:`_add_run_arguments`);
options named like a field of the model's ``TrainConfig`` fill that field (:func:`_config_from_args`).
"""

from __future__ import annotations

import argparse
from dataclasses import fields


def _add_data_arguments(parser: argparse.ArgumentParser, defaults) -> None:
    parser.add_argument("--train", nargs="+", default=[], metavar="DIR",
                        help="make-pairs folders and/or real pair sets (scripts/build_real_pairs.py) for training")
    parser.add_argument("--eval", nargs="+", default=[], metavar="DIR",
                        help="make-pairs folders and/or real pair sets for validation")
    parser.add_argument("--megadepth-root", help="MegaDepth root (images and depth h5 paths are relative to it)")
    parser.add_argument("--megadepth-scenes", nargs="+", default=[], metavar="NPZ", help="scene_info npz files")
    parser.add_argument("--out", default=defaults.out, help="run folder: checkpoint.pt, history.json, validation.json")


def _add_run_arguments(parser: argparse.ArgumentParser, defaults, export_help: str) -> None:
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--precision", default=defaults.precision, choices=("auto", "fp32", "fp16", "bf16"))
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    parser.add_argument("--max-minutes", type=float, default=defaults.max_minutes,
                        help="stop with a checkpoint after this")
    parser.add_argument("--deadline", type=float, default=0.0,
                        help="unix time by which training stops; the learning-rate schedule ends there too "
                             "(one time-boxed run; 0 = none)")
    parser.add_argument("--stop-at", type=float, default=0.0,
                        help="unix time at which this session stops with a checkpoint, the schedule following "
                             "--steps (a run spread over sessions: --resume continues it; 0 = none)")
    parser.add_argument("--log-every", type=int, default=defaults.log_every)
    parser.add_argument("--export", help=export_help)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")


def _size(text: str) -> tuple[int, int]:
    """"640x480" -> (640, 480)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 640x480") from None
    return width, height


def _config_from_args(config_cls, args: argparse.Namespace, **values):
    """``config_cls`` filled from the parsed options that share a field's name, then from ``values``."""
    names = {field.name for field in fields(config_cls)}
    return config_cls(**({k: v for k, v in vars(args).items() if k in names} | values))


def _register_lightglue(models) -> None:
    from feature_matching_ros.training.lightglue import TrainConfig

    d = TrainConfig()
    parser = models.add_parser(
        "lightglue", help="fine-tune ALIKED-LightGlue to be detector-agnostic (arXiv 2602.08430 recipe)",
        description="Starts from the official ALIKED-LightGlue; the descriptor network stays frozen; keypoints of "
                    "several detectors, all described by ALIKED, labelled as glue-factory does. "
                    "Data: folders from `fmr make-pairs`, real pair sets (scripts/build_real_pairs.py), "
                    "and/or MegaDepth scene_info + depth h5.")
    _add_data_arguments(parser, d)
    parser.add_argument("--cache", help="feature cache folder (default OUT/cache)")
    parser.add_argument("--detectors", nargs="+", default=list(d.detectors))
    parser.add_argument("--descriptor", default=d.descriptor, choices=("aliked", "disk", "sandesc"),
                        help="frozen descriptor network sampled at every detector's keypoints (sandesc: starts "
                             "from the official ALIKED-LightGlue; SANDESC weights of the first detector)")
    parser.add_argument("--max-keypoints", type=int, default=d.max_keypoints)
    parser.add_argument("--decay-start", type=float, default=d.decay_start, help="fraction of steps at constant lr")
    parser.add_argument("--final-lr-factor", type=float, default=d.final_lr_factor)
    _add_run_arguments(parser, d, "write fp16 safetensors shards of the final model to this folder")
    parser.set_defaults(func=_run_lightglue)


def _run_lightglue(args: argparse.Namespace) -> int:
    from feature_matching_ros.config import DETECTORS
    from feature_matching_ros.training.lightglue import TrainConfig, train_lightglue

    unknown = [d for d in args.detectors if d not in DETECTORS]
    if unknown:
        raise SystemExit(f"unknown detectors {unknown}; allowed: {', '.join(DETECTORS)}")
    train_lightglue(_config_from_args(TrainConfig, args, detectors=tuple(args.detectors)), resume=args.resume)
    return 0


def _register_sandesc(models) -> None:
    from feature_matching_ros.config import DETECTORS
    from feature_matching_ros.training.sandesc import TrainConfig

    d = TrainConfig()
    parser = models.add_parser(
        "sandesc", help="train the SANDESC descriptor network on one detector's keypoints",
        description="U-Net descriptor network (feature_matching_ros/models/sandesc.py) trained from scratch with "
                    "the modified triplet loss (random -> hardest negative curriculum) on GT correspondences "
                    "between the chosen detector's keypoints. Data: folders from `fmr make-pairs` (and/or "
                    "MegaDepth scene_info + depth h5). --export DIR writes DIR/sandesc_<detector>.safetensors, "
                    "the file `descriptor: sandesc` loads from resource/sandesc/ (or FMR_SANDESC_WEIGHTS).")
    _add_data_arguments(parser, d)
    parser.add_argument("--cache", help="keypoint + label cache folder (default OUT/cache)")
    parser.add_argument("--detector", default=d.detector, choices=DETECTORS,
                        help="whose keypoints the descriptors are trained on (one weights file per detector)")
    parser.add_argument("--max-keypoints", type=int, default=d.max_keypoints)
    parser.add_argument("--final-lr", type=float, default=d.final_lr, help="learning rate at the end (cosine decay)")
    parser.add_argument("--warmup", type=float, default=d.warmup, help="fraction of the run spent warming up")
    parser.add_argument("--margin", type=float, default=d.margin)
    parser.add_argument("--p-decay", type=float, default=d.p_decay,
                        help="per-step factor of the random-negative probability (starts at 1)")
    parser.add_argument("--no-augment", action="store_true", help="no horizontal flips of the pairs")
    parser.add_argument("--eval-every", type=int, default=d.eval_every)
    _add_run_arguments(parser, d, "write fp16 sandesc_<detector>.safetensors (+ history, validation) here")
    parser.set_defaults(func=_run_sandesc)


def _run_sandesc(args: argparse.Namespace) -> int:
    from feature_matching_ros.training.sandesc import TrainConfig, train_sandesc

    train_sandesc(_config_from_args(TrainConfig, args, augment=not args.no_augment), resume=args.resume)
    return 0


def _register_eloftr(models) -> None:
    from feature_matching_ros.training.eloftr import TrainConfig

    d = TrainConfig()
    parser = models.add_parser(
        "eloftr", help="train Efficient LoFTR from scratch (paper losses) on synthetic pairs",
        description="Coarse focal loss on ground-truth cell pairs, fine stage-1 focal loss and stage-2 sub-pixel L2 "
                    "(weight 0.25); ground truth from the exact homography / depth + pose of each pair. "
                    "Data: folders from `fmr make-pairs`, real pair sets (scripts/build_real_pairs.py), and/or "
                    "MegaDepth; every pair is fitted to --image-size.")
    _add_data_arguments(parser, d)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    parser.add_argument("--fine-per-pair", type=int, default=d.fine_per_pair,
                        help="ground-truth coarse pairs refined per image pair")
    parser.add_argument("--max-pairs", type=int, default=0, help="use at most this many training pairs (0 = all)")
    parser.add_argument("--image-size", type=_size, default=d.image_size, metavar="WxH",
                        help="every pair is scaled to cover this size and centre-cropped (multiples of 32; "
                             "default %(default)s)")
    _add_run_arguments(parser, d, "write fp16 safetensors shards of the final model to this folder")
    parser.set_defaults(func=_run_eloftr)


def _run_eloftr(args: argparse.Namespace) -> int:
    from feature_matching_ros.training.eloftr import TrainConfig, train_eloftr

    train_eloftr(_config_from_args(TrainConfig, args), resume=args.resume)
    return 0


MODELS = (_register_lightglue, _register_sandesc, _register_eloftr)


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train models (lightglue, sandesc, eloftr)",
                                   description="Training commands; see `fmr train MODEL --help`.")
    models = parser.add_subparsers(dest="model", required=True, metavar="MODEL")
    for register_model in MODELS:
        register_model(models)
