"""Speed benchmarks (run from the repository root: python -m benchmarks.generation). This file makes the folder a
regular package: fairscale installs an unrelated top-level `benchmarks` package that would otherwise shadow it."""
