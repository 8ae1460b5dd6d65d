"""The paper's experiments as sweeps: a registry of grids (registry.py, grids.py), a runner
that runs or continues a sweep through an executor (runner.py, job.py, executors.py), and
the results table, findings, figures and results.md drawn from files (results.py,
findings.py, figures.py, report.py). `kcap experiment list | run | status | report`."""
