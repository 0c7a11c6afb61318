"""Model engines: llama.cpp, transformers, and a deterministic toy engine for tests.

``create_engine(kind, **options)`` builds one by name; heavy backends are imported lazily.
"""

from __future__ import annotations

from importlib import import_module

from systems.engines.base import Engine, EngineError, EngineInfo, EngineSession, LayerSplit, ModelPart

_BACKENDS = {
    "llamacpp": ("systems.engines.llamacpp", "LlamaCppEngine"),
    "transformers": ("systems.engines.hf", "TransformersEngine"),
    "toy": ("systems.engines.toy", "ToyEngine"),
    "fitted": ("systems.engines.fitted", "FittedEngine"),
}


def engine_kinds() -> list[str]:
    return sorted(_BACKENDS)


def create_engine(kind: str, **options) -> Engine:
    """Build an engine of the named kind; an unknown kind lists the valid ones."""
    if kind not in _BACKENDS:
        raise EngineError(f"unknown engine {kind!r}; valid engines: {', '.join(engine_kinds())}")
    module, cls = _BACKENDS[kind]
    return getattr(import_module(module), cls)(**options)


__all__ = ["Engine", "EngineError", "EngineInfo", "EngineSession", "LayerSplit", "ModelPart", "create_engine",
           "engine_kinds"]
