"""benchmarks/projection_bench.py: the smoke run on the CPU writes a complete JSON and the table; bad flags get a
clear error, not a traceback."""

import json

import pytest

from tests.scripts import load_script


def _bench():
    return load_script("benchmarks/projection_bench.py")


def test_smoke_writes_every_gemm_separate_and_fused(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert _bench().main(["--smoke", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "projection" and doc["device"]["platform"] == "cpu" and doc["date"]
    assert [r["gemm"] for r in doc["rows"]] == ["qkv", "o", "gate_up", "down"] * 2
    tiny = doc["rows"][0]
    assert tiny["k"] == 64 and tiny["n"] == [64, 32, 32]  # tiny: 4 heads, 2 KV heads, head_dim 16, hidden 64
    for r in doc["rows"]:
        assert r["separate_s"] > 0 and r["flops"] == 2.0 * r["rows"] * r["k"] * sum(r["n"])
        assert (r["fused_s"] is not None) == (len(r["n"]) > 1)
    assert set(doc["per_layer"]) == {"96", "200"}
    text = capsys.readouterr().out
    assert "qkv" in text and "gate_up" in text and "saved" in text and str(out) in text


@pytest.mark.parametrize("flags", [["--rows", "0"], ["--rows", "x"], ["--repeats", "0"]])
def test_bad_flags_name_the_flag(flags, capsys):
    with pytest.raises(SystemExit) as e:
        _bench().main(["--model", "tiny", *flags])
    assert e.value.code == 2
    assert flags[0] in capsys.readouterr().err
