"""Mutation score and surviving mutants per module, from the last `make mutate` run.

Reads the results mutmut keeps under ``mutants/`` (one ``<module>.meta`` per source file)
and prints, per module, how many mutants the fast tests killed out of those they ran, and
the name of every mutant that survived (``mutmut show NAME`` prints its diff). A module's
score is killed / (killed + survived + timeouts + suspicious); mutants no test reaches are
listed apart ("no tests"), as they say where tests are missing rather than how good they are.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

SCORED = ("killed", "survived", "timeout", "suspicious", "segfault")


def load(root: Path) -> dict[str, dict[str, str]]:
    """{module path: {mutant name: status}} for every module mutmut has results for."""
    out = {}
    for meta in sorted(root.rglob("*.py.meta")):
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        if codes:
            out[str(meta.relative_to(root))[: -len(".meta")]] = {k: status_by_exit_code[v] for k, v in codes.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutants", type=Path, default=Path("mutants"), help="mutmut's working folder")
    args = ap.parse_args(argv)
    results = load(args.mutants)
    if not results:
        print(f"no mutation results under {args.mutants}/: run `make mutate` first", file=sys.stderr)
        return 1
    total = Counter()
    print(f"{'module':40s} {'score':>7s} {'killed':>7s} {'survived':>9s} {'other':>6s} {'no tests':>9s} {'unrun':>6s}")
    for module, statuses in results.items():
        n = Counter(statuses.values())
        total.update(n)
        scored = sum(n[s] for s in SCORED)
        score = f"{100 * n['killed'] / scored:6.1f}%" if scored else "    -"
        other = scored - n["killed"] - n["survived"]
        print(f"{module:40s} {score:>7s} {n['killed']:7d} {n['survived']:9d} {other:6d} {n['no tests']:9d} "
              f"{n['not checked']:6d}")
    scored = sum(total[s] for s in SCORED)
    if scored:
        print(f"{'all':40s} {100 * total['killed'] / scored:6.1f}% {total['killed']:7d} {total['survived']:9d}")
    for module, statuses in results.items():
        left = [k for k, s in statuses.items() if s not in ("killed", "no tests", "not checked", "skipped")]
        if left:
            print(f"\n{module}: {len(left)} not killed")
            for name in left:
                print(f"  {name}  ({statuses[name]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
