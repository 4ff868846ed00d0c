"""The notebooks under notebooks/ run top to bottom with nbclient on the CPU (4 fake devices), each in a temporary
copy (`notebooks/execute.py`), and their outputs are clean: no error, nothing on stderr (no warning spam), PNG
figures, a computed conclusion printed by the last cell, under 1 MiB.  The committed copies must carry their outputs.

Missing nbclient / nbformat / ipykernel / matplotlib fail these tests (they do not skip): install the `notebooks`
extra, `pip install -e ".[notebooks]"`.
"""

import importlib.util
import json
import shutil

import pytest

from tests.scripts import ROOT, load_script

NOTEBOOK_DIR = ROOT / "notebooks"
EXPECTED = ("01_quickstart", "02_anatomy_of_apb", "03_accuracy_vs_budget", "04_speed")
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
REQUIRED = ("nbclient", "nbformat", "ipykernel", "matplotlib")
CELL_TIMEOUT_S = 600
MAX_BYTES = 1 << 20


def _require_jupyter():
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(
            f"the notebook tests need {', '.join(missing)}, which are not installed: install the notebooks extra "
            f'(pip install -e ".[notebooks]")',
            pytrace=False,
        )


def _code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _text(output: dict) -> str:
    if output["output_type"] == "stream":
        return "".join(output["text"])
    data = output.get("data", {})
    return "".join(data.get("text/markdown", data.get("text/plain", "")))


def _problems(nb: dict) -> list[str]:
    """What is wrong with an executed notebook's outputs (empty when clean)."""
    out = []
    cells = _code_cells(nb)
    for i, c in enumerate(cells):
        if c.get("execution_count") is None:
            out.append(f"code cell {i} was not executed")
        for o in c.get("outputs", []):
            if o["output_type"] == "error":
                out.append(f"code cell {i} raised {o['ename']}: {o['evalue'][:200]}")
            elif o["output_type"] == "stream" and o["name"] == "stderr":
                out.append(f"code cell {i} wrote to stderr: {_text(o)[:300]!r}")
            elif o.get("data") and any(k.startswith("image/") and k != "image/png" for k in o["data"]):
                out.append(f"code cell {i} has a non-PNG figure: {sorted(o['data'])}")
    counts = [c.get("execution_count") for c in cells]
    if counts != list(range(1, len(cells) + 1)):
        out.append(f"cells were not run top to bottom once: execution counts {counts}")
    last = "".join(_text(o) for o in cells[-1].get("outputs", [])) if cells else ""
    if len(last.strip()) < 40:
        out.append(f"the last cell prints no conclusion: {last!r}")
    if not nb["cells"] or nb["cells"][0]["cell_type"] != "markdown":
        out.append("the notebook does not open with a markdown cell saying what it shows")
    return out


def test_the_four_notebooks_are_there():
    assert tuple(p.stem for p in NOTEBOOKS) == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_clean_outputs(path):
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size} bytes, over 1 MiB"
    nb = json.loads(path.read_text())
    assert not _problems(nb), _problems(nb)
    if path.stem != "01_quickstart":
        pngs = [o for c in _code_cells(nb) for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
        assert pngs, f"{path.name} was committed without its figures"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    _require_jupyter()
    execute = load_script("notebooks/execute.py")
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    for c in (nb := json.loads(copy.read_text()))["cells"]:  # run from a blank copy: no stale output can pass
        if c["cell_type"] == "code":
            c["outputs"], c["execution_count"] = [], None
    copy.write_text(json.dumps(nb))
    nb, seconds = execute.execute(copy, copy, timeout=CELL_TIMEOUT_S, cwd=tmp_path)
    print(f"{path.name}: {seconds:.1f} s")
    executed = json.loads(copy.read_text())
    assert not _problems(executed), _problems(executed)
    assert copy.stat().st_size < MAX_BYTES, f"{path.name} executed is {copy.stat().st_size} bytes, over 1 MiB"
    text = "\n".join(_text(o) for c in _code_cells(executed) for o in c.get("outputs", []))
    assert "nan%" not in text.lower() and "nanx" not in text.lower(), "a computed number came out NaN"
    if path.stem == "01_quickstart":
        assert "4 of 4 strategies answered the passkey correctly" in text, text[-2000:]
    if path.stem == "02_anatomy_of_apb":  # the kept-positions section runs on Engine.kept_positions
        assert "kept-positions analysis did not run" not in text
        assert "(layer, KV head) pairs keeping a needle token" in text
