"""`python -m engine.benchmark`: the same as `stoker bench`."""

import sys

from engine.benchmark.cli import run

sys.exit(run())
