"""Run the digits benchmark or ccnn-eval with the spectral and diffstride modes in one convention.

The conversion modes use :data:`ccnn_convert.core.spectral.MODE_CONVENTION` (spectral) and
``DIFFSTRIDE_MODE_CONVENTION`` (diffstride) (issue 25: the
published crop keeps input row ``-h/2`` as the Nyquist row and gives an odd map whose rfft
columns are all kept one column less; the symmetric one takes the mean of rows ``+h/2`` and
``-h/2`` and keeps the width). This sets it for one run, then hands the remaining arguments to
``benchmarks/train_digits.py`` or to ``ccnn-eval``, so that the two conventions are measured by
the same code (the measurements are in the comment above those constants):

    python benchmarks/spectral_conventions.py published digits --models spectral --seeds 0,1,2 --shift 0 --skip-cost
    python benchmarks/spectral_conventions.py symmetric eval efficientnet_lite0 \\
        --data ../shared/data/imagenet-sample/val --modes spectral,diffstride --json out.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ccnn_convert.core import downsample  # noqa: E402
from ccnn_convert.core.spectral import CONVENTIONS  # noqa: E402

TOOLS = ("digits", "eval")


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] not in CONVENTIONS or argv[1] not in TOOLS:
        raise SystemExit(f"usage: spectral_conventions.py {{{','.join(CONVENTIONS)}}} {{{','.join(TOOLS)}}} ARGS...")
    convention, tool, rest = argv[0], argv[1], argv[2:]
    downsample.MODE_CONVENTION = convention  # read by spectral_downsample at run time
    downsample.DIFFSTRIDE_MODE_CONVENTION = convention  # read for each new DiffStride2d
    print(f"# modes' convention: {convention}", file=sys.stderr, flush=True)
    if tool == "digits":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import train_digits

        train_digits.main(rest)
    else:
        from ccnn_convert.cli.entry import evaluate

        sys.argv = ["ccnn-eval", *rest]
        evaluate()


if __name__ == "__main__":
    main(sys.argv[1:])
