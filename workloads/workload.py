"""A workload: prompt sets, a category filter, a seeded sample, a chat template, a token budget.

A :class:`WorkloadSpec` is what ``conf/workload/<name>.yaml`` says::

    name: mixed                 # recorded as ``workload`` in every result row
    parts:                      # or `set: humaneval` for a single set
      - {set: humaneval, per_category: 2}
      - {set: mtbench, per_category: 1}
    categories: null            # keep only these categories (null: all)
    per_category: null          # at most this many prompts per category
    size: null                  # at most this many prompts in all
    seed: 0                     # which prompts the sample takes
    turns: 1                    # at most this many turns per conversation (null: all)
    chat_template: true         # true: the target model's own template; false: raw text
    system_prompt: null         # an optional system message
    max_new_tokens: null        # null: the run's max_new_tokens
    path: null                  # set `file`: a JSON Lines prompt file
    fetch_large: false          # allow the 342 MiB BIG-bench download

Sampling is deterministic: a prompt's rank is the sha256 of ``seed`` and its id, and a
sample keeps the lowest ranks (per category, then in all). The same seed therefore gives the
same prompts on every machine, a larger sample contains a smaller one, and the prompts come
out in the order of their sets.

Multi-turn conversations are served turn by turn: :meth:`Workload.first_turns` gives the
first turn of every conversation; after the model has answered a turn, :meth:`Workload.next_turn`
builds the next one from the model's own answer (MT-Bench's protocol), or returns None when
the conversation is over.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from systems.api import GenerationRequest
from systems.sampling import SamplingParams
from workloads.prompts import Prompt, WorkloadError, read_prompt_file
from workloads.sets import PROMPT_SETS, load_set

FILE_SET = "file"
_PART_KEYS = ("set", "path", "categories", "per_category", "size")
_SPEC_KEYS = ("name", "parts", "set", "path", "categories", "per_category", "size", "seed", "turns",
              "chat_template", "system_prompt", "max_new_tokens", "fetch_large", "slo")
_SLO_KEYS = ("ttft_s", "tpot_s")
# Separates turns in raw-text mode (no chat template).
RAW_TURN_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Part:
    """One prompt set of a workload, with its own filter and sample."""

    set: str
    path: str | None = None
    categories: tuple[str, ...] | None = None
    per_category: int | None = None
    size: int | None = None


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    parts: tuple[Part, ...]
    categories: tuple[str, ...] | None = None
    per_category: int | None = None
    size: int | None = None
    seed: int = 0
    turns: int | None = None
    chat_template: bool = True
    system_prompt: str | None = None
    max_new_tokens: int | None = None
    fetch_large: bool = False
    # Service-level objective of every request (seconds; None: none): first token within
    # slo_ttft_s of arrival, then on average one token per slo_tpot_s.
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None

    def with_(self, **changes) -> "WorkloadSpec":
        return dataclasses.replace(self, **changes)


def _count(value, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise WorkloadError(f"workload.{key} must be a positive integer or null, got {value!r}")
    return value


def _categories(value, key: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) and c for c in value):
        raise WorkloadError(f"workload.{key} must be a list of category names or null, got {value!r}")
    return tuple(value)


def _slo(value) -> tuple[float | None, float | None]:
    if value is None:
        return None, None
    if not isinstance(value, Mapping):
        raise WorkloadError(f"workload.slo must be a mapping such as {{ttft_s: 2.0, tpot_s: 0.2}} or null, got {value!r}")
    unknown = sorted(set(value) - set(_SLO_KEYS))
    if unknown:
        raise WorkloadError(f"workload.slo: unknown key(s) {', '.join(unknown)}; valid: {', '.join(_SLO_KEYS)}")
    out = []
    for key in _SLO_KEYS:
        v = value.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
            raise WorkloadError(f"workload.slo.{key} must be a positive number of seconds or null, got {v!r}")
        out.append(None if v is None else float(v))
    if out[0] is None and out[1] is not None:
        raise WorkloadError("workload.slo: a tpot_s target needs a ttft_s target too (deadlines count from the first token's)")
    return out[0], out[1]


def _part(data: Mapping, where: str) -> Part:
    if not isinstance(data, Mapping):
        raise WorkloadError(f"{where} must be a mapping with a 'set', got {data!r}")
    unknown = sorted(set(data) - set(_PART_KEYS))
    if unknown:
        raise WorkloadError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(_PART_KEYS)}")
    name = data.get("set")
    path = data.get("path")
    if name is None and path is not None:
        name = FILE_SET
    if name != FILE_SET and name not in PROMPT_SETS:
        raise WorkloadError(f"{where}.set: unknown prompt set {name!r}; valid: {', '.join([*PROMPT_SETS, FILE_SET])}")
    if path == "???":  # Hydra's mark for a required value left unset
        path = None
    if name == FILE_SET and not path:
        raise WorkloadError(f"{where}: set 'file' needs a path to a JSON Lines prompt file "
                            "(e.g. workload=file workload.path=my_prompts.jsonl)")
    if name != FILE_SET and path:
        raise WorkloadError(f"{where}: a path is only for set 'file' (got set {name!r})")
    return Part(name, None if path is None else str(path), _categories(data.get("categories"), f"{where}.categories"),
                _count(data.get("per_category"), f"{where}.per_category"), _count(data.get("size"), f"{where}.size"))


def workload_spec(data: Mapping[str, Any]) -> WorkloadSpec:
    """A checked :class:`WorkloadSpec` from a config mapping; :class:`WorkloadError` names the bad key."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(data, DictConfig):
            data = OmegaConf.to_container(data, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    data = dict(data)
    unknown = sorted(set(data) - set(_SPEC_KEYS))
    if unknown:
        raise WorkloadError(f"workload: unknown key(s) {', '.join(unknown)}; valid: {', '.join(_SPEC_KEYS)}")
    parts_data = data.get("parts")
    if parts_data and (data.get("set") or data.get("path")):
        raise WorkloadError("workload: give either 'parts' or 'set'/'path', not both")
    if parts_data:
        if not isinstance(parts_data, (list, tuple)):
            raise WorkloadError(f"workload.parts must be a list of {{set: ...}} mappings, got {parts_data!r}")
        parts = tuple(_part(p, f"workload.parts[{i}]") for i, p in enumerate(parts_data))
    elif data.get("set") or data.get("path"):
        parts = (_part({"set": data.get("set"), "path": data.get("path")}, "workload"),)
    else:
        raise WorkloadError("workload: name a prompt set ('set: mtbench'), a file ('set: file' with 'path'), "
                            f"or 'parts'; sets: {', '.join(PROMPT_SETS)}")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise WorkloadError(f"workload.seed must be an integer, got {seed!r}")
    chat = data.get("chat_template", True)
    if not isinstance(chat, bool):
        raise WorkloadError(f"workload.chat_template must be true (the target's template) or false (raw text), "
                            f"got {chat!r}")
    system_prompt = data.get("system_prompt")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise WorkloadError(f"workload.system_prompt must be a string or null, got {system_prompt!r}")
    fetch_large = data.get("fetch_large", False)
    if not isinstance(fetch_large, bool):
        raise WorkloadError(f"workload.fetch_large must be true or false, got {fetch_large!r}")
    name = data.get("name") or (parts[0].set if len(parts) == 1 else "custom")
    return WorkloadSpec(str(name), parts, _categories(data.get("categories"), "categories"),
                        _count(data.get("per_category"), "per_category"), _count(data.get("size"), "size"), seed,
                        _count(data.get("turns"), "turns"), chat, system_prompt,
                        _count(data.get("max_new_tokens"), "max_new_tokens"), fetch_large, *_slo(data.get("slo")))


# ---- selection -----------------------------------------------------------------------------


def _rank(seed: int, prompt: Prompt) -> bytes:
    return hashlib.sha256(f"{seed}\0{prompt.id}".encode()).digest()


def sample(prompts: Sequence[Prompt], seed: int, categories: Sequence[str] | None = None,
           per_category: int | None = None, size: int | None = None) -> list[Prompt]:
    """Filter by category, then keep the lowest-ranked ``per_category`` of each and ``size`` in all.

    Deterministic given ``seed``; the kept prompts stay in their input order.
    """
    chosen = [p for p in prompts if categories is None or p.category in categories]
    if per_category is not None:
        by_cat: dict[str, list[Prompt]] = {}
        for p in chosen:
            by_cat.setdefault(p.category, []).append(p)
        keep = {id(p) for group in by_cat.values() for p in sorted(group, key=lambda q: _rank(seed, q))[:per_category]}
        chosen = [p for p in chosen if id(p) in keep]
    if size is not None and size < len(chosen):
        keep = {id(p) for p in sorted(chosen, key=lambda q: _rank(seed, q))[:size]}
        chosen = [p for p in chosen if id(p) in keep]
    return chosen


def select_prompts(spec: WorkloadSpec, home=None, pip_args=None, progress: bool = True) -> list[Prompt]:
    """The workload's prompts: each part loaded and sampled, then the workload-wide filter and sample."""
    prompts: list[Prompt] = []
    for part in spec.parts:
        if part.set == FILE_SET:
            available = read_prompt_file(part.path)
        else:
            available = load_set(part.set, home=home, pip_args=pip_args, fetch_large=spec.fetch_large,
                                 progress=progress).prompts
        if part.categories is not None:
            present = {p.category for p in available}
            missing = [c for c in part.categories if c not in present]
            if missing:
                raise WorkloadError(f"workload {spec.name}: set {part.set} has no category {', '.join(missing)}; "
                                    f"it has {', '.join(sorted(present))}")
        prompts += sample(available, spec.seed, part.categories, part.per_category, part.size)
    if spec.categories is not None:
        present = {p.category for p in prompts}
        missing = [c for c in spec.categories if c not in present]
        if missing:
            raise WorkloadError(f"workload {spec.name}: no prompts of category {', '.join(missing)}; "
                                f"it has {', '.join(sorted(present))}")
    prompts = sample(prompts, spec.seed, spec.categories, spec.per_category, spec.size)
    seen: dict[str, Prompt] = {}
    for p in prompts:
        if p.id in seen:
            raise WorkloadError(f"workload {spec.name}: prompt id {p.id!r} occurs twice (sets {seen[p.id].source} "
                                f"and {p.source}); prompt ids must be unique")
        seen[p.id] = p
    if not prompts:
        raise WorkloadError(f"workload {spec.name}: the filters leave no prompts")
    return prompts


# ---- turns and requests ----------------------------------------------------------------------


@dataclass
class Turn:
    """One request of a conversation: which prompt, which turn, and the request to serve."""

    prompt: Prompt
    index: int  # 0 for the first turn
    request: GenerationRequest
    answers: tuple[list[int], ...] = field(default=())  # the model's answers to the earlier turns (token ids)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_id(self) -> str:
        return self.prompt.id

    @property
    def category(self) -> str:
        return self.prompt.category

    def context(self) -> dict:
        """The result-row fields this request adds to a run's context."""
        return {"prompt_id": self.prompt.id, "category": self.prompt.category}


def turn_request_id(prompt_id: str, index: int) -> str:
    """The request id of a turn: the prompt id for the first, ``<prompt id>#turn<n>`` after."""
    return prompt_id if index == 0 else f"{prompt_id}#turn{index + 1}"


def strip_eos(tokens: Sequence[int], engine) -> list[int]:
    eos = set(getattr(engine, "eos_token_ids", ()) or ())
    out = [int(t) for t in tokens]
    while out and out[-1] in eos:
        out.pop()
    return out


def messages_for(prompt: Prompt, index: int, answers: Sequence[str], system_prompt: str | None = None) -> list[dict]:
    """The chat so far for turn ``index``: earlier user turns with the model's answers, then this turn."""
    if len(answers) != index:
        raise ValueError(f"turn {index + 1} of {prompt.id} needs {index} earlier answer(s), got {len(answers)}")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for j in range(index):
        messages += [{"role": "user", "content": prompt.turns[j]}, {"role": "assistant", "content": answers[j]}]
    messages.append({"role": "user", "content": prompt.turns[index]})
    return messages


def render_turn(engine, prompt: Prompt, index: int, answers: Sequence[Sequence[int]] = (),
                chat_template: bool = True, system_prompt: str | None = None,
                previous_prompt: Sequence[int] | None = None) -> list[int]:
    """The prompt tokens of turn ``index`` of ``prompt``, given the model's answers (token ids) so far.

    With the chat template the conversation is rendered again with the answers as assistant
    messages (as MT-Bench does). In raw-text mode turn n is the previous turn's prompt tokens,
    the model's answer tokens verbatim, and the new turn's text (``previous_prompt`` is then
    needed for turns after the first).
    """
    answers = [strip_eos(a, engine) for a in answers]
    if chat_template:
        texts = [engine.detokenize(a) for a in answers]
        return engine.tokenize(engine.apply_chat_template(messages_for(prompt, index, texts, system_prompt)))
    if index == 0:
        text = (system_prompt + RAW_TURN_SEPARATOR if system_prompt else "") + prompt.turns[0]
        return engine.tokenize(text)
    if previous_prompt is None:
        raise ValueError("raw-text turns after the first need the previous turn's prompt tokens")
    return [*previous_prompt, *answers[-1], *engine.tokenize(RAW_TURN_SEPARATOR + prompt.turns[index])]


@dataclass
class Workload:
    """Selected prompts plus how to turn them into requests."""

    spec: WorkloadSpec
    prompts: list[Prompt]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    seed: int = 0  # the first request's generation seed; request i gets seed + i

    def n_turns(self, prompt: Prompt) -> int:
        return len(prompt.turns) if self.spec.turns is None else min(self.spec.turns, len(prompt.turns))

    @property
    def n_requests(self) -> int:
        return sum(self.n_turns(p) for p in self.prompts)

    def categories(self) -> list[str]:
        return list(dict.fromkeys(p.category for p in self.prompts))

    def _request(self, prompt_index: int, index: int, tokens: list[int]) -> GenerationRequest:
        seed = self.seed + prompt_index + index * len(self.prompts)
        return GenerationRequest(turn_request_id(self.prompts[prompt_index].id, index), tokens, self.max_new_tokens,
                                 self.sampling, seed=seed, slo_ttft_s=self.spec.slo_ttft_s,
                                 slo_tpot_s=self.spec.slo_tpot_s)

    def first_turns(self, engine) -> list[Turn]:
        """The first turn of every conversation, rendered for ``engine``."""
        return [Turn(p, 0, self._request(i, 0, render_turn(engine, p, 0, (), self.spec.chat_template,
                                                              self.spec.system_prompt)))
                for i, p in enumerate(self.prompts)]

    def next_turn(self, turn: Turn, output_tokens: Sequence[int], engine) -> Turn | None:
        """The turn after ``turn``, whose prompt holds the model's answer ``output_tokens``; None at the end."""
        index = turn.index + 1
        if index >= self.n_turns(turn.prompt):
            return None
        answers = (*turn.answers, list(output_tokens))
        tokens = render_turn(engine, turn.prompt, index, answers, self.spec.chat_template, self.spec.system_prompt,
                             previous_prompt=turn.request.prompt)
        i = next(k for k, p in enumerate(self.prompts) if p.id == turn.prompt.id)
        return Turn(turn.prompt, index, self._request(i, index, tokens), answers)


def load_workload(spec: WorkloadSpec | Mapping[str, Any], max_new_tokens: int, sampling: SamplingParams | None = None,
                  seed: int = 0, home=None, pip_args=None, progress: bool = True) -> Workload:
    """Select a workload's prompts (fetching its sets when needed).

    ``max_new_tokens`` is the run's budget, used unless the spec sets its own.
    """
    if not isinstance(spec, WorkloadSpec):
        spec = workload_spec(spec)
    prompts = select_prompts(spec, home=home, pip_args=pip_args, progress=progress)
    budget = spec.max_new_tokens or max_new_tokens
    return Workload(spec, prompts, int(budget), sampling or SamplingParams(), seed)


def describe(workload: Workload) -> str:
    """One line: how many prompts and requests of which categories."""
    counts: dict[str, int] = {}
    for p in workload.prompts:
        counts[p.category] = counts.get(p.category, 0) + 1
    cats = ", ".join(f"{c} {n}" for c, n in counts.items())
    return (f"workload {workload.spec.name}: {len(workload.prompts)} prompts, {workload.n_requests} requests "
            f"({cats}); {workload.max_new_tokens} new tokens at most")
