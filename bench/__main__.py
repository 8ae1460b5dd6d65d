"""python -m bench <subject> [--quick]"""
import argparse

SUBJECTS = ("data", "train", "attention", "mlp", "quant_matmul", "quantization", "moe", "pack",
            "cross_entropy", "profile", "registers")

parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
parser.add_argument("subject", choices=SUBJECTS)
parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
parser.add_argument("--full", action="store_true", help="pack: M = 64 too on the CPU")
parser.add_argument("--run", help="quantization: an existing run folder instead of training one")
args = parser.parse_args()
if args.subject == "data":
    from bench import data
    data.run(quick=args.quick)
elif args.subject == "attention":
    from bench import attention
    attention.run(quick=args.quick)
elif args.subject == "mlp":
    from bench import mlp
    mlp.run(quick=args.quick)
elif args.subject == "quant_matmul":
    from bench import quant_matmul
    quant_matmul.run(quick=args.quick)
elif args.subject == "quantization":
    from bench import quantization
    quantization.run(args.run)
elif args.subject == "moe":
    from bench import moe
    moe.run(quick=args.quick)
elif args.subject == "train":
    from bench import train
    train.run(quick=args.quick)
elif args.subject == "registers":
    from bench import registers
    registers.run(quick=args.quick)
elif args.subject == "profile":
    from bench import profile
    profile.run(quick=args.quick)
elif args.subject == "cross_entropy":
    from bench import cross_entropy
    cross_entropy.run(quick=args.quick)
elif args.subject == "pack":
    from bench import pack
    pack.run(quick=args.quick, full=args.full)
