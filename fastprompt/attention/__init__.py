"""The prefix-attention op: public function (:mod:`.op`) → dispatch and autograd (:mod:`.dispatch`) →
backend (``fastprompt.kernels.prefix_attention``, :mod:`.cpu_backend` over ``csrc/``, :mod:`.torch_backend`).

Also here: the argument record every backend reads (:mod:`.args`), merging partial attention by
log-sum-exp (:mod:`.merge`), the naive path and the float64 oracle (:mod:`.reference`), and the shared
test/benchmark cases with their tolerances (:mod:`.cases`). Nothing here imports from the layers above
(encoders, prefix, hf, serving, cli).
"""

from fastprompt.attention.args import AttentionArgs, check_index_values
from fastprompt.attention.dispatch import BACKENDS, Backend, attend, available_backends, resolve_backend
from fastprompt.attention.merge import merge_attention_states
from fastprompt.attention.op import prefix_attention

__all__ = [
    "BACKENDS",
    "AttentionArgs",
    "Backend",
    "attend",
    "available_backends",
    "check_index_values",
    "merge_attention_states",
    "prefix_attention",
    "resolve_backend",
]
