"""The ``kcap`` command (also ``python -m kcap``): one subcommand per stage.

  kcap demo [--out DIR]     the main job: train a small model on bioS, report bits learned
  kcap train CONFIG.toml    a real run (resumable with --resume; torchrun for several GPUs)
  kcap eval CHECKPOINT      bits, R and accuracy of a checkpoint (or a quantized folder)
  kcap quantize CHECKPOINT  int8/int4 post-training quantization (round-to-nearest or GPTQ)
  kcap data bios|biod|junk  generate a data set, print what it holds, optionally write windows
  kcap data qa              print question/answer pairs
  kcap data import-bior F   import bioR rewrites of bioS people (JSON Lines) for training
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import numpy as np


def _ratio(text: str) -> tuple[int, int]:
    try:
        u, j = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must look like 1:7, got {text!r}") from None
    return u, j


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kcap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job: train a small model, report its bits")
    demo.add_argument("--out", default="runs/demo", help="run folder (report.json, training.png, "
                                                        "checkpoints); default runs/demo")
    demo.add_argument("--preset", choices=("cpu", "gpu", "tiny"), default=None,
                      help="default: gpu when CUDA is available, else cpu; tiny: a few seconds")

    train = sub.add_parser("train", help="train from a TOML config")
    train.add_argument("config", help="TOML file mapping onto kcap.train.TrainConfig")
    train.add_argument("--out", required=True, help="run folder")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    ev = sub.add_parser("eval", help="evaluate a checkpoint's bits of knowledge")
    ev.add_argument("checkpoint", help="a run folder (its latest checkpoint), a checkpoint folder "
                                       "or a folder written by kcap quantize")
    ev.add_argument("--sample", type=int, default=None, help="people to evaluate (default all)")
    ev.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    ev.add_argument("--json", help="also write the report to this JSON file")

    qz = sub.add_parser("quantize", help="quantize a checkpoint's linear layers to int8/int4")
    qz.add_argument("checkpoint", help="a run folder (its latest checkpoint) or a checkpoint folder")
    qz.add_argument("--bits", type=int, choices=(8, 4), required=True, help="weight bits")
    qz.add_argument("--method", choices=("rtn", "gptq"), default="gptq",
                    help="round-to-nearest or GPTQ (default, calibrated on biographies)")
    qz.add_argument("--group-size", type=int, default=128, help="int4 group size: 32, 64 or 128")
    qz.add_argument("--calibration", type=int, default=1000,
                    help="biographies used to calibrate GPTQ (default 1000, as in the paper)")
    qz.add_argument("--include-head", action="store_true", help="quantize an untied LM head too")
    qz.add_argument("--out", required=True, help="folder for the quantized model")

    from kcap.experiments.cli import add_parser as add_experiment_parser
    add_experiment_parser(sub)
    from kcap.qa.cli import add_parser as add_qa_parser
    add_qa_parser(sub)

    data = sub.add_parser("data", help="generate bioS, bioD or junk-mixture data")
    kinds = data.add_subparsers(dest="kind", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--seed", type=int, default=0,
                        help="data seed, 0 .. 2**63-1 (profiles, renderings, order)")
    common.add_argument("--exposures", type=int, default=1, help="exposures per person to write")
    common.add_argument("--window", type=int, default=512, help="tokens per window")
    common.add_argument("--show", type=int, default=2, help="biographies to print")
    common.add_argument("--out", help="write the stream's windows to this .npz: tokens "
                                      "(windows, window) uint16 (uint32 past 65,536 ids), and "
                                      "labels with --labels; refused if it would not fit in memory")
    common.add_argument("--labels", action="store_true",
                        help="also write the label stream in the smallest dtypes: field uint8, "
                             "chunk uint8 (uint16 for C > 255), person uint8/uint16/uint32 by N; "
                             "-1 (padding) is the dtype's largest value; read back with "
                             "kcap.data.labels.TokenLabels(field, chunk, person).expand()")
    common.add_argument("--max-windows", type=int, default=None, help="stop after this many")

    bios = kinds.add_parser("bios", parents=[common], help="bioS(N)")
    bios.add_argument("--n", type=int, required=True, help="number of people N")
    bios.add_argument("--variant", default="online",
                      help="online | simple | multiM | permute | fullname, joined with '+'")
    biod = kinds.add_parser("biod", parents=[common], help="bioD(N, K, C, D, L, T)")
    for name, default, meaning in (("n", None, "people"), ("k", 4, "attributes"),
                                   ("c", 2, "chunks per value"), ("d", 100, "distinct chunks per attribute"),
                                   ("l", 2, "symbols per chunk"), ("t", 50, "alphabet size")):
        biod.add_argument(f"--{name}", type=int, required=default is None, default=default,
                          help=f"{name.upper()}: {meaning}" + ("" if default is None else f" (default {default})"))
    junk = kinds.add_parser("junk", parents=[common], help="useful bioS(N) + junk bioS(N')")
    junk.add_argument("--n", type=int, required=True, help="useful people")
    junk.add_argument("--junk-n", type=int, default=100_000_000, help="junk people N'")
    junk.add_argument("--ratio", type=_ratio, default=(1, 7), help="useful:junk tokens (1:7)")
    junk.add_argument("--marker", action="store_true", help="prepend <|useful|> to useful bios")
    qa = kinds.add_parser("qa", help="question/answer pairs of bioS(N)")
    qa.add_argument("--n", type=int, required=True, help="number of people N")
    qa.add_argument("--seed", type=int, default=0, help="data seed, 0 .. 2**63-1")
    qa.add_argument("--people", type=int, default=2, help="people to print")
    bior = kinds.add_parser("import-bior", help="import bioR rewrites (JSON Lines) of bioS(N)'s "
                                                "people for training with data.kind = 'bioR'")
    bior.add_argument("file", help='JSON Lines, one {"person": i, "text": "..."} per line, i in '
                                   "[0, N); a sample: kcap.data.bior.SAMPLE_PATH (--n 4 --seed 0)")
    bior.add_argument("--n", type=int, required=True, help="number of people N of bioS(N)")
    bior.add_argument("--seed", type=int, default=0, help="data seed of bioS(N), 0 .. 2**63-1")
    bior.add_argument("--out", required=True, help="folder to write (replaces an earlier import)")
    return p


def _dataset_and_stream(args):
    from kcap.data.biod import BioD, BioDConfig
    from kcap.data.bios import BioS, BioSConfig
    from kcap.data.stream import ExposureStream, MixtureStream

    labels = bool(args.out and args.labels)
    if args.kind == "bios":
        ds = BioS(BioSConfig(n=args.n, seed=args.seed, variant=args.variant))
    elif args.kind == "biod":
        ds = BioD(BioDConfig(n=args.n, k=args.k, c=args.c, d=args.d, l=args.l, t=args.t,
                             seed=args.seed))
    else:
        ds = BioS(BioSConfig(n=args.n, seed=args.seed, marker=args.marker))
        junk = BioS(BioSConfig(n=args.junk_n, seed=args.seed, person_offset=args.n))
        useful = ExposureStream(ds, args.exposures, args.window, args.seed, labels=labels)
        return ds, MixtureStream(useful, ExposureStream(junk, None, args.window, args.seed,
                                                        labels=labels), args.ratio, args.seed)
    return ds, ExposureStream(ds, args.exposures, args.window, args.seed, labels=labels)


def describe(ds) -> str:
    from kcap.capacity import data_bits_max

    used = ds.used_token_ids()
    lengths = ds.lengths(np.arange(min(ds.n_people, 10_000)), 0)
    attrs = ", ".join(f"{a.name} ({a.cardinality:,}{'' if a.counted else ', not counted'})"
                      for a in ds.attributes[:8]) + (" ..." if len(ds.attributes) > 8 else "")
    return (f"{ds.kind}: {ds.n_people:,} people; attributes: {attrs}\n"
            f"knowledge in the data (R_max numerator): {data_bits_max(ds):,.0f} bits "
            f"({data_bits_max(ds) / ds.n_people:.1f} per person)\n"
            f"tokens per biography: {lengths.mean():.1f} mean, {lengths.max()} max; vocabulary "
            f"{ds.tokenizer.vocab_size:,}, of which the data uses {len(used):,}")


class _OutPlan:
    """What ``kcap data --out`` will write: dtypes, label bounds and about how many windows.

    The window count is an upper estimate (the stream's end from a sample of biography
    lengths, 10% over, or --max-windows); refused if the windows, held twice while they are
    concatenated, would not fit in memory.
    """

    def __init__(self, args, ds, stream):
        from kcap.data.labels import VALUE, storage_dtype
        from kcap.data.memory_budget import check_memory

        useful = getattr(stream, "useful", stream)  # a mixture ends with its useful stream
        self.people = max(args.n, getattr(args, "junk_n", 0))  # mixtures: either data set
        self.chunks = getattr(args, "c", 1)
        self.attributes = len(ds.attributes)
        self.labels = useful.with_labels
        self.dtype = np.dtype(np.uint16 if ds.tokenizer.vocab_size <= 1 << 16 else np.uint32)
        mean = float(ds.lengths(np.arange(min(ds.n_people, 1000)), 0).mean())
        windows = useful.total_bios * mean * 1.1 / stream.window + 1
        if useful is not stream:
            windows = windows * (stream.u + stream.j) / stream.u + stream.u + stream.j
        self.windows = int(min(windows, args.max_windows or windows))
        per_token = self.dtype.itemsize
        if self.labels:
            per_token += sum(storage_dtype(high).itemsize for high in (
                VALUE + self.attributes - 1, self.chunks - 1, self.people - 1))
        check_memory(2 * self.windows * stream.window * per_token,
                     f"writing about {self.windows:,} windows of {stream.window:,} tokens to "
                     "--out", "--max-windows, --exposures or --n")


def _write_windows(path, stream, max_windows, plan: _OutPlan):
    from tqdm.auto import tqdm

    from kcap.atomic import atomic_path
    from kcap.data.labels import TokenLabels

    per_read = max(1, min(256, (1 << 20) // stream.window))  # ~1M tokens rendered at a time
    parts, labels, useful, done = [], [], [], 0
    try:
        # opened before the work: an unwritable --out fails at once, not after minutes
        with atomic_path(path) as tmp:
            with tqdm(total=plan.windows, desc="windows", unit="win") as bar:
                while max_windows is None or done < max_windows:
                    w = stream.next_windows(per_read if max_windows is None
                                            else min(per_read, max_windows - done))
                    if not len(w):
                        break
                    parts.append(w.tokens.astype(plan.dtype))
                    if w.labels is not None:
                        labels.append(w.labels.compact(plan.people, plan.chunks, plan.attributes))
                    if w.useful is not None:
                        useful.append(w.useful)
                    done += len(w)
                    bar.update(len(w))
            arrays = {"tokens": np.concatenate(parts)}
            if useful:
                arrays["useful"] = np.concatenate(useful)
            if labels:
                lab = TokenLabels.concatenate(labels)
                arrays.update(field=lab.field, chunk=lab.chunk, person=lab.person)
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
    except BrokenPipeError:
        raise
    except OSError as err:  # name the file the user gave, not the temporary one
        raise OSError(err.errno, err.strerror or str(err), str(path)) from None
    tokens = arrays["tokens"]
    print(f"wrote {len(tokens):,} windows of {tokens.shape[1]} tokens to {path}")


def cmd_data(args):
    if args.kind == "import-bior":
        from kcap.data.bior_import import import_bior, summary

        print(summary(import_bior(args.file, args.n, args.seed, args.out), args.out))
        return
    if args.kind == "qa":
        from kcap.data.bios import BioS, BioSConfig
        from kcap.data.qa import qa_pairs

        if args.people < 0:
            raise ValueError(f"--people must be >= 0, got {args.people}")
        ds = BioS(BioSConfig(n=args.n, seed=args.seed))
        count = min(args.people, ds.n_people)
        for lo in range(0, count, 1000):  # a thousand people at a time: memory stays flat
            for pair in qa_pairs(ds, np.arange(lo, min(lo + 1000, count))):
                print(pair.text)
        return
    if args.out and not args.out.endswith(".npz"):
        raise ValueError(f"--out must name a .npz file, got {args.out!r}")
    if args.max_windows is not None and args.max_windows < 1:
        raise ValueError(f"--max-windows must be >= 1, got {args.max_windows}")
    ds, stream = _dataset_and_stream(args)
    plan = _OutPlan(args, ds, stream) if args.out else None  # refuse a huge --out first
    print(describe(ds))
    for person in range(min(args.show, ds.n_people)):
        print(f"\n[person {person}, exposure 0]\n{ds.text(person, 0)}")
    if args.out:
        _write_windows(args.out, stream, args.max_windows, plan)


def cmd_demo(args):
    from kcap.demo import run_demo

    run_demo(args.out, args.preset)


def cmd_qa(args):
    from kcap.qa.cli import cmd

    cmd(args)


def cmd_experiment(args):
    from kcap.experiments.cli import cmd

    cmd(args)


def cmd_train(args):
    from kcap.config_file import load_config
    from kcap.demo import table
    from kcap.train import train

    report = train(load_config(args.config), args.out, resume=args.resume,
                   progress=not args.no_progress)
    if report.get("people"):
        print(table(report))


def cmd_eval(args):
    from kcap.evaluate_checkpoint import evaluate_checkpoint

    report, info = evaluate_checkpoint(args.checkpoint, sample=args.sample, batch_size=args.batch_size)
    print(report.summary())
    if "quantized" in info:
        q = info["quantized"]
        print(f"  quantized: int{q['bits']} {q['method']} ({len(q['layers'])} layers); stored "
              f"{info['stored_bits']:,} bits -> {report.bits / info['stored_bits']:.4f} bits of "
              "knowledge per stored bit")
    for attr, acc in report.attribute_accuracy.items():
        print(f"  {attr:<12} accuracy {acc['value']:.1%} (first token {acc['first_token']:.1%})")
    if args.json:
        from contextlib import nullcontext

        from kcap.atomic import write_json
        from kcap.run_lock import enclosing_run, run_lock

        run = enclosing_run(Path(args.json).parent)  # writing into a run: be its only writer
        with run_lock(run, "eval") if run is not None else nullcontext():
            write_json(args.json, {**report.to_dict(),
                                   **{k: v for k, v in info.items() if k != "quantized"},
                                   "quantized": info.get("quantized")})


def cmd_quantize(args):
    from kcap.quantize_run import quantize_run

    meta = quantize_run(args.checkpoint, args.out, args.bits, args.method, args.group_size,
                        args.calibration, args.include_head)
    print(f"quantized {len(meta['layers'])} layers to int{args.bits} ({args.method}) -> {args.out}; "
          f"evaluate with: kcap eval {args.out}")
    for name, why in meta["skipped"].items():
        print(f"  left in floating point: {name} ({why})")


_ATOMIC_TMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")  # kcap.atomic's temporaries


def _os_error_line(err: OSError, args) -> str:
    """'kcap: error: <what failed>: <path>' for a failed file operation. A write through
    kcap.atomic names its temporary file: show the target instead. An error without a
    file (a failed write() on a full disk) names the command's --out."""
    what = err.strerror or str(err) or type(err).__name__
    path = err.filename if err.filename is not None else getattr(args, "out", None)
    if path is not None:
        path = os.fsdecode(path)
        match = _ATOMIC_TMP.match(os.path.basename(path))
        if match:
            path = os.path.join(os.path.dirname(path), match["name"])
    return f"kcap: error: {what}" + ("" if path is None else f": {path}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        {"demo": cmd_demo, "data": cmd_data, "train": cmd_train, "eval": cmd_eval,
         "quantize": cmd_quantize, "experiment": cmd_experiment, "qa": cmd_qa}[args.command](args)
        sys.stdout.flush()  # a closed pipe surfaces here, not in the interpreter's last flush
    except BrokenPipeError:
        # the reader left (`kcap data ... | head`): stop quietly like other Unix tools; stdout
        # goes to devnull so the exit's flush cannot complain (the recipe of Python's docs)
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # stdout without a descriptor
            pass
        return 1
    except OSError as err:  # unwritable or full disk, /proc, a folder where a file goes...
        print(_os_error_line(err, args), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # what was written stays: runs resume from their checkpoints, sweeps continue
        print("\nkcap: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    except MemoryError:
        print("kcap: error: out of memory; lower the data, window or model sizes", file=sys.stderr)
        return 2
    except (ValueError, TypeError, RuntimeError, OverflowError) as err:
        print(f"kcap: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        # safetensors reports a checkpoint's I/O errors (a full disk...) as its own type, not
        # OSError; its message names the error and the path
        safetensors = sys.modules.get("safetensors")
        if safetensors is None or not isinstance(err, safetensors.SafetensorError):
            raise
        print("kcap: error: checkpoint file: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
