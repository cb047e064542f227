"""asyncpager.torch: run Hugging Face transformers models with their weights paged
through asyncpager (optional extra ``torch``: ``pip install 'asyncpager[torch]'``).

    from asyncpager.torch import PagedCausalLM
    async with PagedCausalLM.open("gemma-3-270m/", budget_bytes="300MiB",
                                  prefetch_depth=1, policy="schedule") as lm:
        new_ids = await lm.generate(input_ids, max_new_tokens=32)

The core package never imports torch; importing this module does.
"""

from ._experts import ExpertStats
from ._layers import ForwardCancelled
from ._lm import ForwardStats, PagedCausalLM
from ._skeleton import CheckpointMismatch
from ._tensors import ReadOnlyTensor, as_tensor, torch_dtype

__all__ = [
    "CheckpointMismatch",
    "ExpertStats",
    "ForwardCancelled",
    "ForwardStats",
    "PagedCausalLM",
    "ReadOnlyTensor",
    "as_tensor",
    "torch_dtype",
]
