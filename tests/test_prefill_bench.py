"""`benchmarks/prefill_bench.py --smoke`: the same benchmark code on the tiny config over the 4 fake CPU devices
(conftest) writes valid JSON with every strategy measured, replayed and run for real, projections labelled."""

import json
import math

from tests.scripts import load_script


def _load_bench():
    return load_script("benchmarks/prefill_bench.py")


def test_smoke_writes_valid_json(tmp_path, capsys):
    bench = _load_bench()
    out = tmp_path / "prefill_smoke.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "PROJECTED" in printed and "smoke ok" in printed
    doc = json.loads(out.read_text())
    assert doc["status"] == "complete" and doc["device"]["count"] == 4 and doc["jax_version"]
    assert doc["comm_model"]["source"].startswith("measured")  # >= 2 devices: bandwidth measured, not assumed
    rows = [r for r in doc["rows"] if "model_depth" in r]
    from apb_jax import strategies

    assert {r["strategy"] for r in rows} == set(strategies.names())
    for r in rows:
        m = r["measured"]
        assert len(m["doc_prefill_runs_s"]) == 3 and m["doc_prefill_s"] > 0 and m["query_s"] > 0
        assert m["compile_doc_s"] > 0 and m["logits_finite"]
        assert r["flops"]["doc"]["total"] > 0 and math.isfinite(r["model_depth"]["doc_tflops"])
        if r["hosts"] > 1:
            assert r["projected"]["label"] == "projected" and r["replayed_host"] == r["hosts"] - 1
            assert r["projected"]["prefill_s"] >= r["model_depth"]["prefill_s"]
            assert r["projected"]["speedup_vs_full"] > 0
    real = {r["strategy"] for r in doc["rows"] if r.get("mode", "").startswith("real mesh")}
    assert {"apb", "star", "ring"} <= real
    assert out.with_suffix(".png").stat().st_size > 1000
    assert set(doc["targets"]) >= {"apb_vs_full_128K_H4", "ring_vs_ideal_128K_H4", "apb_vs_star_128K_H4"}


def test_flop_counts_match_the_spec_baseline():
    """The useful-FLOP count reproduces the 602 TFLOP/s quoted for the plain JAX + cuDNN Llama-3.1-8B prefill
    (1.23 s at 32K)."""
    bench = _load_bench()
    from apb_jax.bench.prefill import host_flops
    from apb_jax.strategies import get, make_layout
    from apb_jax.strategies.base import linear_flops_per_row

    cfg = bench.model_config("llama3.1-8b")
    t = 32768
    lay = make_layout("full", 1, t, 1)
    per_layer = t * linear_flops_per_row(cfg) + 4 * 128 * 32 * t * (t + 1) / 2
    assert abs(32 * per_layer / 1.23 / 1e12 - 602) < 5  # the quoted count: every layer whole
    # ours: the document prefill's last layer only makes its k/v (the cache needs nothing else)
    fl = host_flops(cfg, lay, 0, cfg.num_layers, "query_aware")["total"]
    assert fl == 31 * per_layer + t * 2 * 4096 * 2 * 8 * 128
    apb = make_layout("apb", 4, 131072, 64)
    pairs = get("apb").attention_pairs(apb, 3)
    a, b, p = apb.anchor, apb.block, apb.passing
    assert (a, b, p) == (4096, 32768, 2048)
    assert pairs == a * (a + 1) / 2 + b * (3 * p + a) + b * (b + 1) / 2
    ring = make_layout("ring", 4, 131072, 64)
    assert get("ring").attention_pairs(ring, 3) == b * (b + 1) / 2 + 3 * b * b
