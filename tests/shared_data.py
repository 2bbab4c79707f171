"""Where the read-only reference material lives: ``shared/`` beside the checkout."""

from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SAMPLE_VAL = SHARED / "data" / "imagenet-sample" / "val"
