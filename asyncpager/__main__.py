"""``python -m asyncpager``: the ``asyncpager`` command (see ``asyncpager.cli``)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
