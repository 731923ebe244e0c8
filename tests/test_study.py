"""The study: matched-accuracy selection, summaries, the plot, and a tiny end-to-end run."""

import json

import pytest
import torch

from packkv import PackKVConfig
from packkv.baselines import kivi
from packkv.harness import EvalResult
from packkv.study import matched_comparison, plot_pareto, run_study, summarize


def _row(method, family, k, v, delta):
    return {"method": method, "family": family, "k_ratio": k, "v_ratio": v, "total_ratio": 2 / (1 / k + 1 / v), "ppl_delta": delta}


def test_matched_picks_best_ratio_at_equal_or_smaller_delta():
    rows = [
        _row("kivi-2", "kivi", 5.33, 5.33, 5.0),
        _row("kivi-4", "kivi", 3.2, 3.2, 0.0),
        _row("a", "packkv", 4.0, 6.0, 1.0),
        _row("b", "packkv", 8.0, 8.0, 5.0),  # equal delta counts
        _row("c", "packkv", 9.0, 9.0, 6.0),  # less accurate: never chosen for kivi-2
    ]
    out = {m["baseline"]: m for m in matched_comparison(rows, ("kivi-2", "kivi-4"))}
    assert out["kivi-2"]["packkv"] == "b"
    assert out["kivi-2"]["k_improvement_pct"] == pytest.approx(100 * (8.0 / 5.33 - 1))
    assert out["kivi-4"]["packkv"] is None


def test_summarize_ratios_and_agreement():
    ref = EvalResult(torch.tensor([1.0, 2.0], dtype=torch.float64), torch.zeros(2, 4, dtype=torch.int64), 0, 0, 0, 0)
    res = EvalResult(torch.tensor([1.1, 2.0], dtype=torch.float64), torch.tensor([[0, 0, 0, 1], [0, 0, 0, 0]]), 300, 600, 1600, 1600)
    row = summarize(res, ref, kivi(2))
    assert (row["k_ratio"], row["v_ratio"], row["total_ratio"]) == pytest.approx((16 / 3, 8 / 3, 32 / 9))
    assert row["top1_agreement"] == pytest.approx(7 / 8)
    assert row["ppl_delta"] == pytest.approx(torch.tensor(1.55).exp().item() - torch.tensor(1.5).exp().item())


def test_plot_writes_png(tmp_path):
    rows = [_row("kivi-2", "kivi", 5.3, 5.3, 5.0), _row("a", "packkv", 4.0, 6.0, 1.0), _row("b", "packkv", 6.0, 7.0, 3.0)]
    plot_pareto(rows, tmp_path / "p.png", "test")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_run_study_end_to_end(tmp_path):
    res = run_study("smollm2", "default", 256, 2, tmp_path, packkv_configs=[PackKVConfig(k_rel=0.2, v_rel=0.4, repack="median")],
                    baselines=["kivi-2"], buffer_size=64, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["methods"] == res["methods"] and (tmp_path / "pareto.png").exists()
    assert [m["method"] for m in saved["methods"]][:2] == ["fp16", "kivi-2"]
    packkv = saved["methods"][2]
    assert packkv["k_ratio"] > 2 and packkv["ppl_delta"] > 0 and 0 < packkv["top1_agreement"] < 1
    for key in ("k_ratio", "v_ratio", "total_ratio", "ppl", "ppl_delta", "top1_agreement", "ppl_delta_std", "top1_agreement_std"):
        assert key in packkv
    assert saved["matched"][0]["baseline"] == "kivi-2"


def test_run_study_rejects_short_windows(tmp_path):
    with pytest.raises(ValueError, match="tokens must exceed"):
        run_study("smollm2", "default", 128, 2, tmp_path)
