"""The ``specwan`` command: the harness's commands (:mod:`harness.cli`) and ``report``.

The analysis is the top layer, so the command line that offers both is assembled here: the
harness's parser takes the report as an extra command and never imports the analysis.

    specwan report results/bench-qwen25coder [--slo ttft:500,tpot:100]
"""

from __future__ import annotations

import sys
from typing import Sequence

from harness.cli import Command
from harness.cli import main as harness_main


def _report_arguments(parser) -> None:
    from analysis import report  # pandas and matplotlib load only when the report is asked for

    report.add_arguments(parser)


def _report(args) -> int:
    from analysis import report

    return report.run(args, prog="specwan report")


REPORT = Command("build the report of run folders or sweeps: tables with confidence intervals, figures, "
                 "each number's provenance (= python -m analysis.report)", _report_arguments, _report)


def main(argv: Sequence[str] | None = None) -> int:
    """``specwan COMMAND ...``: every harness command, and ``report``."""
    return harness_main(argv, extra={"report": REPORT})


if __name__ == "__main__":
    sys.exit(main())
