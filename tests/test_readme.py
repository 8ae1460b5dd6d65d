"""The README's examples work as written.

Every ```python block runs (in a fresh namespace, from an empty working folder); every
``kcap ...`` command of a ```bash block parses with kcap's own argument parser (without
running it) and names config files that exist; the two commands that newcomers and CI read
are marked where CI looks for them (.ci/run takes the line two below the marker).
"""
import contextlib
import io
import re
import shlex
import tempfile
from pathlib import Path

import pytest
import torch

from kcap.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
OPERATORS = {"&&", "||", ";", "|", "&"}
PLACEHOLDER_RE = re.compile(r"[A-Z][A-Z_]*")  # CONFIG, DIR: names the reader fills in


def fenced_blocks(text: str) -> list[tuple[str, int, str]]:
    """(language, line number of the block's first line, body) of every ``` block."""
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, start, body = line[3:].strip(), number + 1, []
            else:
                blocks.append((lang, start, "\n".join(body) + "\n"))
                lang = None
        elif lang is not None:
            body.append(line)
    if lang is not None:
        raise ValueError(f"README.md: the ``` block opened at line {start - 1} is never closed")
    return blocks


def shell_segments(line: str) -> list[list[str]]:
    """The simple commands of one shell line (split at &&, ||, ;, |), comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    segments = [[]]
    for token in lexer:
        if token in OPERATORS:
            segments.append([])
        else:
            segments[-1].append(token)
    return [s for s in segments if s]


def kcap_argv(segment: list[str]) -> list[str] | None:
    """The arguments given to kcap by a simple command (``kcap``, ``.venv/bin/kcap``,
    ``python -m kcap``, ``torchrun ... -m kcap``), or None if it does not run kcap."""
    if Path(segment[0]).name == "kcap":
        return segment[1:]
    for i in range(len(segment) - 1):
        if segment[i] == "-m" and segment[i + 1] == "kcap":
            return segment[i + 2:]
    return None


def readme_kcap_commands() -> list[tuple[int, list[str]]]:
    """(README line, kcap arguments) of every kcap command in the README's bash blocks."""
    found = []
    for lang, start, body in fenced_blocks(README.read_text()):
        if lang not in ("bash", "sh", "shell"):
            continue
        for offset, line in enumerate(body.replace("\\\n", " ").splitlines()):
            for segment in shell_segments(line):
                argv = kcap_argv(segment)
                if argv is not None:
                    found.append((start + offset, argv))
    return found


def kernel_inputs() -> dict:
    """Small inputs for the kernel calls whose inputs the README leaves to the reader:
    q (B, H, T, D), k/v (B, KV, S, D) with grouped-query heads, x (M, K) and MLP weights,
    hidden states h (N, D) with an LM head (V, D) and targets (N,), and three models' of
    them stacked (hs, ws, ts)."""
    import torch

    cuda = torch.cuda.is_available()  # without a GPU, conftest runs Triton's interpreter
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    return {"q": randn(1, 4, 16, 32), "k": randn(1, 2, 16, 32), "v": randn(1, 2, 16, 32),
            "x": randn(8, 32), "w_up": randn(64, 32), "w_gate": randn(64, 32),
            "w_down": randn(32, 64), "h": randn(8, 32), "w_head": randn(50, 32),
            "targets": torch.randint(0, 50, (8,), generator=g).to(device),
            "hs": randn(3, 8, 32), "ws": randn(3, 50, 32),
            "ts": torch.randint(0, 50, (3, 8), generator=g).to(device)}


# Kernel blocks show call signatures and leave their tensors to the reader; the test supplies
# them (only to blocks that import kcap.kernels) so that the calls still run as written.
GIVEN_INPUTS = {"kcap.kernels": kernel_inputs}

PYTHON_BLOCKS = [(start, body) for lang, start, body in fenced_blocks(README.read_text())
                 if lang == "python"]


def test_readme_has_python_examples_of_the_whole_workflow():
    code = "".join(body for _, body in PYTHON_BLOCKS)
    for call in ("BioS(", "train(", "load_run(", "evaluate_checkpoint(", "evaluate_capacity(",
                 ".summary()"):
        assert call in code, f"README.md: no python example calls {call}"


@pytest.mark.parametrize("start,code", PYTHON_BLOCKS, ids=[f"line{s}" for s, _ in PYTHON_BLOCKS])
def test_python_block_runs(start, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever the example writes stays in the test's folder
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    namespace = {"__name__": "__readme__"}
    for module, make in GIVEN_INPUTS.items():
        if re.search(rf"^\s*(from|import) {re.escape(module)}\b", code, re.M):
            namespace.update(make())
    # The examples' models are tiny: one thread runs them as fast, and several times faster
    # than two when other processes share the cores (OpenMP threads wait for each other).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Padding with blank lines makes a traceback name the README's own line numbers.
        exec(compile("\n" * (start - 1) + code, str(README), "exec"), namespace)
    finally:
        torch.set_num_threads(threads)


KCAP_COMMANDS = readme_kcap_commands()


def test_readme_shows_kcap_commands():
    assert {argv[0] for _, argv in KCAP_COMMANDS if argv} >= {"demo", "train", "eval", "quantize",
                                                              "data"}


@pytest.mark.parametrize("line,argv", KCAP_COMMANDS, ids=[f"line{n}" for n, _ in KCAP_COMMANDS])
def test_kcap_command_parses_and_its_configs_exist(line, argv):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"README.md line {line}: `kcap {shlex.join(argv)}` does not parse: "
                    f"{err.getvalue().strip().splitlines()[-1]}")
    for token in argv:
        if token.endswith(".toml"):
            assert (ROOT / token).is_file(), f"README.md line {line}: {token} does not exist"
    if args.command == "train" and not PLACEHOLDER_RE.fullmatch(args.config):
        assert args.config.endswith(".toml"), \
            f"README.md line {line}: kcap train needs a .toml config, got {args.config!r}"


@pytest.mark.parametrize("marker,expected", [("kcap:main-command", "kcap demo"),
                                             ("kcap:test-command", "pytest")])
def test_marked_command_is_where_ci_reads_it(marker, expected):
    lines = README.read_text().splitlines()
    at = [i for i, line in enumerate(lines) if line.strip() == f"<!-- {marker} -->"]
    assert len(at) == 1, f"README.md must hold <!-- {marker} --> exactly once, found {len(at)}"
    block = lines[at[0] + 1:at[0] + 4]
    assert len(block) == 3 and block[0] == "```bash" and block[2] == "```", \
        f"README.md: <!-- {marker} --> must be followed by a one-line ```bash block"
    assert expected in block[1], f"README.md: the {marker} must run `{expected}`, got {block[1]!r}"
