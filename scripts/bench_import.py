"""How long ``import asyncpager`` takes in a fresh interpreter.

Each row is the median over ``--runs`` fresh processes of the cumulative time
``python -X importtime`` reports for the module; the baseline is ``numpy``
(which asyncpager imports anyway), measured in the same run. ``ml_dtypes`` is
shown for scale: ``import asyncpager`` must not pay for it.

    .venv/bin/python scripts/bench_import.py --runs 15
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

from _benchutil import median, table

_LINE = re.compile(r"import time:\s*\d+\s*\|\s*(\d+)\s*\|\s*(\S+)\s*$")


def import_seconds(module: str) -> float:
    """Cumulative import time of ``module`` in a fresh interpreter, seconds."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        check=True,
    )
    for line in done.stderr.splitlines():
        match = _LINE.match(line)
        if match and match.group(2) == module:
            return int(match.group(1)) / 1e6
    raise RuntimeError(f"no import time reported for {module}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    modules = ["numpy", "asyncpager", "ml_dtypes"]
    times = {m: median([import_seconds(m) for _ in range(args.runs)]) for m in modules}
    base = times["numpy"]
    rows = [(m, f"{times[m] * 1e3:.0f} ms", f"{times[m] / base:.2f}x") for m in modules]
    print(f"import time, median of {args.runs} fresh interpreters")
    print(table(["module", "import time", "vs numpy"], rows))


if __name__ == "__main__":
    main()
