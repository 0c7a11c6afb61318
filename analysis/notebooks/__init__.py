"""The suite's notebooks, kept as jupytext "percent" scripts (``# %%`` cells) beside this file so
they diff as code, and rendered to ``.ipynb`` on demand:

    python -m analysis.notebooks render [--out DIR]        # default DIR: results/notebooks

- ``walkthrough.py``: one run: its manifest, its requests, TTFT/TPOT/acceptance recomputed
  by hand from the records, one request's rounds on a time axis;
- ``sweep.py``: several runs over systems x networks: the summary table with CIs, the paired
  speedup table, the speedup against the RTT;
- ``decision_map.py``: runs over RTT x uplink points: the best system per point on an
  objective, with its margin over the runner-up (:mod:`analysis.decision`).

Each takes its input run folder(s) from its ``parameters`` cell (``runs = ...``; papermill
injects values after that cell) or, when that is left as None, from the environment variable
``SPECWAN_RUNS`` (paths separated by ``os.pathsep``), and ends by printing its key figures as
one line (:func:`report_result`) after asserting them against :mod:`analysis.stats`.
jupytext, and nbclient with ipykernel to execute them, are dev dependencies: nothing here
imports them until asked to render.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parent
NOTEBOOKS: tuple[str, ...] = ("walkthrough", "sweep", "decision_map")
RUNS_ENV = "SPECWAN_RUNS"
RESULT_PREFIX = "specwan-notebook-result: "
DEFAULT_OUT = Path("results") / "notebooks"


class NotebookParameterError(ValueError):
    """A notebook was started without the input it needs (no run folder given)."""


def resolve_runs(runs: str | os.PathLike | Sequence[str | os.PathLike] | None, *, env: str = RUNS_ENV) -> list[str]:
    """The run folders a notebook reads: ``runs`` (one path or several) when set, else the
    paths in the environment variable ``env`` (separated by ``os.pathsep``).

    Raises :class:`NotebookParameterError` saying how to give them when neither is set.
    """
    if runs is None or (not isinstance(runs, (str, os.PathLike)) and not list(runs)):
        value = os.environ.get(env, "")
        paths = [p for p in value.split(os.pathsep) if p.strip()]
    elif isinstance(runs, (str, os.PathLike)):
        paths = [os.fspath(runs)]
    else:
        paths = [os.fspath(p) for p in runs]
    if not paths:
        raise NotebookParameterError(
            f"no input runs: set `runs` in the notebook's parameters cell (papermill: -p runs results/<run>), "
            f"or export {env}=results/<run>[{os.pathsep}more runs or sweep folders] before starting the kernel")
    return paths


def report_result(result: dict) -> None:
    """Print ``result`` as one line (:data:`RESULT_PREFIX` + JSON), the figures a notebook
    computed, for whoever ran it to read back (:func:`read_result`)."""
    print(RESULT_PREFIX + json.dumps(result, sort_keys=True, default=float))


def show(figure):
    """A matplotlib figure as an IPython PNG image, shown whatever the kernel's matplotlib
    backend (the suite's figures are drawn without pyplot); None shows nothing."""
    if figure is None:
        return None
    from IPython.display import Image

    from analysis.figures import figure_png

    return Image(data=figure_png(figure), format="png")


def read_result(notebook) -> dict:
    """The result an executed notebook (an ``nbformat`` node) printed with :func:`report_result`
    (the last one). Raises LookupError when it printed none."""
    found = None
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stdout":
                for line in output.get("text", "").splitlines():
                    if line.startswith(RESULT_PREFIX):
                        found = json.loads(line[len(RESULT_PREFIX):])
    if found is None:
        raise LookupError("the notebook printed no result line (was it executed to the end?)")
    return found


def script_path(name: str) -> Path:
    """The percent script of the notebook ``name`` (one of :data:`NOTEBOOKS`)."""
    if name not in NOTEBOOKS:
        raise ValueError(f"unknown notebook {name!r}: one of {', '.join(NOTEBOOKS)}")
    return NOTEBOOK_DIR / f"{name}.py"


def to_notebook(name: str):
    """The notebook ``name`` as an ``nbformat`` node, converted from its percent script by jupytext."""
    import jupytext

    return jupytext.read(script_path(name), fmt="py:percent")


def render(out_dir: str | os.PathLike = DEFAULT_OUT, names: Sequence[str] = NOTEBOOKS) -> list[Path]:
    """Write ``<name>.ipynb`` for each of ``names`` into ``out_dir`` (created), unexecuted;
    returns their paths."""
    import jupytext

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        path = out / f"{name}.ipynb"
        jupytext.write(to_notebook(name), path, fmt="ipynb")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m analysis.notebooks render [--out DIR] [NAME...]``: render the notebooks to
    .ipynb and print each path."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m analysis.notebooks",
                                     description="Render the suite's notebooks (jupytext percent scripts) to .ipynb.")
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("render", help="convert the percent scripts to .ipynb (not executed)")
    cmd.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default: {DEFAULT_OUT})")
    cmd.add_argument("names", nargs="*", metavar="NAME",
                     help=f"notebooks to render (default: all of {', '.join(NOTEBOOKS)})")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in NOTEBOOKS]
    if unknown:
        parser.error(f"unknown notebook(s) {', '.join(unknown)}: choose from {', '.join(NOTEBOOKS)}")
    try:
        paths = render(args.out, args.names or NOTEBOOKS)
    except ImportError as exc:
        parser.exit(2, f"python -m analysis.notebooks: {exc}; install the dev extras: pip install -e '.[dev]'\n")
    for path in paths:
        print(path)
    return 0


__all__ = ["DEFAULT_OUT", "NOTEBOOKS", "NOTEBOOK_DIR", "NotebookParameterError", "RESULT_PREFIX", "RUNS_ENV",
           "main", "read_result", "render", "report_result", "resolve_runs", "script_path", "show", "to_notebook"]
