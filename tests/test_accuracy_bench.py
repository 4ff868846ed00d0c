"""`benchmarks/accuracy_bench.py --smoke` on the 4 fake CPU devices (conftest): valid JSON, ring answers exactly as
full does, a printed table; --from-json merges runs; the random stand-in is refused without --allow-random."""

import json

import pytest

from tests.scripts import load_script


def _load_bench():
    return load_script("benchmarks/accuracy_bench.py")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    bench = _load_bench()
    out = tmp_path_factory.mktemp("acc") / "accuracy_smoke.json"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = bench.main(["--smoke", "--out", str(out)])
    return bench, rc, out, buf.getvalue()


def test_smoke_json_table_and_ring_equals_full(smoke):
    _bench, rc, out, printed = smoke
    assert rc == 0, printed[-3000:]
    assert "smoke ok" in printed and "accuracy %" in printed and "ring vs full: 0 differing answers" in printed
    doc = json.loads(out.read_text())
    assert doc["status"] == "complete" and doc["benchmark"] == "accuracy" and doc["jax_version"]
    assert doc["device"]["count"] == 4 and doc["argv"][0] == "--smoke"
    assert doc["model"]["layers"] >= 1 and doc["model"]["params"] > 0
    cells = [c for c in doc["cells"] if not c.get("skipped")]
    labels = {c["label"] for c in cells}
    assert labels == {"full", "ring H=4", "star H=2", "apb-qa H=4"}
    assert {(c["task"], c["length"]) for c in cells} == {("variable_tracking", 256), ("variable_tracking", 512)}
    by = {(c["task"], c["length"], c["label"]): c for c in cells}
    for c in cells:
        assert not c.get("error"), c.get("error")
        assert c["n"] == 4 and len(c["predictions"]) == 4 and len(c["truth"]) == 4
        assert 0.0 <= c["accuracy"] <= 1.0 and c["correct"] == round(c["accuracy"] * 4)
        assert c["prefill_s"] > 0 and c["wall_s"] > 0 and c["compile_s"] >= 0
        if c["label"] != "full":
            assert c["mode"] == "mesh" and c["layout"]["block"] == c["length"] // c["hosts"]
        if c["label"].startswith("ring"):  # ring attention is exact: the same answers as full, token for token
            assert c["predictions"] == by[(c["task"], c["length"], "full")]["predictions"]
    ring = [d for d in doc["disagreements"] if d["label"].startswith("ring")]
    assert len(ring) == 2 and all(d["count"] == 0 and d["compared"] == 4 for d in ring)
    assert doc["targets"]["ring_equals_full"]["met"] is True
    assert out.with_suffix(".png").stat().st_size > 1000


def test_from_json_merges_runs(smoke, tmp_path, capsys):
    bench, _rc, out, _ = smoke
    doc = json.loads(out.read_text())
    other = dict(doc, device={**doc["device"], "name": "other device"})
    other["cells"] = [dict(c, length=1024, device="other device") for c in doc["cells"] if c["length"] == 256]
    b = tmp_path / "b.json"
    b.write_text(json.dumps(other))
    merged = tmp_path / "merged.json"
    assert bench.main(["--from-json", f"{out},{b}", "--out", str(merged), "--no-plot"]) == 0
    m = json.loads(merged.read_text())
    assert {c["length"] for c in m["cells"]} == {256, 512, 1024}
    assert set(m["devices"]) == {"cpu", "other device"} and len(m["merged_from"]) == 2
    assert len(m["disagreements"]) == 3 * 3  # lengths x (ring, star, apb)
    one = {c["label"]: c["device"] for c in m["cells"] if c["length"] == 1024}
    assert set(one.values()) == {"other device"}
    assert "1024" in capsys.readouterr().out


def test_from_json_status_follows_the_merged_cells(smoke, tmp_path):
    """A run cut by its time budget, merged with a run that has the missing cell, is complete; alone it is not."""
    bench, _rc, out, _ = smoke
    doc = json.loads(out.read_text())
    cut = dict(doc, status="partial")
    cut["cells"] = [dict(c) for c in doc["cells"]]
    cut["cells"][0] = {k: v for k, v in cut["cells"][0].items() if k not in ("accuracy", "correct")}
    cut["cells"][0].update(skipped="time budget", n=0)
    cut["cells"][1] = dict(cut["cells"][1], partial="time budget reached", n=cut["cells"][1]["n"] - 1)
    a = tmp_path / "cut.json"
    a.write_text(json.dumps(cut))
    for files, want in (([a], "partial"), ([a, out], "complete")):
        merged = tmp_path / "merged.json"
        assert bench.main(["--from-json", ",".join(map(str, files)), "--out", str(merged), "--no-plot"]) == 0
        assert json.loads(merged.read_text())["status"] == want, files


def test_missing_heads_skip_with_a_note(tmp_path):
    bench = _load_bench()
    args = bench.parse_args(["--columns", "full,apb-qa:4,apb-rh:4,apb-rh:2"])
    grid, missing, notes = bench.runnable(bench.configs(args), tmp_path / "none.safetensors")
    assert [c.label for c in grid] == ["full", "apb-qa H=4"]
    assert [c.label for c in missing] == ["apb-rh H=4", "apb-rh H=2"]
    assert "apb-rh skipped" in notes[0] and "none.safetensors" in notes[0]
    heads = tmp_path / "h.safetensors"
    heads.write_bytes(b"x")
    assert bench.runnable(bench.configs(args), heads)[1] == []


def test_random_model_is_refused_without_allow_random(tmp_path, monkeypatch):
    bench = _load_bench()
    import apb_jax.demo

    monkeypatch.setattr(apb_jax.demo, "ASSET", tmp_path)  # no shipped retriever here
    with pytest.raises(SystemExit, match="--allow-random"):
        bench.load_model(bench.parse_args([]))
    _model, info = bench.load_model(bench.parse_args(["--allow-random"]))
    assert info["trained"] is False and "random" in info["source"]
