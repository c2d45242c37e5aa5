"""The benchmark's app (bench.app) holding a footprint of its own in every process that loads it, as a big app's
imports, models and caches do: BENCH_FOOTPRINT_MB (default 40) MiB of private memory, every page written."""

import os

from bench.app import app  # noqa: F401 - served as bench.footprint_app:app

_ballast = bytes(range(256)) * (int(os.environ.get("BENCH_FOOTPRINT_MB", "40")) * 4096)
