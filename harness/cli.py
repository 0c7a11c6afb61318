"""The ``specwan`` command line.

Each subcommand is an entry of :data:`COMMANDS`: a function that adds its arguments to a
parser and a function that runs it with the parsed arguments and returns an exit status.
Errors a user can fix print one line, ``specwan: error: ...``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from harness.models import ModelFetchError
from harness.pairs import DEFAULT_PAIR, PairError, check_vocabularies, ensure_pair, load_pair, pair_names

PROG = "specwan"


@dataclass(frozen=True)
class Command:
    """A subcommand: its help line, a function adding its arguments, and one running it (exit status)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class UsageError(RuntimeError):
    """A command's input is wrong in a way argparse cannot see."""


# ---- fetch ---------------------------------------------------------------------------------


def _fetch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pair", default=DEFAULT_PAIR, help=f"pair name or YAML file (default: {DEFAULT_PAIR})")
    p.add_argument("--home", default=None, help="cache root (default: $SPECWAN_HOME or the user cache dir)")
    p.add_argument(
        "--pip-args",
        default=None,
        help="extra pip arguments, e.g. '--no-index --find-links DIR' (added to $SPECWAN_PIP_ARGS)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


def _fetch(args: argparse.Namespace) -> int:
    pair = load_pair(args.pair)
    paths = ensure_pair(pair, home=args.home, pip_args=args.pip_args, progress=not args.quiet)
    fingerprint = check_vocabularies(pair, paths)
    for role, path in paths.items():
        print(f"{role}: {path if path is not None else '(no file: ' + pair.roles()[role].engine + ' engine)'}")
    if fingerprint is not None:
        print(f"vocabulary: shared, fingerprint {fingerprint}")
    else:
        print("vocabulary: checked when the engines load")
    return 0


# ---- pairs ---------------------------------------------------------------------------------


def _pairs_args(p: argparse.ArgumentParser) -> None:
    pass


def _pairs(args: argparse.Namespace) -> int:
    names = pair_names()
    if not names:
        raise UsageError("no pair files found (looked in conf/pair; set SPECWAN_CONF to the conf directory)")
    width = max(len(n) for n in names)
    for name in names:
        try:
            description = load_pair(name).description
        except PairError as e:
            description = f"(broken: {e})"
        mark = " (default)" if name == DEFAULT_PAIR and "(default)" not in description else ""
        print(f"{name:<{width}}  {description}{mark}")
    return 0


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    from harness import calibrate

    calibrate.add_arguments(p)


def _calibrate(args: argparse.Namespace) -> int:
    from harness import calibrate

    try:
        return calibrate.run(args)
    except ValueError as e:
        raise UsageError(str(e)) from e


def _tune_args(p: argparse.ArgumentParser) -> None:
    from harness import tune

    tune.add_arguments(p)


def _tune(args: argparse.Namespace) -> int:
    from harness import tune
    from harness.run import ConfigError

    try:
        return tune.run(args)
    except ConfigError as e:
        raise UsageError(str(e)) from e


# ---- selfcheck, doctor ----------------------------------------------------------------------


def _selfcheck_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pair", default=DEFAULT_PAIR, help=f"pair name or YAML file (default: {DEFAULT_PAIR})")
    p.add_argument("--home", default=None, help="cache root (default: $SPECWAN_HOME or the user cache dir)")
    p.add_argument("--tokens", type=int, default=8, help="tokens each model decodes (default 8)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds each model may take (default 600)")


def _selfcheck(args: argparse.Namespace) -> int:
    """Load each model of the pair in a child process and decode a few tokens; name any crash's cause and fix."""
    from harness.selfcheck import SelfCheckError, check_pair
    from harness.sysinfo import cpu_info, llama_build

    if args.tokens < 1:
        raise UsageError(f"--tokens must be at least 1, got {args.tokens}")
    pair = load_pair(args.pair)
    paths = ensure_pair(pair, home=args.home, progress=True)
    try:
        check_pair(pair, paths, tokens=args.tokens, timeout=args.timeout)
    except SelfCheckError as exc:
        print(str(exc), file=sys.stderr)
        print("specwan: self-check failed (`specwan doctor` shows this machine and build in full)", file=sys.stderr)
        return 1
    build = llama_build()
    print(f"self-check passed: pair {pair.name} on {cpu_info().summary()}; "
          f"llama-cpp-python {build.version}, build {build.key or '(unrecorded)'}")
    return 0


def _doctor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pair", default=DEFAULT_PAIR, help=f"pair whose model files to check (default: {DEFAULT_PAIR})")
    p.add_argument("--home", default=None, help="cache root (default: $SPECWAN_HOME or the user cache dir)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _doctor(args: argparse.Namespace) -> int:
    from harness import doctor

    load_pair(args.pair)  # an unknown pair is a one-line error before any check runs
    return doctor.run(args.pair, as_json=args.json, home=args.home)


# ---- link-check ----------------------------------------------------------------------------


def _link_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. network=wan_50ms_10mbit network.backend=tun")
    p.add_argument("--pings", type=int, default=30, help="ping-pongs for the RTT (>= 30; default 30)")
    p.add_argument("--bulk-s", type=float, default=None, help="seconds of bulk transfer each way "
                   "(default: max(2 s, 30 RTT), at most 8 s)")
    p.add_argument("--json", default=None, help="also write the full probe result (link.json's layout) here")


def _link_check(args: argparse.Namespace) -> int:
    """Bring the profile's link up, probe it, print configured and measured side by side."""
    import json

    from hydra import compose, initialize_config_dir

    from harness.run import CONF_DIR, ConfigError, network_spec
    from netem.backends import LinkError, open_link
    from netem.kernel import BackendUnavailable, capabilities
    from netem.probe import probe_link, side_by_side

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            cfg = compose(config_name="config", overrides=list(args.overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        options = []
        if any(ln.startswith("Available options") for ln in lines):
            after = lines[next(i for i, ln in enumerate(lines) if ln.startswith("Available options")) + 1:]
            options = [ln for ln in after[: next((i for i, ln in enumerate(after) if ln.endswith(":")), len(after))]]
        hint = f"; valid: {', '.join(options)}" if options else ""
        raise UsageError(f"{lines[0]}{hint}") from None
    try:
        profile = network_spec(cfg.network)
        with open_link(profile) as link:
            print(f"link {profile.name}: backend {link.backend} ({link.level}); {link.why}")
            result = probe_link(link, pings=args.pings, bulk_s=args.bulk_s)
            described = link.describe()
    except (ConfigError, BackendUnavailable, LinkError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    rows = side_by_side(profile, result)
    print(f"{'figure':<24}{'configured':>14}{'measured':>14}")
    for r in rows:
        c = "-" if r["configured"] is None else f"{r['configured']:.4g}"
        m = "-" if r["measured"] is None else f"{r['measured']:.4g}"
        print(f"{r['figure']:<24}{c:>14}{m:>14}")
    rtt = result["rtt_ms"]
    print(f"RTT min/p95: {rtt['min']:.2f}/{rtt['p95']:.2f} ms over {rtt['n']} ping-pongs; "
          f"transfers intact: {all(result[d]['intact'] for d in ('up', 'down'))}; probe took "
          f"{result['duration_s']:.1f} s (configured: from the profile; measured: this probe)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"configured": profile.describe(), "measured": result, "side_by_side": rows,
                       "backend": described, "capabilities": capabilities().describe()}, f, indent=2)
    return 0


# ---- train-controller ----------------------------------------------------------------------


def _train_controller_args(p: argparse.ArgumentParser) -> None:
    from harness import train_controller

    train_controller.add_arguments(p)


def _train_controller(args: argparse.Namespace) -> int:
    from harness import train_controller

    try:
        return train_controller.main(args)
    except ValueError as e:
        raise UsageError(str(e)) from e


# ---- fit-pair ---------------------------------------------------------------------------------


def _fit_pair_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="*", help="run folders of a real pair, greedy (temperature=0), to fit from")
    p.add_argument("--name", help="the pair is written as conf/pair/fitted_<name>.yaml")
    p.add_argument("--calibrate", metavar="PUBLISHED",
                   help="calibrate to a paper's published statistics instead (paper_pipesd)")
    p.add_argument("--trials", type=int, default=300, help="calibration: search trials (default 300)")
    p.add_argument("--seed", type=int, default=0, help="calibration: the search's seed")
    p.add_argument("--like", default="paper_pipesd",
                   help="fit: the pair whose target shape is kept (the edge's records cannot show it)")
    p.add_argument("--wire-vocab", type=int, default=None,
                   help="fit: the real vocabulary's size (default: read from the runs' target GGUF file)")
    p.add_argument("--chars-per-token", type=float, default=None, help="fit: prompt characters per token (3.5)")
    p.add_argument("--chain-states", type=int, default=6,
                   help="fit: run lengths the agreement chain tells apart (default 6: 0..4 and 5 or more)")
    p.add_argument("--out", default=None, help="write here instead of conf/pair/")


def _fit_pair(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness.fit_pair import FitError, fit_runs, print_fit, write_pair
    from harness.pairs import pair_dir

    if args.calibrate:
        if args.runs:
            raise UsageError("give run folders to fit from, or --calibrate, not both")
        from harness.pair_calibration import calibrate, print_residuals

        mapping = calibrate(args.calibrate, trials=args.trials, seed=args.seed,
                            progress=lambda line: print(f"  {line}", file=sys.stderr, flush=True))
        path = write_pair(mapping, Path(args.out) if args.out else pair_dir() / f"{mapping['name']}.yaml")
        print(f"{mapping['name']}: {mapping['description']}\n  residuals (simulated - published):")
        print_residuals(mapping)
        print(f"written: {path}")
        return 0
    if not args.runs or not args.name:
        raise UsageError("give run folders and --name (specwan fit-pair RUN... --name NAME), or --calibrate NAME")
    like = load_pair(args.like).target.options["categories"]
    like = like.get("default") or next(iter(like.values()))
    try:
        if args.chain_states < 1:
            raise FitError(f"--chain-states must be at least 1, got {args.chain_states}")
        mapping = fit_runs(args.runs, args.name, like, states=args.chain_states,
                           chars_per_token=args.chars_per_token, wire_vocab=args.wire_vocab)
    except FitError as exc:
        raise UsageError(str(exc)) from None
    path = write_pair(mapping, Path(args.out) if args.out else pair_dir() / f"{mapping['name']}.yaml")
    print(f"{mapping['name']}: {mapping['description']}")
    print_fit(mapping)
    print(f"written: {path}")
    return 0


COMMANDS: dict[str, Command] = {
    "fetch": Command("fetch and verify a pair's model files, and check their vocabularies", _fetch_args, _fetch),
    "pairs": Command("list the draft/target pairs", _pairs_args, _pairs),
    "run": Command("run an experiment from the Hydra config (specwan run system=vanilla network=lan ...)",
                   lambda p: p.add_argument("overrides", nargs="*"), lambda a: 0),
    "calibrate": Command("measure this machine's model costs and write a measured device profile",
                         _calibrate_args, _calibrate),
    "tune": Command("tune a system's thresholds (r1, r2) offline: Bayesian optimisation, grid or random",
                    _tune_args, _tune),
    "selfcheck": Command("load each model of a pair in a child process and decode a few tokens "
                         "(the end of set-up; names a crash's cause and fix)", _selfcheck_args, _selfcheck),
    "doctor": Command("print what this machine offers the suite and what the suite will do (--json for scripts)",
                      _doctor_args, _doctor),
    "link-check": Command("bring up a network profile's link, probe it, and print configured vs measured "
                          "(specwan link-check network=wan_50ms_10mbit)", _link_check_args, _link_check),
    "fit-pair": Command("fit a statistical pair to real runs, or calibrate one to a paper's published figures "
                        "(specwan fit-pair RUN... --name N | --calibrate paper_pipesd)", _fit_pair_args, _fit_pair),
    "train-controller": Command("train WISP's edge speculation controller (a rejection predictor) from runs of "
                                "system=sled or system=wisp (specwan train-controller RUN_DIR ... --out FILE)",
                                _train_controller_args, _train_controller),
}

#: error types whose message is enough for the user: printed as one line, exit status 2
USER_ERRORS: tuple[type[BaseException], ...] = (ModelFetchError, PairError, UsageError)


def build_parser(extra: Mapping[str, Command] | None = None) -> argparse.ArgumentParser:
    """The parser of :data:`COMMANDS` and the ``extra`` commands a higher layer adds (the report)."""
    parser = argparse.ArgumentParser(prog=PROG, description="Benchmarking suite for cloud-edge speculative decoding")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in {**COMMANDS, **(extra or {})}.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None, extra: Mapping[str, Command] | None = None) -> int:
    """Run one ``specwan`` command; ``extra``: commands of a higher layer, offered beside
    :data:`COMMANDS` (``analysis.cli`` adds ``report`` this way, so the harness never imports
    the analysis)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        # Hydra owns the command line of `run` (overrides, -m, --help, --cfg ...).
        from harness import run

        sys.argv = [f"{PROG} run", *argv[1:]]
        try:
            run.main()
        except KeyboardInterrupt:
            # every finished request is already on disk (journals are written per request)
            print(f"{PROG}: interrupted; every finished request is recorded. The same command resumes a sweep "
                  "whose folder is fixed (experiment=bench); a single run resumes with hydra.run.dir=<its folder>",
                  file=sys.stderr)
            return 130
        return 0
    parser = build_parser(extra)
    args = parser.parse_args(argv)
    errors = USER_ERRORS
    try:
        from systems.api import UnknownSystemError
        from systems.engines import EngineError

        from workloads import WorkloadError

        errors = (*errors, EngineError, UnknownSystemError, WorkloadError)
    except ImportError:  # pragma: no cover
        pass
    try:
        return args._run(args)
    except errors as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
