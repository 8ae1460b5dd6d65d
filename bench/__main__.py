"""python -m bench <subject> [--quick]"""
import argparse
import importlib

from bench import harness

SUBJECTS = ("data", "train", "attention", "mlp", "quant_matmul", "quantization", "moe", "pack",
            "cross_entropy", "profile", "registers", "prefetch")

parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
parser.add_argument("subject", choices=SUBJECTS)
parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
parser.add_argument("--full", action="store_true", help="pack: M = 64 too on the CPU")
parser.add_argument("--run", help="quantization: an existing run folder instead of training one")
args = parser.parse_args()
# each subject is bench/<subject>.py with a run(); two take other options than --quick
options = {"quantization": {"run_dir": args.run}, "pack": {"quick": args.quick, "full": args.full}}
harness.QUICK = args.quick
subject = importlib.import_module(f"bench.{args.subject}")
subject.run(**options.get(args.subject, {"quick": args.quick}))
