"""``specwan calibrate``: measure what model work costs on this machine, as a device profile.

Times the pair's real engines on the operations the policies run -- prompt prefill, one
draft/decode step at several context lengths, verification blocks of several sizes, and a
two-session batched verification -- takes medians over repeats, fits the linear cost model
of :class:`harness.profiles.RoleProfile` by least squares, and writes a ``conf/device`` file
whose two profiles are marked ``kind: measured`` with the machine, date and settings. Use it
as ``specwan run device=<name>``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

from harness.pairs import DEFAULT_PAIR, ensure_pair, load_pair, open_engines
from harness.profiles import RoleProfile

CONTEXTS = (64, 320)
BLOCKS = (1, 2, 4, 8)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="pair=NAME name=NAME threads=N (same as the options)")
    p.add_argument("--pair", default=DEFAULT_PAIR)
    p.add_argument("--name", default=None, help="profile name (default: measured_<host>_<pair>)")
    p.add_argument("--threads", type=int, default=None, help="threads per model (default: the pair's options)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="output YAML (default: conf/device/<name>.yaml)")


def _median_time(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _prompt(n: int) -> list[int]:
    return [(i * 7919) % 5000 + 100 for i in range(n)]


def measure_role(engine, role: str, repeats: int) -> dict:
    """Median seconds per operation for one engine (the raw measurements, not the fit)."""
    out: dict = {"prefill": {}, "step": {}, "verify": {}, "batch": {}}
    for n in CONTEXTS:
        def prefill(n=n):
            s = engine.new_session()
            s.prefill(_prompt(n))
            s.close()
        out["prefill"][n] = _median_time(prefill, max(2, repeats // 2))
    for ctx in CONTEXTS:
        # Decode steps as generation runs them: one new token per call, context growing.
        s = engine.new_session()
        s.prefill(_prompt(ctx))
        s.score([42])
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            s.score([43])
            samples.append(time.perf_counter() - t0)
        out["step"][ctx] = statistics.median(samples)
        s.close()
    if role == "cloud":
        ctx = CONTEXTS[0]
        s = engine.new_session()
        s.prefill(_prompt(ctx))
        # After a rollback the last kept token is re-evaluated with the block, exactly as a
        # verification after a verdict evaluates the correction token with the new drafts.
        for n in BLOCKS:
            def verify(s=s, n=n):
                s.score(_prompt(n))
                s.rollback(ctx)
            verify()
            out["verify"][n] = _median_time(verify, repeats)
        try:
            t = engine.new_session()
        except Exception:  # an engine limited to one session: no batched figure
            t = None
        if t is not None:
            t.prefill(_prompt(ctx))

            def batch(s=s, t=t):
                engine.score_batch([(s, _prompt(4)), (t, _prompt(4))])
                s.rollback(ctx)
                t.rollback(ctx)
            batch()
            out["batch"][2] = _median_time(batch, repeats)
            t.close()
        s.close()
    return out


def fit(role: str, m: dict, name: str, source: str) -> RoleProfile:
    """The linear cost model from the measurements (least squares, clipped at zero)."""
    ctxs = sorted(m["step"])
    steps = [m["step"][c] for c in ctxs]
    slope = max(0.0, (steps[-1] - steps[0]) / (ctxs[-1] - ctxs[0]))
    step0 = max(0.0, steps[0] - slope * ctxs[0])
    prefill = float(np.median([m["prefill"][n] / n for n in m["prefill"]]))
    verify_per_token = batch_extra = 0.0
    verify0 = None
    if m["verify"]:
        n = np.array(sorted(m["verify"]), dtype=float)
        t = np.array([m["verify"][int(k)] for k in n])
        a = np.vstack([np.ones_like(n), n]).T
        (intercept, verify_per_token), *_ = np.linalg.lstsq(a, t, rcond=None)
        verify_per_token = max(0.0, float(verify_per_token))
        # measured at context CONTEXTS[0]; the profile's intercept is at empty context
        verify0 = max(0.0, float(intercept) - slope * CONTEXTS[0])
        if m["batch"]:
            one = verify0 + slope * CONTEXTS[0] + verify_per_token * 4
            batch_extra = max(0.0, m["batch"][2] - one)
    return RoleProfile(name=name, kind="measured", source=source, step_s=round(step0, 6),
                       prefill_s_per_token=round(prefill, 6), verify_s_per_token=round(verify_per_token, 6),
                       step_s_per_ctx_token=round(slope, 9), batch_s_per_session=round(batch_extra, 6),
                       verify_s=None if verify0 is None else round(verify0, 6))


def run(args: argparse.Namespace) -> int:
    from harness.contention import check_before_run, planned_threads

    for item in args.overrides:
        key, _, value = item.partition("=")
        if key not in ("pair", "name", "threads") or not value:
            raise ValueError(f"calibrate: unknown option {item!r}; use pair=NAME, name=NAME or threads=N")
        setattr(args, key, int(value) if key == "threads" else value)
    pair = load_pair(args.pair)
    if args.threads is not None:
        for spec in pair.roles().values():
            spec.options["n_threads"] = args.threads
    paths = ensure_pair(pair)
    draft, target = open_engines(pair, paths)
    host = platform.node() or "host"
    name = args.name or f"measured_{host}_{pair.name}".replace("-", "_")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    threads = args.threads if args.threads is not None else "pair default"
    contention = check_before_run(planned_threads(pair))
    profiles = {}
    for role, engine in (("edge", draft), ("cloud", target)):
        print(f"calibrating {role}: {engine.info.model} ...", flush=True)
        raw = measure_role(engine, role, args.repeats)
        source = (f"specwan calibrate on {host} ({platform.processor() or platform.machine()}), {when}; "
                  f"{engine.info.backend}, threads={threads}; medians of {args.repeats}"
                  + (f"; CONTENDED: {contention['summary']}" if contention["contended"] else ""))
        profiles[role] = fit(role, raw, f"{host}_{role}", source)
        print(f"  {profiles[role]}")
    out = Path(args.out) if args.out else Path(__file__).resolve().parent.parent / "conf" / "device" / f"{name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"name": name, "edge": profiles["edge"].as_dict(), "cloud": profiles["cloud"].as_dict()}
    out.write_text(f"# Measured by `specwan calibrate` ({when}); use with device={name}\n" + yaml.safe_dump(doc, sort_keys=False))
    print(f"wrote {out}")
    return 0
