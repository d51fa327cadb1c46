"""`s3diff train --config FILE`: run the training recipe of a YAML config (training/configs/)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train S3Diff (paper recipe or the tiny smoke config)")
    parser.add_argument("--config", required=True, type=Path, help="YAML config, e.g. training/configs/tiny.yaml")
    parser.add_argument("--max-steps", type=int, default=None, help="override the config's max_steps")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from s3diff_serve.model.errors import S3DiffError
    from s3diff_serve.training.config import TrainConfig
    from s3diff_serve.training.data import UnreadableImageError
    from s3diff_serve.evaluation.cache import MissingWeightsError

    try:
        config = TrainConfig.from_yaml(args.config)
        if args.max_steps is not None:
            config = config.model_copy(update={"max_steps": args.max_steps})
        from s3diff_serve.training.trainer import Trainer

        last = Trainer(config).run()
    except ValidationError as exc:
        print(f"error: {args.config}: invalid training config\n{exc}")
        return 2
    except (S3DiffError, MissingWeightsError, UnreadableImageError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    print(f"done: last checkpoint {last}" if last else "done: already at max_steps, nothing to train")
    return 0
