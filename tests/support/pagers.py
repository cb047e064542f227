"""Types of the pager fixtures (``make_pager``, ``watch_pager``) for annotations."""

from __future__ import annotations

from collections.abc import Callable

import asyncpager as ap

PagerFactory = Callable[..., ap.Pager]
PagerWatch = Callable[[ap.Pager], ap.Pager]
