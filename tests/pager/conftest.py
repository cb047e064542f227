"""The core: single flight, the budget, backpressure, prefetch, rows, leases and statistics,
on fake sources gated by events. Nothing here imports torch or aiohttp."""
