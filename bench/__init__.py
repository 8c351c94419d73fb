"""cliplens benchmarks: the reference pipeline (open_clip as users run it) against cliplens, in one process.

Run ``python -m bench all`` from a checkout (or ``cliplens bench all``); see ``bench/__main__.py`` for the
options and docs/performance.md for the latest results. Not part of the test suite; the harness itself is
smoke-tested by tests/integration/test_bench.py with tiny sizes.
"""
