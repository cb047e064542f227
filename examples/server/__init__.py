"""An aiohttp inference server over asyncpager (a toy forward pass, real paging).

    python -m examples.server MODEL --budget 512MiB --port 8080

See ``app.py`` for the endpoints and the cancellation rules, ``model.py`` for the toy
forward pass, ``loadtest.py`` (and ``scripts/load_server.py``) for the load test.
Needs the ``server`` and ``prometheus`` extras (aiohttp, prometheus_client).
"""
