"""The documentation cannot drift from the code.

- Every ```python block of every page in docs/ runs: the blocks of a page run in order in one
  namespace (a later block uses the names of earlier ones), in a temporary working directory,
  each block its own test. A block may be marked, by an HTML comment on the line right before
  it, with ``<!-- no-run: reason -->`` (only for blocks that need a GPU or the network) or
  ``<!-- requires: matplotlib -->`` / ``<!-- requires: g++ -->`` (skipped, with the reason, when
  that is missing here).
- The site builds with ``mkdocs build --strict``: a warning (a broken link or anchor, a page not
  in the nav, a missing image) fails it.
- docs/api.md documents every name of ``minicnn.__all__``, and each public class and function
  there has a docstring of its own.
- tools/make_figures.py draws every figure of docs/img/.
"""
import importlib.util
import inspect
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import minicnn
from minicnn import backend

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))

# an optional marker comment, then a fenced python block; both start at the beginning of a line
_BLOCK = re.compile(r"(?:^<!--\s*([\w-]+)\s*:\s*(.*?)\s*-->[ \t]*\n)?^```python[ \t]*\n(.*?)^```",
                    re.M | re.S)
_REQUIREMENTS = {
    "matplotlib": lambda: importlib.util.find_spec("matplotlib") is not None,
    "g++": lambda: _emulator_available(),
    "onnx": lambda: all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime")),
}


def _emulator_available():
    from minicnn.testing import emulator
    return emulator.available()


@dataclass
class Block:
    page: str
    index: int
    line: int
    code: str
    marker: str = None
    argument: str = None


def blocks_of(page):
    text = (DOCS / page).read_text()
    found = []
    for k, m in enumerate(_BLOCK.finditer(text)):
        line = text.count("\n", 0, m.start(3))
        found.append(Block(page, k, line, m.group(3), m.group(1), m.group(2)))
    return found


BLOCKS = {page: blocks_of(page) for page in PAGES}
CASES = [(page, b.index) for page in PAGES for b in BLOCKS[page]]


@dataclass
class PageRun:
    """The state of one page's run: its namespace, working directory, the next block to run,
    minicnn's generator and default dtype as the last block left them, and the first failure."""
    workdir: Path
    namespace: dict = field(default_factory=lambda: {"__name__": "__docs__"})
    next: int = 0
    state: tuple = None
    failed: str = None


_RUNS = {}


def _skip_reason(block):
    if block.marker is None:
        return None
    if block.marker == "no-run":
        return f"{block.page} block {block.index} (line {block.line}): {block.argument}"
    if block.marker == "requires":
        return (None if _REQUIREMENTS[block.argument]() else
                f"{block.page} block {block.index} (line {block.line}) needs {block.argument}, "
                "which is not installed here")
    raise AssertionError(f"unknown marker {block.marker!r}")


def _execute(run, block):
    """Run one block in the page's namespace, minicnn's global state carried from the block before."""
    if run.state is not None:
        backend._rng, backend._default_dtype = run.state
    try:
        exec(compile(block.code, f"docs/{block.page}:{block.line}", "exec"), run.namespace)
    except BaseException:
        run.failed = f"block {block.index} (line {block.line})"
        raise
    finally:
        run.state = (backend._rng, backend._default_dtype)


