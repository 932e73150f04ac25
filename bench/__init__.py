"""The benchmarks of SPEC 15 (`make bench`, i.e. `python -m bench`); see docs/benchmarks.md."""
