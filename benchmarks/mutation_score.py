"""Mutation score and surviving mutants per module, from the last `make mutate` run.

Reads the results mutmut keeps under ``mutants/`` (one ``<module>.meta`` per source file)
and prints, per module, how many mutants the fast tests killed out of those they ran. A
module's score is killed / (killed + survived + timeouts + suspicious); mutants no test
reaches are listed apart ("no tests"), as they say where tests are missing rather than how
good they are.

A surviving edit that cannot change behaviour (``<`` for ``<=`` against a continuous random
draw, a dtype numpy would choose anyway) is recorded once, with the reason, in
``benchmarks/mutation_equivalents.toml``, matched by its function and the line it changes
rather than by mutmut's numbering, which shifts when a function is edited. The report counts
such survivors as explained and lists every other one with its diff: those need a test.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

SCORED = ("killed", "survived", "timeout", "suspicious", "segfault")
EQUIVALENTS = Path(__file__).with_name("mutation_equivalents.toml")


@dataclass(frozen=True)
class Equivalent:
    """A surviving edit shown unable to change behaviour: in ``function`` (mutmut's name up to
    ``__mutmut_``), the line ``before`` becomes ``after`` (both stripped). ``context``: lines
    that must stand unchanged near the edit, for a line the function holds more than once."""

    function: str
    before: str
    after: str
    why: str
    context: tuple[str, ...] = ()


def load_equivalents(path: Path = EQUIVALENTS) -> list[Equivalent]:
    if not path.is_file():
        return []
    entries = tomllib.loads(path.read_text())["equivalent"]
    return [Equivalent(e["function"], e["before"].strip(), e["after"].strip(), e["why"],
                       tuple(c.strip() for c in e.get("context", ()))) for e in entries]


def changed_lines(diff: str) -> tuple[list[str], list[str]]:
    """The removed and the added lines of a unified diff, stripped (headers left out)."""
    removed = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    added = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return removed, added


def explain(mutant: str, diff: str, equivalents: list[Equivalent]) -> Equivalent | None:
    """The ledger entry a survivor matches: same function, one line changed as recorded."""
    function = mutant.rsplit("__mutmut_", 1)[0]
    removed, added = changed_lines(diff)
    kept = {ln[1:].strip() for ln in diff.splitlines() if ln.startswith(" ")}
    for e in equivalents:
        if e.function == function and removed == [e.before] and added == [e.after] and kept.issuperset(e.context):
            return e
    return None


def load(root: Path) -> dict[str, dict[str, str]]:
    """{module path: {mutant name: status}} for every module mutmut has results for."""
    from mutmut.stats import status_by_exit_code

    out = {}
    for meta in sorted(root.rglob("*.py.meta")):
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        if codes:
            out[str(meta.relative_to(root))[: -len(".meta")]] = {k: status_by_exit_code[v] for k, v in codes.items()}
    return out


def unchecked(results: dict[str, dict[str, str]], pattern: str = "*") -> list[str]:
    """The mutants not run yet whose names match ``pattern`` (mutmut's name globs), in name
    order: what a run stopped midway still has to do. mutmut re-runs every mutant a glob names,
    killed ones included, so a resumed run passes these names instead of the glob."""
    return sorted(name for statuses in results.values() for name, status in statuses.items()
                  if status == "not checked" and fnmatch.fnmatchcase(name, pattern))


def to_rerun(results: dict[str, dict[str, str]], pattern: str, explained) -> list[str]:
    """The mutants matching ``pattern`` that were run and not killed, and are not explained
    (``explained(name, module)``: by the ledger), in name order: what a quick first pass
    (``make mutate QUICK=1``) leaves to the full tests."""
    return sorted(name for module, statuses in results.items() for name, status in statuses.items()
                  if status not in ("killed", "no tests", "not checked", "skipped")
                  and fnmatch.fnmatchcase(name, pattern)
                  and not (status == "survived" and explained(name, module)))


def _diff(mutant: str, module: str) -> str:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    return get_diff_for_mutant(mutant, path=module)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutants", type=Path, default=Path("mutants"), help="mutmut's working folder")
    ap.add_argument("--equivalents", type=Path, default=EQUIVALENTS, help="the ledger of equivalent edits")
    ap.add_argument("--unchecked", metavar="GLOB", help="print only the names of the mutants matching GLOB not "
                    "run yet, on one line (to resume: make mutate MUTANTS=\"$(... --unchecked 'systems.protocol.*')\")")
    ap.add_argument("--rerun", metavar="GLOB", help="print only the names of the mutants matching GLOB that were "
                    "run, not killed and not explained, on one line (after make mutate QUICK=1: run them again "
                    "on the full tests with make mutate MUTANTS=\"$(... --rerun 'systems.protocol.*')\")")
    args = ap.parse_args(argv)
    results = load(args.mutants)
    if not results:
        print(f"no mutation results under {args.mutants}/: run `make mutate` first", file=sys.stderr)
        return 1
    if args.unchecked:
        print(" ".join(unchecked(results, args.unchecked)))  # one line: make's variables hold no newline
        return 0
    equivalents = load_equivalents(args.equivalents)
    if args.rerun:
        print(" ".join(to_rerun(results, args.rerun,
                                lambda name, module: explain(name, _diff(name, module), equivalents) is not None)))
        return 0
    unexplained: dict[str, list[tuple[str, str, str]]] = {}
    explained = Counter()
    for module, statuses in results.items():
        for name, status in statuses.items():
            if status in ("killed", "no tests", "not checked", "skipped"):
                continue
            diff = _diff(name, module)
            if status == "survived" and explain(name, diff, equivalents) is not None:
                explained[module] += 1
            else:
                unexplained.setdefault(module, []).append((name, status, diff))
    total = Counter()
    print(f"{'module':40s} {'score':>7s} {'killed':>7s} {'survived':>9s} {'equiv.':>7s} {'other':>6s} "
          f"{'no tests':>9s} {'unrun':>6s}")
    for module, statuses in results.items():
        n = Counter(statuses.values())
        total.update(n)
        scored = sum(n[s] for s in SCORED)
        score = f"{100 * n['killed'] / scored:6.1f}%" if scored else "    -"
        other = scored - n["killed"] - n["survived"]
        print(f"{module:40s} {score:>7s} {n['killed']:7d} {n['survived']:9d} {explained[module]:7d} {other:6d} "
              f"{n['no tests']:9d} {n['not checked']:6d}")
    scored = sum(total[s] for s in SCORED)
    if scored:
        print(f"{'all':40s} {100 * total['killed'] / scored:6.1f}% {total['killed']:7d} {total['survived']:9d} "
              f"{sum(explained.values()):7d}")
    print(f"\nsurvivors explained as equivalent ({args.equivalents.name}): {sum(explained.values())}; "
          f"not explained: {sum(len(v) for v in unexplained.values())}")
    for module, left in unexplained.items():
        print(f"\n{module}: {len(left)} not killed and not explained")
        for name, status, diff in left:
            removed, added = changed_lines(diff)
            print(f"  {name}  ({status})")
            for line in removed:
                print(f"      - {line}")
            for line in added:
                print(f"      + {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
