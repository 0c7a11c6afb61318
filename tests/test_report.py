"""analysis/report.py: the report built from real toy-pair runs (virtual time) holds every table
and figure, its numbers and their provenance; the CLI's errors; and the HTML renders in
headless Chromium (driven over its DevTools pipe, no driver library, no network port)."""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from analysis import figures as F
from analysis import report as R
from analysis.load import load_runs
from tests.analysis_runs import toy_sweep as make_toy_sweep
from tests.test_analysis_figures import NETWORKS, request, write_run

SYSTEMS = ("vanilla", "cloud_only", "pipesd")
TOY_NETWORKS = ("lan", "4g")


@pytest.fixture(scope="module")
def toy_sweep(tmp_path_factory) -> Path:
    """Real records: the toy pair in virtual time, three systems on two networks, energy estimated."""
    return make_toy_sweep(tmp_path_factory.mktemp("toy") / "sweep", SYSTEMS, TOY_NETWORKS)


@pytest.fixture(scope="module")
def toy_report(toy_sweep, tmp_path_factory) -> Path:
    """report.html built from the toy sweep."""
    return R.build_report(toy_sweep, tmp_path_factory.mktemp("report"), n_resamples=999)


def _html_tables(page: str) -> list[list[list[str]]]:
    """The page's tables as rows of cell texts (tags stripped, entities kept as written)."""
    tables = []
    for body in re.findall(r"<table>(.*?)</table>", page, re.S):
        rows = re.findall(r"<tr>(.*?)</tr>", body, re.S)
        tables.append([[re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<t[hd]>(.*?)</t[hd]>", r, re.S)]
                       for r in rows])
    return tables


def test_report_from_toy_runs_holds_every_table_and_figure(toy_sweep, toy_report):
    page = toy_report.read_text()
    assert toy_report.name == "report.html"
    for heading in ("Runs", "Summary per system and network", "Inter-token latency", "Paired speedup", "Figures"):
        assert f"<h2>{heading}</h2>" in page
    assert "SLO attainment" not in page  # only when objectives are given
    runs, summary, itl, speedup = _html_tables(page)
    # the manifest summary: one row per run, with its commit, pair, clock and energy source
    head = runs[0]
    assert head == ["run", "git commit", "pair", "systems", "networks", "clock", "requests", "energy source"]
    assert sorted(r[0] for r in runs[1:]) == sorted(f"{s}-{n}" for s in SYSTEMS for n in TOY_NETWORKS)
    manifest = json.loads((toy_sweep / "pipesd-4g" / "manifest.json").read_text())
    row = next(r for r in runs[1:] if r[0] == "pipesd-4g")
    commit = manifest["git"]["commit"]
    assert (row[1].startswith(commit[:12]) if commit else row[1].startswith("none"))
    assert row[2:6] == ["toy", "pipesd", "4g", "virtual"]
    assert "edge: estimated" in row[7] and "cloud: estimated" in row[7]
    # every figure drawn (these records allow them all), embedded, captioned with its provenance
    for spec in F.FIGURES:
        assert re.search(rf'<figure id="{spec.name}"><img alt="[^"]+" src="data:image/png;base64,[A-Za-z0-9+/=]+">',
                         page), spec.name
        assert (toy_report.parent / f"{spec.name}.png").read_bytes().startswith(b"\x89PNG")
    assert "Left out" not in page
    # the markdown twin references the same figures beside it
    md = (toy_report.parent / "report.md").read_text()
    for spec in F.FIGURES:
        assert f"]({spec.name}.png)" in md
    assert "| system | network | requests | TTFT, s | TPOT, ms |" in md


def test_report_is_self_contained(toy_report):
    page = toy_report.read_text()
    assert "://" not in page and "url(" not in page and "@import" not in page
    assert not re.search(r"<(script|link|iframe|object|embed)\b", page)
    srcs = re.findall(r'\b(?:src|href)="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)


def test_summary_numbers_and_provenance_match_the_records(toy_sweep, toy_report):
    requests, _ = load_runs(toy_sweep)
    _, summary, itl, speedup = _html_tables(toy_report.read_text())
    # ITL: percentiles over the gaps between the distinct instants each request's output grew
    ihead = itl[0]
    assert ihead[:4] == ["system", "network", "chunks", "tokens per chunk"] and "ITL p99, ms" in ihead
    pipesd = dict(zip(ihead, next(r for r in itl[1:] if r[:2] == ["pipesd", TOY_NETWORKS[0]])))
    mine = requests[(requests.system == "pipesd") & (requests.network == TOY_NETWORKS[0])]
    gaps = [g for times in mine.token_times for g in np.diff(np.unique(times))]
    assert pipesd["chunks"] == str(len(gaps)) and pipesd["ITL p50, ms"] == R.fmt(np.percentile(gaps, 50), 1e3)
    head, rows = summary[0], {(r[0], r[1]): dict(zip(summary[0], r)) for r in summary[1:]}
    assert head[:3] == ["system", "network", "requests"]
    assert {"TTFT, s", "TPOT, ms", "end-to-end, s", "acceptance rate", "bytes up", "bytes down",
            "edge J/token", "cloud J/token"} <= set(head)
    assert set(rows) == {(s, n) for s in SYSTEMS for n in TOY_NETWORKS}
    for (system, network), row in rows.items():
        mine = requests[(requests.system == system) & (requests.network == network)]
        assert row["requests"] == str(len(mine))
        assert row["TPOT, ms"].startswith(R.fmt(np.median(mine.tpot), 1e3) + " [")
        assert row["bytes up"].startswith(R.fmt(np.median(mine.bytes_up)) + " [")
        for column in ("TTFT, s", "TPOT, ms", "end-to-end, s"):
            assert row[column].endswith(" modelled")  # virtual time
        assert row["bytes up"].endswith(" measured")
        edge = np.median(mine.energy_edge_j / mine.n_tokens)
        assert row["edge J/token"].startswith(R.fmt(edge) + " [") and row["edge J/token"].endswith(" estimated")
        if system == "cloud_only":
            assert row["acceptance rate"] == "n/a"
    # the speedup table: every other system against cloud_only on each network, with a verdict
    shead = speedup[0]
    assert shead == ["system", "network", "baseline", "speedup (tpot)", "95% CI", "pairs", "verdict", "provenance"]
    got = {(r[0], r[1]): dict(zip(shead, r)) for r in speedup[1:]}
    assert set(got) == {(s, n) for s in ("pipesd", "vanilla") for n in TOY_NETWORKS}
    for (system, network), row in got.items():
        base = requests[(requests.system == "cloud_only") & (requests.network == network)].sort_values("prompt_id")
        cand = requests[(requests.system == system) & (requests.network == network)].sort_values("prompt_id")
        assert row["speedup (tpot)"] == R.fmt(base.tpot.mean() / cand.tpot.mean())
        assert row["baseline"] == "cloud_only" and row["provenance"] == "modelled"
        assert re.fullmatch(r"(faster|slower) than cloud_only at 95%|indistinguishable at 95%.*", row["verdict"])


def test_verdict_wording_follows_the_interval(tmp_path):
    rng = np.random.default_rng(3)
    base = rng.uniform(0.010, 0.020, 12)
    same = base * rng.normal(1.0, 0.05, 12)  # no systematic difference
    for system, values in (("cloud_only", base), ("vanilla", same), ("pipesd", base / 2)):
        write_run(tmp_path / "sweep" / system, system, "lan",
                  [request(f"q{i}", system, float(v)) for i, v in enumerate(values)])
    rows = R.speedup_rows(load_runs(tmp_path / "sweep")[0], n_resamples=999).set_index("system")
    assert rows.loc["pipesd", "verdict"] == "faster than cloud_only at 95%"
    assert rows.loc["pipesd", "speedup (tpot)"] == R.fmt(2.0)
    assert rows.loc["vanilla", "verdict"].startswith("indistinguishable at 95%")
    lo, hi = (float(v) for v in rows.loc["vanilla", "95% CI"].strip("[]").split(", "))
    assert lo <= 1 <= hi
    slower = R.speedup_rows(load_runs(tmp_path / "sweep")[0], baseline="pipesd", n_resamples=999)
    assert set(slower["verdict"]) == {"slower than pipesd at 95%"}


def test_report_says_why_a_figure_was_left_out(tmp_path):
    for system in ("cloud_only", "vanilla"):
        write_run(tmp_path / "sweep" / system, system, "lan",
                  [request(f"q{i}", system, 0.01 + 0.001 * i) for i in range(4)])
    page = R.build_report([tmp_path / "sweep"], tmp_path / "out", n_resamples=99).read_text()
    assert '<figure id="time_per_token_by_category">' in page
    assert '<figure id="speedup_vs_rtt">' not in page and '<figure id="energy_per_token">' not in page
    left = re.search(r"Left out: (.*?)</p>", page).group(1)
    assert "Speedup against the RTT: one RTT only (1.0)" in left
    assert "Energy per token per role: no energy figure" in left
    assert "Acceptance rate by draft position: no round records" in left


def test_cli_prints_the_report_path_last(toy_sweep, tmp_path, capsys):
    assert R.main([str(toy_sweep / "vanilla-lan"), str(toy_sweep / "cloud_only-lan"), "--out", str(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert Path(last) == tmp_path / "report.html" and Path(last).is_file()


def test_cli_latest_picks_the_run_written_last(toy_sweep, tmp_path, capsys):
    """``--latest DIR`` (what `make report` uses) reports on the run whose manifest changed last;
    folders without a manifest (a run that crashed before writing one) are passed over."""
    import shutil

    parent = tmp_path / "results"
    parent.mkdir()
    for i, name in enumerate(("vanilla-lan", "cloud_only-lan")):
        shutil.copytree(toy_sweep / name, parent / name)
        os.utime(parent / name / "manifest.json", (1_000_000 + i, 1_000_000 + i))
    (parent / "zz-crashed").mkdir()
    assert R.latest_run(parent) == parent / "cloud_only-lan"
    assert R.main(["--latest", str(parent)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert Path(last) == parent / "cloud_only-lan" / "report" / "report.html" and Path(last).is_file()
    assert R.main(["--latest", str(tmp_path / "nothing-here")]) == 2
    assert "no run folder under" in capsys.readouterr().err
    # a sweep written later (a folder of runs, as `make bench` writes) is reported whole
    sweep = parent / "bench-toy"
    for i, name in enumerate(("vanilla-lan", "cloud_only-lan")):
        shutil.copytree(toy_sweep / name, sweep / name)
        os.utime(sweep / name / "manifest.json", (2_000_000 + i, 2_000_000 + i))
    assert R.latest_run(parent) == sweep
    os.utime(parent / "vanilla-lan" / "manifest.json", (3_000_000, 3_000_000))
    assert R.latest_run(parent) == parent / "vanilla-lan"


def test_cli_names_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    out = subprocess.run([sys.executable, "-m", "analysis.report", str(tmp_path / "empty")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert str(tmp_path / "empty") in lines[0] and "manifest.json" in lines[0]
    assert not (tmp_path / "empty" / "report").exists()


# ---- rendering in headless Chromium -------------------------------------------------------------------

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-pipe", "--window-size=1280,1600")
CHECK_IMAGES = "JSON.stringify(Array.from(document.images).map(i => [i.complete, i.naturalWidth]))"


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    commands on fd 3, replies on fd 4, NUL-terminated JSON), so no port and no driver library."""

    def __init__(self, executable: str, profile: Path):
        to_read, self._to_write = os.pipe()
        self._from_read, from_write = os.pipe()
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_read, from_write)]
        for fd in (to_read, from_write):
            os.close(fd)

        def onto_3_and_4():
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen(
            [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=onto_3_and_4, pass_fds=(3, 4), start_new_session=True)
        for fd in high:
            os.close(fd)
        self._buffer, self._id, self.events = b"", 0, []

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        """Send one command and return its result (events that arrive meanwhile are kept)."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._next(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        """The first event ``method`` (already received, or the next to arrive)."""
        seen = next((e for e in self.events if e.get("method") == method), None)
        deadline = time.monotonic() + timeout
        while seen is None:
            event = self._next(deadline)
            self.events.append(event)
            seen = event if event.get("method") == method else None
        return seen

    def _next(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            if select.select([self._from_read], [], [], left)[0]:
                chunk = os.read(self._from_read, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed its pipe (exit code {self.proc.poll()})")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def render(self, page: Path) -> tuple[list, list[str], bytes]:
        """Open ``page`` in a new tab: ``(images as [complete, naturalWidth], console errors,
        full-page screenshot PNG)``."""
        self.events.clear()
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable", session=session)
        self.call("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        self.wait_for("Page.loadEventFired")
        images = json.loads(self.call("Runtime.evaluate", {"expression": CHECK_IMAGES, "returnByValue": True},
                                      session=session)["result"]["value"])
        shot = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                         session=session)
        self.call("Target.closeTarget", {"targetId": target})
        return images, self.errors(), base64.b64decode(shot["data"])

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries among the events so far."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif e.get("method") == "Runtime.exceptionThrown":
                out.append(p.get("exceptionDetails", {}).get("text", "exception"))
            elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(p["entry"].get("text", ""))
        return out

    def close(self) -> None:
        """Close the browser (asking first, then killing its process group) and the pipes."""
        try:
            if self.proc.poll() is None:
                self.call("Browser.close", timeout=10)
            self.proc.wait(timeout=20)
        except Exception:  # noqa: BLE001 - whatever went wrong, the browser must not outlive the test
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        finally:
            os.close(self._to_write)
            os.close(self._from_read)


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium not found: install it with `apt-get update && apt-get install -y chromium`",
                    pytrace=False)
    return exe


def _colours(png: bytes) -> int:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    return len(colours) if colours is not None else 1 << 20


@pytest.mark.slow
def test_report_renders_in_headless_chromium(toy_report, tmp_path):
    exe = _chromium()
    profile = tmp_path / "chromium-profile"
    broken = tmp_path / "broken.html"  # the checks themselves must catch a broken page
    broken.write_text('<!DOCTYPE html><html><body><p>x</p><img src="data:image/png;base64,AAAA">'
                      '<script>console.error("boom")</script></body></html>')
    browser = Chromium(exe, profile)
    try:
        images, errors, shot = browser.render(toy_report)
        bad_images, bad_errors, bad_shot = browser.render(broken)
    finally:
        browser.close()
        shutil.rmtree(profile, ignore_errors=True)
    assert len(images) == len(F.FIGURES)
    assert all(complete and width > 0 for complete, width in images), images
    assert errors == []
    assert shot.startswith(b"\x89PNG") and _colours(shot) > 100  # tables, text and plots: not one colour
    # ...and the same checks flag a page with a broken image and a console error
    assert bad_images == [[True, 0]] and any("boom" in e for e in bad_errors)
    assert _colours(bad_shot) > 1 and not profile.exists()


def test_objectives_add_slo_attainment_and_goodput(toy_sweep, tmp_path, capsys):
    from analysis.metrics import SLO, goodput

    assert R.main([str(toy_sweep), "--slo", "ttft:40000,tpot:300", "--out", str(tmp_path)]) == 0
    page = Path(capsys.readouterr().out.strip().splitlines()[-1]).read_text()
    assert "<h2>SLO attainment and goodput</h2>" in page and "TTFT &lt;= 40000 ms, TPOT &lt;= 300 ms" in page
    table = _html_tables(page)[3]  # runs, summary, ITL, then this
    assert table[0] == ["system", "network", "requests", "met SLO", "attainment", "serving, s", "goodput, req/s"]
    requests, _ = load_runs(toy_sweep)
    expected = goodput(requests, SLO(ttft=40.0, tpot=0.3)).set_index(["system", "network"])
    for row in table[1:]:
        e = expected.loc[(row[0], row[1])]
        assert row[3] == str(int(e["met"])) and row[6] == R.fmt(e["goodput"])
    assert R.main([str(toy_sweep), "--slo", "ttft=5"]) == 2
    assert "--slo: SLO 'ttft=5': write metric:milliseconds" in capsys.readouterr().err


def test_specwan_report_is_the_same_command(toy_sweep, tmp_path, capsys):
    """`specwan report` (analysis.cli, the console script) builds the same report; a folder that
    is not a run is one line naming the fix, exit 2."""
    from analysis.cli import main

    assert main(["report", str(toy_sweep), "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "r" / "report.html")
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("specwan report: ") and "no such folder" in err and len(err.splitlines()) == 1
    assert main(["report"]) == 2 and "give run folders" in capsys.readouterr().err
