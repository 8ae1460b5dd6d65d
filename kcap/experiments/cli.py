"""`kcap experiment list | run | status | report`: the command line of the experiments."""
from __future__ import annotations

import argparse

from kcap.experiments.spec import PRESETS


def add_parser(sub) -> None:
    ex = sub.add_parser("experiment", help="the paper's experiments: grids of runs, figures, "
                                           "the paper's claims side by side")
    cmds = ex.add_subparsers(dest="action", required=True)
    cmds.add_parser("list", help="every experiment, what it varies, its cost per preset")
    run = cmds.add_parser("run", help="run (or continue) an experiment's grid")
    run.add_argument("key", help="r1 ... r12 (see `kcap experiment list`)")
    run.add_argument("--preset", choices=PRESETS, default="smoke",
                     help="smoke: CPU minutes (default); gpu: one H100; paper: a cluster")
    run.add_argument("--out", required=True, help="sweep folder (created, or continued)")
    run.add_argument("--executor", choices=("local", "slurm"), default="local")
    run.add_argument("--slots", type=int, default=None,
                     help="local: runs at once (default: one per GPU, else one per 2 cores)")
    run.add_argument("--gpus", default=None, help="local: GPU indices to use, e.g. 0,1,2,3")
    run.add_argument("--per-gpu", type=int, default=1, help="local: runs at once per GPU")
    run.add_argument("--threads", type=int, default=None, help="local: torch threads per CPU run")
    run.add_argument("--partition", default=None, help="slurm: partition")
    run.add_argument("--time", type=int, default=None, help="slurm: minutes per task")
    run.add_argument("--gpus-per-task", type=int, default=None, help="slurm: GPUs per task")
    run.add_argument("--parallel", type=int, default=None, help="slurm: array tasks at once")
    # submitit's "local" or "debug" cluster, for the tests
    run.add_argument("--cluster", default=None, help=argparse.SUPPRESS)
    run.add_argument("--pack", choices=("auto", "on", "off"), default="auto",
                     help="train compatible runs as packs of models in one process: auto (on a "
                          "GPU, the default), on (also on a CPU, where it is slower), off")
    run.add_argument("--qa", action="store_true",
                     help="also run the QA extraction test (kcap qa) on every trained run: "
                          "the figure and table gain extractable bits")
    run.add_argument("--bior", default=None, metavar="DIR",
                     help="r2: also train on this bioR import (kcap data import-bior)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    st = cmds.add_parser("status", help="runs done / running / failed and an ETA")
    st.add_argument("out", help="sweep folder")
    rep = cmds.add_parser("report", help="figures and results.md from the results table")
    rep.add_argument("out", help="sweep folder")


def _executor(args):
    from kcap.experiments.executors import LocalExecutor, SubmititExecutor

    if args.executor == "slurm":
        options = {k: v for k, v in (("slurm_partition", args.partition),
                                     ("timeout_min", args.time),
                                     ("gpus_per_node", args.gpus_per_task),
                                     ("slurm_array_parallelism", args.parallel)) if v is not None}
        if args.time is None:
            raise ValueError("--executor slurm needs --time (minutes per task): Slurm's default "
                             "limit would stop runs after minutes")
        return SubmititExecutor(f"{args.out}/slurm", cluster=args.cluster or "slurm", **options)
    for name in ("slots", "per_gpu", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.gpus:
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
        if not all(g.isdigit() for g in gpus):
            raise ValueError(f"--gpus must be GPU indices like 0,1,2, got {args.gpus!r}")
        return LocalExecutor([g for g in gpus for _ in range(args.per_gpu)], threads=args.threads)
    if args.slots:
        return LocalExecutor(["cpu"] * args.slots, threads=args.threads)
    return LocalExecutor(threads=args.threads)


def cmd(args) -> None:
    from kcap.experiments import catalog

    if args.action == "list":
        print(catalog.list_text())
    elif args.action == "run":
        from kcap.experiments import registry
        from kcap.experiments.runner import run_sweep

        registry.get(args.key)  # an unknown key fails before anything is created
        executor = _executor(args)
        try:
            rows = run_sweep(args.key, args.preset, args.out, executor,
                             progress=not args.no_progress, pack=args.pack, qa=args.qa,
                             bior=args.bior)
        finally:
            executor.close()
        done = sum(r["status"] == "done" for r in rows)
        print(f"{args.key}: {done} of {len(rows)} runs done; {args.out}/results.md, "
              f"{args.out}/figures/")
    elif args.action == "status":
        print(catalog.status_text(args.out))
    elif args.action == "report":
        from kcap.experiments.report import write_report
        from kcap.experiments.results import row, write_results
        from kcap.experiments.sweep import load_sweep

        _, _, jobs = load_sweep(args.out)
        rows = [row(j) for j in jobs]  # the table as the files say now
        write_results(args.out, rows)
        print(f"wrote {write_report(args.out, rows)}")
