"""AutoRegEmbed: decoder LLMs as text-embedding models (arXiv 2502.11401)."""
from .release.encoder import Encoder
from .method.logprobs import sequence_logprobs

__all__ = ["Encoder", "sequence_logprobs"]
__version__ = "0.1.0"
