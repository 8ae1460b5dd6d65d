"""kcap benchmarks: ``python -m bench <subject>``; results land in bench/results/."""
