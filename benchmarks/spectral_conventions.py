"""Run the digits benchmark with the spectral and diffstride modes in one convention.

The convention is a conversion option (``convert(..., spectral_convention=...)``; on the commands
``--spectral-convention published|symmetric``, default published: the measurements are in the
comment above :data:`ccnn_convert.core.spectral.MODE_CONVENTION`). ``benchmarks/train_digits.py``
has no such option, so this runs it with every spectral and diffstride conversion given the
convention named first, and hands it the remaining arguments:

    python benchmarks/spectral_conventions.py published --models spectral --seeds 0,1,2 --shift 0 --skip-cost

The pretrained comparison needs no script:

    ccnn-eval efficientnet_lite0 --data ../shared/data/imagenet-sample/val --modes spectral,diffstride \\
        --spectral-convention symmetric --json out.json
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ccnn_convert import convert  # noqa: E402
from ccnn_convert.core.spectral import CONVENTIONS  # noqa: E402

CONVENTION_MODES = ("spectral", "diffstride")


def _convert_in(convention: str, model, mode: str = "checkered", **options):
    """``convert`` with ``spectral_convention`` for the modes that take it."""
    if mode in CONVENTION_MODES:
        options["spectral_convention"] = convention
    return convert(model, mode=mode, **options)


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in CONVENTIONS:
        raise SystemExit(f"usage: spectral_conventions.py {{{','.join(CONVENTIONS)}}} TRAIN_DIGITS_ARGS...")
    convention, rest = argv[0], argv[1:]
    print(f"# spectral and diffstride conversions: spectral_convention={convention}", file=sys.stderr, flush=True)
    import train_digits

    train_digits.convert = functools.partial(_convert_in, convention)  # the name its build() calls
    train_digits.main(rest)


if __name__ == "__main__":
    main(sys.argv[1:])
