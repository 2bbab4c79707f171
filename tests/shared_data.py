"""Where test data lives.

``tests/data`` ships with the repository: the tests the package's correctness depends on use it.
``shared/`` beside the checkout holds larger read-only reference material (a 250-image ImageNet
sample, reference sequences); only optional tests read it, and they skip when it is absent.
``CCNN_SHARED_DIR`` points elsewhere (set it to a missing folder to check that a fresh clone,
with nothing beside it, passes).
"""

import os
from pathlib import Path

TESTS_DATA = Path(__file__).resolve().parent / "data"
BUNDLED_VAL = TESTS_DATA / "imagenet-mini"

SHARED = Path(os.environ.get("CCNN_SHARED_DIR") or Path(__file__).resolve().parents[1].parent / "shared")
SAMPLE_VAL = SHARED / "data" / "imagenet-sample" / "val"
