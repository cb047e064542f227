"""How long each object-store emulator of the test suite takes to start: from
launch to its first answered request and its bucket made (one start per test
session, so this is what a session pays per store). moto's S3 server, started in
process on a thread, is the baseline, measured in the same run.

    .venv/bin/python scripts/bench_emulators.py --runs 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _benchutil import median, table

from tests.support.emulators import azurite_store, fake_gcs_store, moto_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"moto S3": [], "fake-gcs-server": [], "Azurite": []}
    for _ in range(args.runs):  # interleaved, so a busy moment hits every emulator alike
        with moto_store() as (_, s3):
            times["moto S3"].append(s3.started_in)
        with fake_gcs_store() as gcs:
            times["fake-gcs-server"].append(gcs.started_in)
        with azurite_store() as azure:
            times["Azurite"].append(azure.started_in)
    base = median(times["moto S3"])
    rows = [(name, median(t), min(t), max(t), median(t) / base) for name, t in times.items()]
    print(table(["emulator", "start s (median)", "min", "max", "x moto"], rows))


if __name__ == "__main__":
    main()
