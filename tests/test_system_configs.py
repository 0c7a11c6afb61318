"""Each system's options: values out of range are refused at config time with one line
naming the system, the key, what it should be and what it got; the edges of each range are
accepted."""

from __future__ import annotations

import pytest

from systems.api import get_system

REFUSED = [
    ("hsl", {"r2": 1.5}, "hsl: r2 must be in [0, 1], got 1.5"),
    ("hsl", {"r2": -0.1}, "hsl: r2 must be in [0, 1], got -0.1"),
    ("hsl", {"uplink_q": "rows"}, "hsl: uplink_q must be one of rule, full, got 'rows'"),
    ("edgellm", {"r1": 0.0}, "edgellm: r1 must be in (0, 1], got 0.0"),
    ("edgellm", {"r1": 1.01}, "edgellm: r1 must be in (0, 1], got 1.01"),
    ("edgellm", {"n_hat": 0}, "edgellm: n_hat must be >= 1, got 0"),
    ("edgellm", {"history": 0}, "edgellm: history must be >= 1, got 0"),
    ("edgellm", {"max_windows": 0}, "edgellm: max_windows must be >= 1, got 0"),
    ("edgellm", {"uplink_q": "rows"}, "edgellm: uplink_q must be one of rule, full, got 'rows'"),
    ("edgellm", {"r1_update": "mean"}, "edgellm: r1_update must be one of window, n_hat, got 'mean'"),
    ("pipesd", {"r1": 1.5}, "pipesd: r1 must be in [0, 1], got 1.5"),
    ("pipesd", {"r2": -0.5}, "pipesd: r2 must be in [0, 1], got -0.5"),
    ("pipesd", {"n_hat": 0}, "pipesd: n_hat must be >= 1, got 0"),
    ("pipesd", {"history": 0}, "pipesd: history must be >= 1, got 0"),
    ("pipesd", {"max_windows": 0}, "pipesd: max_windows must be >= 1, got 0"),
    ("pipesd", {"tuner_trials": 0}, "pipesd: tuner_trials must be >= 1, got 0"),
    ("pipesd", {"tuner_tokens": 0}, "pipesd: tuner_tokens must be >= 1, got 0"),
    ("pipesd", {"retune_window": 0}, "pipesd: retune_window must be >= 1, got 0"),
    ("pipesd", {"probe_sizes": -1}, "pipesd: probe_sizes must be >= 0, got -1"),
    ("pipesd", {"uplink_q": "rows"}, "pipesd: uplink_q must be one of rule, full, got 'rows'"),
    ("pipesd", {"tuner": "always"}, "pipesd: tuner must be one of none, online, got 'always'"),
    ("pipesd", {"tuner_method": "anneal"}, "pipesd: tuner_method must be one of bo, grid, random, got 'anneal'"),
    ("vanilla", {"gamma": 0}, "vanilla: gamma must be >= 1, got 0"),
    ("vanilla", {"uplink_q": "rows"}, "vanilla: uplink_q must be one of rule, full, got 'rows'"),
]


@pytest.mark.parametrize("system,overrides,message", REFUSED, ids=[f"{s}-{next(iter(o))}" for s, o, _ in REFUSED])
def test_out_of_range_options_are_refused(system, overrides, message):
    with pytest.raises(ValueError) as err:
        get_system(system).make_config(overrides)
    assert str(err.value) == message


def test_pipesd_refuses_an_unknown_dtype():
    with pytest.raises(TypeError, match="float17"):
        get_system("pipesd").make_config({"q_dtype": "float17"})


ACCEPTED = [
    ("hsl", {"r2": 0.0}), ("hsl", {"r2": 1.0}),
    ("edgellm", {"r1": 1e-9}), ("edgellm", {"r1": 1.0}),
    ("edgellm", {"n_hat": 1, "history": 1, "max_windows": 1}),
    ("pipesd", {"r1": 0.0, "r2": 0.0}), ("pipesd", {"r1": 1.0, "r2": 1.0}),
    ("pipesd", {"n_hat": 1, "history": 1, "max_windows": 1, "tuner_trials": 1, "tuner_tokens": 1,
                "retune_window": 1, "probe_sizes": 0}),
    ("vanilla", {"gamma": 1}),
]


@pytest.mark.parametrize("system,overrides", ACCEPTED)
def test_range_edges_are_accepted(system, overrides):
    cfg = get_system(system).make_config(overrides)
    assert all(getattr(cfg, k) == v for k, v in overrides.items())
