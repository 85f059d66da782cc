"""AutoRegEmbed: decoder LLMs as text-embedding models (arXiv 2502.11401)."""
from .method import logprobs as _logprobs
from .method.scorers import scorer_for as _scorer_for
from .release.encoder import Encoder


def sequence_logprobs(hidden, lm_head_weight, labels, scorer="auto", n_scored=None):
    """``method.logprobs.sequence_logprobs`` with ``scorer`` a backend or its name (``scorers.scorer_for``)
    (the public spelling; the method module itself takes backends only, below their registry)."""
    return _logprobs.sequence_logprobs(hidden, lm_head_weight, labels,
                                       _scorer_for(scorer) if isinstance(scorer, str) else scorer, n_scored)


__all__ = ["Encoder", "sequence_logprobs"]
__version__ = "0.1.0"
