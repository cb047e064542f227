"""``asyncpager serve``: an OpenAI-compatible inference server for a transformers
causal LM whose decoder layers are paged under a RAM budget (extra ``server``).

Modules: ``_protocol`` (request parsing, the OpenAI error format), ``_text`` (token
ids to text, stop strings), ``_batch`` (the left-padded batch KV cache), ``_scheduler``
(the step scheduler: one batched forward per step for every active request),
``_app`` (aiohttp handlers, metrics, health), ``_lm`` (opening the model), ``_main``
(the command's options and lifecycle). Importing this package imports no torch.
"""

from ._main import add_arguments, serve

__all__ = ["add_arguments", "serve"]
