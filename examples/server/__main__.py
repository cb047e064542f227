"""``python -m examples.server MODEL --budget 512MiB --port 8080``."""

import sys

from .cli import main

sys.exit(main())
