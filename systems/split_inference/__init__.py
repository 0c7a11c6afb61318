"""Split inference: PicoSpec's third baseline (papers-addendum.md §1.5), the target cut by layers.

No draft model and no speculation: the target decodes autoregressively, its first
``edge_layers`` decoder layers (3 in the paper, on the Jetson AGX) and the embedding on the
edge, the remaining layers, the final norm and the output head in the cloud. Each half keeps
a KV cache for its own layers. Per token the edge runs its layers on the new position (the
whole prompt at first), sends the hidden states up (:class:`systems.messages.HiddenStates`:
positions x hidden_size numbers in ``hidden_dtype``, float16 by default), and the cloud runs
the rest, samples the next token with the shared rules of :mod:`systems.sampling` and sends
it down (:class:`systems.messages.TokenOut`). The edge emits it and goes on.

It needs an engine that can run a range of layers (:class:`systems.engines.base.LayerSplit`:
the transformers engine and the toy engine); any other is refused before anything runs.

What is modelled in virtual time: a device profile prices each half's work as its share of a
target forward pass (a prompt's prefill or one decode step): the edge's ``edge_layers / n``
of the edge device's target costs (``target_step_s``, ``target_prefill_s_per_token``), the
cloud's ``(n - edge_layers) / n`` of its own target costs, where ``n`` is the profile's
``target_layers`` (the model its costs describe) or else the loaded target's layer count;
the hidden states and the token cross the link model. The tokens are the real model's.
Float16 hidden states round what the cloud receives, so with an fp32 target the output can
differ from the unsplit model's at a near-tie; ``hidden_dtype: float32`` makes it exact.
"""

from systems.api import register_system
from systems.split_inference.config import SplitInferenceConfig, check_engine
from systems.split_inference.policy import SplitCloud, SplitEdge

register_system(
    "split_inference",
    config=SplitInferenceConfig,
    edge=SplitEdge,
    cloud=SplitCloud,
    description="the target cut by layers: its first edge_layers on the edge, hidden states up, tokens down",
    edge_model="target",
    check=check_engine,
    variants={"edge1": {"edge_layers": 1}, "fp32": {"hidden_dtype": "float32"}},
)
