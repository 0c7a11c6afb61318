"""Real run folders for the analysis tests: the toy pair in virtual time (seconds per run).

    toy_run(root / "pipesd-4g", "pipesd", "4g")
    toy_run(root / "vanilla-r20-b5", "vanilla", "lan", **{"network.rtt_ms": 20, "network.up_mbps": 5})
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

TOY_OVERRIDES = ("pair=toy", "energy=estimate", "workload.chat_template=false")


def toy_run(run_dir: Path, system: str, network: str, *, size: int = 4, max_new_tokens: int = 12,
            overrides: Iterable[str] = (), **config) -> Path:
    """Execute one toy-pair run of ``system`` on ``network`` into ``run_dir`` and return it.

    ``size`` prompts, ``max_new_tokens`` each, energy estimated; ``overrides`` (Hydra
    ``key=value`` strings) and ``config`` (dotted key -> value, e.g. ``network.rtt_ms=20``)
    are applied after the defaults.
    """
    from hydra import compose, initialize_config_dir

    from harness.run import CONF_DIR, execute

    extra = [*overrides, *(f"{key}={value}" for key, value in config.items())]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=[
            *TOY_OVERRIDES, f"system={system}", f"network={network}", f"workload.size={size}",
            f"max_new_tokens={max_new_tokens}", *extra])
    execute(cfg, run_dir=run_dir)
    return run_dir


def toy_sweep(root: Path, systems: Iterable[str], networks: Iterable[str], **kwargs) -> Path:
    """One toy run per system and network, as ``root/<system>-<network>``; returns ``root``."""
    networks = list(networks)
    for system in systems:
        for network in networks:
            toy_run(root / f"{system}-{network}", system, network, **kwargs)
    return root
