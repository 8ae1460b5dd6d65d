"""The ``kcap`` command (also ``python -m kcap``): one subcommand per stage.

  kcap demo [--out DIR]     the main job: train a small model on bioS, report bits learned
  kcap train CONFIG.toml    a real run (resumable with --resume; torchrun for several GPUs)
  kcap eval CHECKPOINT      bits, R and accuracy of a checkpoint (or a quantized folder)
  kcap quantize CHECKPOINT  int8/int4 post-training quantization (round-to-nearest or GPTQ)
  kcap data bios|biod|junk  generate a data set, print what it holds, optionally write windows
  kcap data qa              print question/answer pairs
"""
from __future__ import annotations

import argparse
import sys

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

    data = sub.add_parser("data", help="generate bioS, bioD or junk-mixture data")
    kinds = data.add_subparsers(dest="kind", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--seed", type=int, default=0, help="data seed (profiles, renderings, order)")
    common.add_argument("--exposures", type=int, default=1, help="exposures per person to write")
    common.add_argument("--window", type=int, default=512, help="tokens per window")
    common.add_argument("--show", type=int, default=2, help="biographies to print")
    common.add_argument("--out", help="write the stream's windows to this .npz (tokens, and "
                                      "labels with --labels)")
    common.add_argument("--labels", action="store_true", help="also write the label stream")
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
    qa.add_argument("--seed", type=int, default=0, help="data seed")
    qa.add_argument("--people", type=int, default=2, help="people to print")
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


def _write_windows(path, stream, max_windows, tokenizer):
    from tqdm.auto import tqdm

    from kcap.atomic import atomic_path
    from kcap.data.labels import TokenLabels

    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
    parts, labels, useful = [], [], []
    with tqdm(desc="windows", unit="win") as bar:
        while max_windows is None or len(parts) * 256 < max_windows:
            w = stream.next_windows(256)
            if not len(w):
                break
            parts.append(w.tokens.astype(dtype))
            if w.labels is not None:
                labels.append(w.labels)
            if w.useful is not None:
                useful.append(w.useful)
            bar.update(len(w))
    tokens = np.concatenate(parts)[:max_windows]
    arrays = {"tokens": tokens}
    if useful:
        arrays["useful"] = np.concatenate(useful)[:max_windows]
    if labels:
        lab = TokenLabels.concatenate([x.reshape(-1) for x in labels])
        n = tokens.size
        arrays.update(field=lab.field[:n].reshape(tokens.shape),
                      chunk=lab.chunk[:n].reshape(tokens.shape),
                      person=lab.person[:n].reshape(tokens.shape))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    print(f"wrote {len(tokens):,} windows of {tokens.shape[1]} tokens to {path}")


def cmd_data(args):
    if args.kind == "qa":
        from kcap.data.bios import BioS, BioSConfig
        from kcap.data.qa import qa_pairs

        ds = BioS(BioSConfig(n=args.n, seed=args.seed))
        for pair in qa_pairs(ds, np.arange(min(args.people, ds.n_people))):
            print(pair.text)
        return
    if args.out and not args.out.endswith(".npz"):
        raise ValueError(f"--out must name a .npz file, got {args.out!r}")
    if args.max_windows is not None and args.max_windows < 1:
        raise ValueError(f"--max-windows must be >= 1, got {args.max_windows}")
    ds, stream = _dataset_and_stream(args)
    print(describe(ds))
    for person in range(min(args.show, ds.n_people)):
        print(f"\n[person {person}, exposure 0]\n{ds.text(person, 0)}")
    if args.out:
        _write_windows(args.out, stream, args.max_windows, ds.tokenizer)


def cmd_demo(args):
    from kcap.demo import run_demo

    run_demo(args.out, args.preset)


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
        from kcap.atomic import write_json
        write_json(args.json, {**report.to_dict(), **{k: v for k, v in info.items() if k != "quantized"},
                               "quantized": info.get("quantized")})


def cmd_quantize(args):
    from kcap.quantize_run import quantize_run

    meta = quantize_run(args.checkpoint, args.out, args.bits, args.method, args.group_size,
                        args.calibration, args.include_head)
    print(f"quantized {len(meta['layers'])} layers to int{args.bits} ({args.method}) -> {args.out}; "
          f"evaluate with: kcap eval {args.out}")
    for name, why in meta["skipped"].items():
        print(f"  left in floating point: {name} ({why})")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        {"demo": cmd_demo, "data": cmd_data, "train": cmd_train, "eval": cmd_eval,
         "quantize": cmd_quantize}[args.command](args)
    except (ValueError, TypeError, RuntimeError) as err:
        print(f"kcap: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