@pytest.mark.parametrize("page,index", CASES, ids=[f"{p}:{i}" for p, i in CASES])
def test_python_block_runs(page, index, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    if page not in _RUNS:
        _RUNS[page] = PageRun(tmp_path_factory.mktemp(re.sub(r"\W", "_", page)))
    run = _RUNS[page]
    monkeypatch.chdir(run.workdir)
    blocks = BLOCKS[page]
    # The blocks before this one run first, when they have not (a block selected with -k).
    while run.failed is None and run.next < index:
        earlier = blocks[run.next]
        run.next += 1
        if _skip_reason(earlier) is None:
            _execute(run, earlier)
    if run.failed is not None:
        pytest.skip(f"{page}: an earlier block failed, {run.failed}")
    block = blocks[index]
    run.next = index + 1
    reason = _skip_reason(block)
    if reason is not None:
        pytest.skip(reason)
    _execute(run, block)


def test_markers_are_known_and_no_run_is_rare():
    """no-run is for blocks that need a GPU or the network; requires names a known requirement."""
    for page in PAGES:
        text = (DOCS / page).read_text()
        assert len(BLOCKS[page]) == len(re.findall(r"^```python", text, re.M)), \
            f"{page}: a ```python fence that is not at the start of a line is never run"
        for b in BLOCKS[page]:
            where = f"{page} line {b.line}"
            if b.marker == "no-run":
                assert re.search(r"GPU|CUDA|network|internet", b.argument), \
                    f"{where}: no-run is only for blocks needing a GPU or the network: {b.argument}"
            elif b.marker == "requires":
                assert b.argument in _REQUIREMENTS, f"{where}: unknown requirement {b.argument!r}"
            else:
                assert b.marker is None, f"{where}: unknown marker {b.marker!r}"
        stray = re.findall(r"<!--\s*(no-run|requires)\s*:.*?-->\s*\n(?!```python)", text)
        assert not stray, f"{page}: a marker comment not right before a ```python block"


def test_kernel_listings_match_the_source():
    """A ```cpp listing of a kernel in the docs is a verbatim piece of a kernels/*.cu file."""
    sources = "\n".join(p.read_text() for p in (ROOT / "kernels").glob("*.cu"))
    checked = 0
    for page in PAGES:
        for listing in re.findall(r"^```cpp\n(.*?)^```", (DOCS / page).read_text(), re.M | re.S):
            assert listing in sources, f"{page}: a kernel listing differs from kernels/*.cu"
            checked += 1
    assert checked, "no kernel listing found in docs/ (kernels.md shows im2col)"


def test_site_builds_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]' or '.[test]')")
    site = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                            "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stdout}{build.stderr}"
    assert "WARNING" not in build.stderr, build.stderr
    for page in PAGES:
        html = "index.html" if page == "index.md" else page[:-3] + "/index.html"
        assert (site / html).is_file(), f"{page} was not built into {html}"
    for image in (DOCS / "img").glob("*.png"):
        assert (site / "img" / image.name).is_file()


def _documented_names(text):
    return set(re.findall(r"^#+ .*\{#([\w.]+)\}\s*$", text, re.M))


def test_api_reference_documents_every_public_name():
    text = (DOCS / "api.md").read_text()
    documented = _documented_names(text)
    missing = [n for n in minicnn.__all__ if n not in documented]
    assert not missing, (f"docs/api.md lacks {missing}; run python tools/make_api.py")
    gone = [n for n in documented if "." not in n and not n.startswith("sec-")
            and n not in minicnn.__all__]
    assert not gone, f"docs/api.md documents {gone}, not in minicnn.__all__ any more; " \
                     "run python tools/make_api.py"


def test_public_names_have_docstrings():
    undocumented = []
    for name in minicnn.__all__:
        obj = getattr(minicnn, name)
        if inspect.isclass(obj):
            doc = obj.__dict__.get("__doc__")     # its own, not a base class's
        elif callable(obj):
            doc = obj.__doc__
        else:
            continue                              # a constant
        if not (doc or "").strip():
            undocumented.append(name)
    assert not undocumented, f"public names without a docstring: {undocumented}"


def test_api_generator_covers_the_same_names():
    spec = importlib.util.spec_from_file_location("make_api", ROOT / "tools" / "make_api.py")
    make_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_api)
    generated = _documented_names(make_api.render())
    committed = _documented_names((DOCS / "api.md").read_text())
    assert generated == committed, (f"docs/api.md is out of date (names added "
                                    f"{sorted(generated - committed)}, removed "
                                    f"{sorted(committed - generated)}); run python tools/make_api.py")


def test_figures_are_drawn_by_the_script(tmp_path):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed (pip install -e '.[plot]')")
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "make_figures.py"), "--out",
                          str(tmp_path)], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    drawn = {p.name for p in tmp_path.glob("*.png")}
    committed = {p.name for p in (DOCS / "img").glob("*.png")}
    assert drawn == committed, f"drawn {sorted(drawn)}, in docs/img {sorted(committed)}"
    referenced = set()
    for page in PAGES:
        referenced |= set(re.findall(r"\(img/([\w.-]+\.png)\)", (DOCS / page).read_text()))
    assert referenced <= committed, f"pages show images that are not drawn: {referenced - committed}"


def test_benchmark_numbers_name_their_machine():
    """The measured numbers in benchmarks.md say when, where and how they were taken."""
    text = (DOCS / "benchmarks.md").read_text()
    for fact in ("python benchmarks/train.py --batch-sizes", "2 cores", "NumPy", "PyTorch",
                 "commit `"):
        assert fact in text, f"docs/benchmarks.md does not say {fact!r}"
    assert re.search(r"20\d\d-\d\d-\d\d", text), "docs/benchmarks.md gives no date"

