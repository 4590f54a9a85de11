"""crowdtrain.robust: robust, memory-bounded aggregation of volunteers' pseudo-gradients.

Aggregation rules (mean, coordinate-wise median and trimmed mean after Yin et al., ICML 2018,
centered clipping after Karimireddy, He and Jaggi, ICML 2021, with bucketing after Karimireddy,
He and Jaggi, ICLR 2022) run fragment by fragment over contributions read through
``DeltaSource``, so memory does not grow with contributions × model size.
"""

from crowdtrain.robust.aggregate import AggregateResult, aggregate, global_norms
from crowdtrain.robust.sources import DeltaSource, DictSource, SafetensorsFileSource, read_all

__all__ = [
    "AggregateResult",
    "DeltaSource",
    "DictSource",
    "SafetensorsFileSource",
    "aggregate",
    "global_norms",
    "read_all",
]
