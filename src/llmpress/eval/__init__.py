"""The pieces of the judge: the protocol (:mod:`.windows`), perplexity and the cached
reference of a causal LM (:mod:`.causal`), sentence-embedding fidelity of an encoder
(:mod:`.encoder`) and the cost side (:mod:`.cost`). :func:`.api.evaluate` puts them
together; :func:`.tasks.evaluate_tasks` runs lm-evaluation-harness tasks side by side."""
from .api import evaluate
from .causal import TOPK, Reference, perplexity
from .cost import RSSMeter, cost_of, linear_bpw
from .encoder import embed, embedding_fidelity
from .tasks import evaluate_tasks
from .windows import Protocol, make_windows, sentences, tokenizer_sha256

__all__ = ["evaluate", "evaluate_tasks", "TOPK", "Reference", "perplexity", "RSSMeter", "cost_of", "linear_bpw", "embed", "embedding_fidelity",
           "Protocol", "make_windows", "sentences", "tokenizer_sha256"]
