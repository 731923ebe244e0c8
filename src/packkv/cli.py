"""The ``packkv`` command: one entry point, a subcommand per job.

The CLI holds no logic the library lacks: each subcommand parses flags, calls one library
function and prints its result. Errors a user can cause end as one line on stderr and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

EXIT_USAGE = 2

# The benchmark scripts `packkv bench` runs, in order; each prints its own table.
BENCHMARKS = ("bench_attention.py", "bench_encode.py", "bench_generate.py")


class UserError(Exception):
    """A problem the user can fix; printed as one line."""


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        raise UserError("packkv bench needs an NVIDIA GPU with CUDA; none is visible (torch.cuda.is_available() is False)")
    root = Path(__file__).resolve().parents[2] / "benchmarks"
    scripts = [root / name for name in BENCHMARKS if (root / name).exists()]
    if not scripts:
        raise UserError(f"no benchmark scripts found under {root} (they ship with the source tree, not the wheel)")
    env = dict(os.environ, PYTHONPATH=str(root.parent / "src"))
    for script in scripts:
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
        print(f"$ {' '.join(cmd)}", flush=True)
        code = subprocess.call(cmd, env=env)
        if code:
            return code
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run the GPU benchmark scripts (needs an NVIDIA GPU)",
                       description="Run benchmarks/bench_*.py one after the other; each prints a table.")
    p.add_argument("--quick", action="store_true", help="short runs (smaller shapes, fewer repeats)")
    p.set_defaults(func=_cmd_bench)


# Each entry registers one subcommand on the parser.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="packkv",
        description="Compress the KV cache of LLMs (PackKV) and measure memory, accuracy and speed.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in SUBCOMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("packkv: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, TypeError, OSError, ImportError, NotImplementedError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"packkv {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
