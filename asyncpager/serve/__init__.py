"""``asyncpager serve``: an OpenAI-compatible inference server for a transformers
causal LM whose decoder layers are paged under a RAM budget (extra ``server``), and
the same API as a Ray Serve application (``asyncpager.serve.ray``, extra ``ray``).

Modules: ``_protocol`` (request parsing, the OpenAI error format), ``_text`` (token
ids to text, stop strings), ``_batch`` (the left-padded batch KV cache), ``_scheduler``
(the step scheduler: one batched forward per step for every active request),
``_api`` (the API over one model: admission, generation, models, health, metrics,
independent of the HTTP front end), ``_reply`` (a generation's JSON body or SSE
frames), ``_app`` (the aiohttp front end), ``_asgi`` (the ASGI front end Ray's proxy
calls), ``_lm`` (opening the model), ``_main`` (the command's options and lifecycle),
``ray`` (the Ray Serve deployment and its application builder). Importing this
package imports no torch.
"""

from ._main import add_arguments, serve

__all__ = ["add_arguments", "serve"]
