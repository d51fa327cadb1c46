"""The built-in demo model: small merged weights shipped inside the package, so a fresh install
upscales with a trained model and no download. It has S3Diff's architecture at a small size,
trained from scratch on a CPU (training/configs/demo.yaml); model/builtin/demo/MODEL_CARD.md says
what it is and how well it does. Real weights, given explicitly, always take precedence."""
from __future__ import annotations

import logging
from pathlib import Path

BUILTIN_NAME = "builtin-demo"
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin" / "demo"

logger = logging.getLogger(__name__)


def resolve_weights(weights: str | Path | None) -> tuple[Path, str]:
    """(merged folder, how to name it): the given folder, or the built-in demo model when None."""
    if weights is not None:
        return Path(weights), str(weights)
    logger.info("no weights configured: using the built-in demo model (%s), a small CPU-trained demo, "
                "not S3Diff's released quality", BUILTIN_DIR)
    return BUILTIN_DIR, BUILTIN_NAME
