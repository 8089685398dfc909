"""The benchmark scripts (`python benchmarks/<name>.py`), importable as a package too, so that a
test can run a benchmark's own measuring code (`from benchmarks import quality`)."""
