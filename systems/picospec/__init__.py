"""PicoSpec (Zhang et al., arXiv 2603.19133): asynchronous edge-cloud speculative decoding.

Three parts, each switchable for the paper's ablation (Tables 2 and 3):

- parallel drafting: while round i is verified the edge drafts round i+1 from its tail,
  assuming full acceptance; the pre-drafted round survives only under the shared lossless
  rule of :mod:`systems.protocol` (full acceptance and the cloud's token equal to the first
  pre-drafted token), otherwise it is discarded on both sides and counted as waste;
- fast verification (Pre-Verify): the edge streams a round's tokens as it drafts them, and
  the cloud scores what has arrived whenever it is idle, so little is left when the round's
  verification request arrives; a correction the edge resampled goes up at once;
- separate rejection sampling with top-K compression (:func:`systems.sampling.verify_sparse`):
  ids and q(x) up, TopK(p_j) down on a rejection only, the edge resamples the correction.

See :mod:`systems.picospec.policy` for the rules chosen where the paper is silent and
:mod:`systems.picospec.model` for the paper's performance model (§3.4). Sources:
papers.md §2 and papers-addendum.md §1.
"""

from systems.api import register_system
from systems.picospec.model import report
from systems.picospec.policy import PicoSpecCloud, PicoSpecConfig, PicoSpecEdge

register_system(
    "picospec",
    config=PicoSpecConfig,
    edge=PicoSpecEdge,
    cloud=PicoSpecCloud,
    description="parallel drafting, fast (pre-)verification, sparse split rejection with top-K",
    variants={
        "n2": {"n": 2},
        "n6": {"n": 6},
        "stop-and-wait": {"parallel_draft": False, "fast_verify": False},
        "full-rows": {"split_rejection": False},
    },
    report=report,
)
