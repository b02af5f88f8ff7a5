"""Benchmarks of the esa kernels (``python -m bench --help``); not part of the test suite or the package."""
