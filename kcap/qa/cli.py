"""`kcap qa MODEL`: the command line of the QA extraction test (kcap.qa.finetune)."""
from __future__ import annotations

from kcap.qa.finetune import QAConfig

_DEFAULTS = QAConfig()


def add_parser(sub) -> None:
    qa = sub.add_parser("qa", help="LoRA fine-tune on QA of half the people; exact match and "
                                   "extractable bits on the other half")
    qa.add_argument("model", help="a run folder, a checkpoint folder or a quantized model's folder")
    qa.add_argument("--rank", type=int, default=_DEFAULTS.rank, help="LoRA rank (default 16)")
    qa.add_argument("--alpha", type=float, default=_DEFAULTS.alpha, help="LoRA alpha (default 32)")
    qa.add_argument("--where", default=",".join(_DEFAULTS.where),
                    help="adapted matrices among q, v, mlp (default q,v,mlp)")
    qa.add_argument("--lr", type=float, default=_DEFAULTS.lr, help="peak learning rate (1e-3)")
    qa.add_argument("--weight-decay", type=float, default=_DEFAULTS.weight_decay)
    qa.add_argument("--epochs", type=int, default=_DEFAULTS.epochs,
                    help=f"passes over the fine-tuning half's pairs (default {_DEFAULTS.epochs})")
    qa.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size,
                    help=f"QA pairs per step (default {_DEFAULTS.batch_size})")
    qa.add_argument("--test-people", type=int, default=_DEFAULTS.test_people,
                    help="held-out people asked (default 2000; 0: all of the test half)")
    qa.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    qa.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda")
    qa.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args) -> QAConfig:
    where = tuple(w.strip() for w in args.where.split(",") if w.strip())
    return QAConfig(rank=args.rank, alpha=args.alpha, where=where, lr=args.lr,
                    weight_decay=args.weight_decay, epochs=args.epochs, batch_size=args.batch_size,
                    test_people=args.test_people or None, seed=args.seed)


def cmd(args) -> None:
    from kcap.qa.finetune import REPORT_NAME, output_folder, run_qa
    from kcap.qa.report import summary_lines

    cfg = config_from_args(args)
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda[:i], got {args.device!r}")
    report = run_qa(args.model, cfg, args.device, progress=not args.no_progress)
    print("\n".join(summary_lines(report)))
    print(f"wrote {output_folder(args.model) / REPORT_NAME}")
