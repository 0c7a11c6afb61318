"""A short soak (``benchmarks/soak.py``): one real cloud process (toy pair, SLED) under honest
and bad clients for 20 s, its memory and descriptors sampled throughout."""

from __future__ import annotations

import csv
import json

import pytest

from benchmarks.soak import DEFAULT_BAD, FD_MARGIN, main

RSS_GROWTH_MIB = 16.0  # the most the idle cloud's RSS may grow over the short run


def test_a_short_soak_keeps_the_server_up_lossless_and_flat(tmp_path, capsys):
    out = tmp_path / "soak"
    summary = main(["--seconds", "20", "--interval", "1", "--clients", "3", "--out", str(out)])
    with capsys.disabled():
        print(f"\nshort soak: {summary['requests_served']} requests, RSS MiB {summary['rss_mib']}, "
              f"fds {summary['fds']}, honest failures {len(summary['honest_failed'])}")

    assert summary["server"] == []  # up and healthy throughout, idle at the end, stopped by /shutdown
    assert summary["cloud_exit_status"] == 0
    assert summary["requests_served"] > 0 and summary["lossy"] == []
    assert summary["honest_failed"] == []
    assert summary["bad_unexpected"] == []
    assert set(summary["bad_refused"]) == set(DEFAULT_BAD)
    stats = summary["cloud_stats_end"]
    assert stats["streams_refused"] == summary["bad_refused"]["wrong_token"]  # and no honest stream
    assert stats["sessions_abandoned"] >= summary["bad_refused"]["abandoned"]
    assert stats["sessions_open"] == stats["streams_open"] == 0

    fds, rss = summary["fds"], summary["rss_mib"]
    assert fds["end"] <= fds["start"] + FD_MARGIN, fds
    assert rss["end"] - rss["start"] <= RSS_GROWTH_MIB, rss

    rows = list(csv.DictReader(open(out / "samples.csv")))
    assert [r["phase"] for r in rows[:1] + rows[-1:]] == ["idle_start", "idle_end"] and len(rows) >= 10
    assert json.loads((out / "summary.json").read_text())["requests_served"] == summary["requests_served"]


def test_an_ill_typed_message_fails_its_session_not_the_server(tmp_path):
    summary = main(["--seconds", "5", "--interval", "1", "--clients", "1", "--bad", "ill_typed",
                    "--bad-every", "0.5", "--out", str(tmp_path / "soak")])
    assert summary["server"] == [] and summary["bad_unexpected"] == [], summary["failures"]
    assert summary["bad_refused"]["ill_typed"] > 0 and summary["honest_failed"] == []
