"""The notebooks of notebooks/ are what tools/make_notebooks.py writes, share their code with the
docs pages verbatim, carry no outputs, and open on Colab with an install cell the tests skip.

nbmake runs the notebooks themselves (``testpaths`` in pyproject.toml; tests/conftest.py turns
nbmake on when it is installed).
"""
import importlib.util
import re
from pathlib import Path

import pytest
from test_docs import blocks_of

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

nbformat = pytest.importorskip("nbformat", reason="the notebook checks need nbformat "
                                                  "(pip install -e '.[test]', with nbmake)")


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks",
                                                  ROOT / "tools" / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _docs_blocks(page):
    """The ```python blocks of docs/<page> that run without a GPU, as tests/test_docs.py reads
    them (a ``no-run`` block would fail under nbmake on a CPU)."""
    return [b.code.strip("\n") for b in blocks_of(page.removeprefix("docs/"))
            if b.marker != "no-run"]


def test_nbmake_runs_the_notebooks(pytestconfig):
    if not pytestconfig.pluginmanager.hasplugin("nbmake"):
        pytest.skip("nbmake is not installed, so the notebooks did not run: pip install -e '.[test]'")
    assert pytestconfig.option.nbmake


def test_the_three_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == ["01_tutorial.ipynb", "02_cpu_vs_gpu.ipynb",
                                           "03_look_inside.ipynb"]


def test_committed_notebooks_are_what_the_script_writes():
    """A docs block changed without running tools/make_notebooks.py fails here."""
    make = _generator()
    written = dict(make.render(m) for m in make.NOTEBOOKS)
    assert sorted(written) == [p.name for p in NOTEBOOKS]
    stale = [p.name for p in NOTEBOOKS if p.read_text(encoding="utf-8") != written[p.name]]
    assert not stale, f"{stale} differ from what tools/make_notebooks.py writes; run it"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_cells_shared_with_the_docs_are_identical(path):
    nb = nbformat.read(path, as_version=4)
    shared = [c for c in nb.cells if "minicnn" in c.metadata]
    assert shared, f"{path.name} shares no code with the docs"
    for cell in shared:
        page = cell.metadata["minicnn"]["from"]
        assert cell.source in _docs_blocks(page), \
            f"{path.name} cell {cell.id} differs from every python block of {page}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_no_outputs_a_colab_badge_an_install_cell_and_doctor(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    title = nb.cells[0]
    assert title.cell_type == "markdown" and title.source.startswith("# ")
    badge = re.search(r"\(https://colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)"
                      r"/blob/main/notebooks/([\w.-]+)\)", title.source)
    assert badge and badge.group(2) == path.name
    install, doctor = code[0], code[1]
    assert install.metadata.get("tags") == ["skip-execution"]
    assert f"https://github.com/{badge.group(1)}" in install.source
    assert re.search(r"^!pip install .*git\+", install.source, re.M)
    assert not re.search(r"(numpy|cupy)\S*[=<>~]", install.source, re.I), "no version pins"
    assert "-m minicnn doctor" in doctor.source and "Runtime > Change runtime type" in \
        doctor.source
    assert not any("skip-execution" in c.metadata.get("tags", []) for c in code[1:])
    assert "MINICNN_NOTEBOOK_SMALL" in "".join(c.source for c in code)
    assert nb.metadata.kernelspec.name == "python3"
