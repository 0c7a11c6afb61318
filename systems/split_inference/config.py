"""Split inference's settings, and the check that an engine can be split as they ask."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from systems.engines.base import Engine, LayerSplit


@dataclass
class SplitInferenceConfig:
    """``edge_layers``: decoder layers of the target run on the edge (the embedding and layers
    ``[0, edge_layers)``); the cloud runs the rest, the final norm and the output head
    (PicoSpec's baseline puts 3 on its Jetson AGX). ``hidden_dtype``: the float type the
    hidden states travel in (float16 by default; each position costs ``hidden_size`` times
    its size in bytes on the uplink)."""

    edge_layers: int = 3
    hidden_dtype: str = "float16"

    def __post_init__(self):
        if self.edge_layers < 1:
            raise ValueError(f"split_inference: edge_layers must be >= 1 (the edge runs at least the first layer), "
                             f"got {self.edge_layers}")
        try:
            kind = np.dtype(self.hidden_dtype).kind
        except TypeError:
            kind = None
        if kind != "f":
            raise ValueError(f"split_inference: hidden_dtype must be a float type (float16, float32, float64), "
                             f"got {self.hidden_dtype!r}")


def layers_of(config: SplitInferenceConfig, engine: Engine) -> LayerSplit:
    """The engine's layer split, if it has one and ``edge_layers`` leaves the cloud a layer;
    otherwise a ValueError of one line naming the problem and the fix."""
    split = engine.layer_split()
    model = f"{engine.info.model} ({engine.info.backend} engine)"
    if split is None:
        raise ValueError(f"split_inference: {model} cannot run a range of its layers; run the target on the "
                         "transformers engine (e.g. pair=qwen25coder-hf) or the toy engine")
    if config.edge_layers >= split.n_layers:
        raise ValueError(f"split_inference: edge_layers={config.edge_layers} leaves the cloud no layer of {model}, "
                         f"which has {split.n_layers}; set system.params.edge_layers between 1 and "
                         f"{split.n_layers - 1}")
    return split


def check_engine(config: SplitInferenceConfig, engine: Engine) -> None:
    """:attr:`systems.api.SystemSpec.check`: refuse an engine split inference cannot run on."""
    layers_of(config, engine)
