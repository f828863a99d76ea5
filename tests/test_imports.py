"""The import graph of minicnn, and what importing it does.

The graph runs one way (backend, errors, kernel loader, ops, module, layers, then the fast path)
with no cycle. It is read from the source with ``ast``: every import statement, those inside
functions too (they run as soon as the function does), relative imports resolved, ``from P import
x`` meaning the submodule P.x when there is one and P otherwise. Importing P.Q.R also runs the
package P.Q when it is not the importer's own, so that is an edge too.
"""
import ast
import importlib
import inspect
import json
import os
import subprocess
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pytest

import minicnn
import minicnn.errors

ROOT = Path(__file__).resolve().parents[1]

FAST_PATH = "minicnn.fused"
# Above both tiers: the package itself (it re-exports both), the command line and the commands it
# runs (selftest checks the fast path against the reference; doctor reports on every kernel), and
# fit, the one call where a user asks for the recorded CUDA-graph step. No plain module imports them.
# minicnn.onnx exports fused models too, so it reaches the fast path
ENTRY_POINTS = {"minicnn", "minicnn.__main__", "minicnn.selftest", "minicnn.doctor", "minicnn.train",
                "minicnn.onnx"}


def _modules(root):
    """{module name: (path, is a package)} for every .py file under root/minicnn/."""
    found = {}
    for path in sorted((root / "minicnn").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        found[".".join(parts)] = (path, is_package)
    return found


def _targets(modules, name, is_package, node):
    """The modules one import statement of module ``name`` names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module
    return [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
            for alias in node.names]


def import_graph(root=ROOT):
    """{importer: {imported: (file, line) of its first import}} over the modules of minicnn."""
    modules, graph = _modules(root), {}
    for name, (path, is_package) in modules.items():
        edges = graph.setdefault(name, {})
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(modules, name, is_package, node):
                parts = target.split(".")
                # the target, and the packages on the way to it that are not the importer's own
                steps = [".".join(parts[:i]) for i in range(1, len(parts))]
                for step in [s for s in steps if s not in own] + [target]:
                    if step in modules:
                        edges.setdefault(step, (path.relative_to(root), node.lineno))
    return graph


def _cycles(graph):
    """The strongly connected components of more than one module (Tarjan), sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _shortest_path(graph, start, goal):
    """The shortest import chain from ``start`` to package ``goal`` or a module in it, or None."""
    came_from, queue = {start: None}, deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v]):
            if w in came_from:
                continue
            came_from[w] = v
            if w == goal or w.startswith(goal + "."):
                path = [w]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return path[::-1]
            queue.append(w)
    return None


def _edge(graph, a, b):
    return f"      {a} -> {b}  ({graph[a][b][0]}:{graph[a][b][1]})"


def _chain(graph, path):
    return "\n".join(_edge(graph, a, b) for a, b in zip(path, path[1:]))


def _is_plain(name):
    return not (name in ENTRY_POINTS or name == FAST_PATH or name.startswith(FAST_PATH + ".")
                or name == "minicnn.testing" or name.startswith("minicnn.testing."))


def test_the_graph_reads_every_kind_of_import(tmp_path):
    sources = {
        "__init__.py": "from . import a\nfrom .a import f\n",
        "a.py": "def f():\n    from .sub import b\n",              # runs when f does
        "sub/__init__.py": "",
        "sub/b.py": "from .. import a, NAME\nimport minicnn.sub.c\nimport numpy\n",
        "sub/c.py": "from ..a import f\n",
        "d.py": "from minicnn.sub import c\n",
    }
    for name, text in sources.items():
        (tmp_path / "minicnn" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "minicnn" / name).write_text(text)
    graph = import_graph(tmp_path)
    assert {name: set(edges) for name, edges in graph.items()} == {
        "minicnn": {"minicnn.a"},
        "minicnn.a": {"minicnn.sub", "minicnn.sub.b"},     # importing sub.b runs sub first
        "minicnn.sub": set(),
        "minicnn.sub.b": {"minicnn.a", "minicnn", "minicnn.sub.c"},   # NAME: the package's own
        "minicnn.sub.c": {"minicnn.a"},
        "minicnn.d": {"minicnn.sub", "minicnn.sub.c"},
    }
    assert graph["minicnn.a"]["minicnn.sub.b"] == (Path("minicnn/a.py"), 2)
    # b reads NAME from the package, which imports a, whose f imports b; c imports a too
    assert _cycles(graph) == [["minicnn", "minicnn.a", "minicnn.sub.b", "minicnn.sub.c"]]


def test_the_graph_holds_every_module():
    assert {"minicnn.errors", "minicnn.fused", "minicnn.testing.capture"} <= set(import_graph())


def test_no_import_cycle():
    graph = import_graph()
    report = []
    for component in _cycles(graph):
        edges = [_edge(graph, a, b) for a in component for b in sorted(graph[a]) if b in component]
        report.append(f"  {', '.join(component)}, through these imports:\n" + "\n".join(edges))
    assert not report, (
        "minicnn's imports form cycles. The graph runs one way (backend, errors, kernel loader, "
        "ops, module, layers, then the fast path): remove the imports that point back up, moving "
        "what the lower module needs down to it or below (an import inside a function counts "
        "too):\n" + "\n".join(report))


def test_the_plain_tier_does_not_reach_the_fast_path():
    graph = import_graph()
    offenders = []
    for name in sorted(n for n in graph if _is_plain(n)):
        path = _shortest_path(graph, name, FAST_PATH)
        if path is not None:
            offenders.append(f"  {name}:\n{_chain(graph, path)}")
    assert not offenders, (
        f"modules of the plain tier import the fast path ({FAST_PATH}), directly or through "
        f"another module. The plain layers, losses and optimizers run their own code; speed "
        f"lives in {FAST_PATH}, applied by minicnn.fuse(model), or in an entry point "
        f"({', '.join(sorted(ENTRY_POINTS))}). Remove the first import of each chain that "
        f"leaves the plain tier:\n" + "\n".join(offenders))


def test_the_plain_tier_imports_no_entry_point():
    graph = import_graph()
    wrong = [_edge(graph, a, b) for a in sorted(graph) if _is_plain(a)
             for b in sorted(graph[a]) if b in ENTRY_POINTS]
    assert not wrong, ("the entry points sit above both tiers, and no plain module may import "
                       "them: move what these imports fetch down into the plain tier:\n"
                       + "\n".join(wrong))


def test_errors_imports_nothing_of_minicnn():
    assert import_graph()["minicnn.errors"] == {}


def test_every_exception_lives_in_errors():
    """Except two: cifar's private ``_Refused`` never leaves its module, and ``CaptureViolation``
    belongs to the CuPy stand-in for tests, which sits above the fast path."""
    kept_apart = {("minicnn.cifar", "_Refused"), ("minicnn.testing.capture", "CaptureViolation")}
    elsewhere = []
    for name in import_graph():
        for attr, value in vars(importlib.import_module(name)).items():
            if (inspect.isclass(value) and issubclass(value, BaseException)
                    and value.__module__ == name != "minicnn.errors"
                    and (name, attr) not in kept_apart):
                elsewhere.append(f"{name}.{attr}")
    assert elsewhere == [], f"define these in minicnn/errors.py and import them: {elsewhere}"


@pytest.mark.parametrize("where, name", [
    ("minicnn", "ShapeError"), ("minicnn.module", "ShapeError"), ("minicnn.layers", "ShapeError"),
    ("minicnn", "DeviceError"), ("minicnn.backend", "DeviceError"),
    ("minicnn.cuda", "KernelCompileError"), ("minicnn.testing.emulator", "KernelCompileError"),
    ("minicnn", "CheckpointError"), ("minicnn.io", "CheckpointError"),
    ("minicnn", "WeightsError"), ("minicnn.weights", "WeightsError"), ("minicnn.io", "WeightsError"),
    ("minicnn", "IDXError"), ("minicnn.data", "IDXError"),
    ("minicnn", "DatasetUnavailable"), ("minicnn.data", "DatasetUnavailable"),
    ("minicnn.cifar", "DatasetUnavailable"),
    ("minicnn", "CIFARFormatError"), ("minicnn.cifar", "CIFARFormatError"),
    ("minicnn", "GradcheckError"), ("minicnn.testing", "GradcheckError"),
    ("minicnn.testing.gradcheck", "GradcheckError"),
    ("minicnn.testing.emulator", "EmulatorError"),
    ("minicnn.testing.emulator", "EmulatorUnavailable"),
])
def test_exceptions_keep_their_old_addresses(where, name):
    assert getattr(importlib.import_module(where), name) is getattr(minicnn.errors, name)


# Run in a fresh interpreter: records glibc's mallopt calls made through ctypes, imports every
# module of minicnn, calls tune_process when asked, and prints what changed.
_IMPORT_EVERYTHING = """
import ctypes, json, os, pkgutil, sys
calls = []
class Recording(ctypes.CDLL):
    def __getitem__(self, name):          # behind attribute access too: libc.mallopt
        function = super().__getitem__(name)
        if name != "mallopt":
            return function
        def record(*args):
            calls.append(args)
            return function(*args)
        return record
ctypes.CDLL, ctypes.cdll = Recording, ctypes.LibraryLoader(Recording)
before = dict(os.environ)
import minicnn
for module in pkgutil.walk_packages(minicnn.__path__, "minicnn."):
    __import__(module.name)
said = minicnn.tune_process() if sys.argv[1] == "tune" else None
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps({"environment": changed, "mallopt": calls, "said": said}))
"""


def _import_everything(then="", **env):
    """What a fresh ``import minicnn`` (and every submodule), then ``minicnn.tune_process()`` when
    ``then="tune"``, changed: environment variables, mallopt calls, and the call's answer."""
    run = subprocess.run([sys.executable, "-c", _IMPORT_EVERYTHING, then], capture_output=True,
                         text=True, cwd=ROOT, timeout=300, env={**os.environ, **env})
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


def test_importing_minicnn_changes_nothing_outside_it():
    """No environment variable, no allocator setting: those belong to ``minicnn.tune_process()``,
    which entry points call."""
    assert _import_everything() == {"environment": [], "mallopt": [], "said": None}


def test_tune_process_sets_glibc_to_keep_freed_memory():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's allocator is set on Linux only")
    seen = _import_everything("tune")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    assert seen["mallopt"] == [[M_MMAP_THRESHOLD, 32 << 20], [M_TRIM_THRESHOLD, 1 << 30]]
    assert seen["said"] == ("glibc keeps freed memory for reuse (M_MMAP_THRESHOLD 32 MiB, "
                            "M_TRIM_THRESHOLD 1 GiB)")
    assert seen["environment"] == []


def test_tune_process_can_be_refused():
    seen = _import_everything("tune", MINICNN_TUNE_PROCESS="0")
    assert seen == {"environment": [], "mallopt": [], "said": ""}


def test_training_steps_reuse_host_memory():
    """A step's large temporaries come back from the allocator, not as fresh pages from the OS:
    before ``tune_process``, each step at batch 128 cost ~4,900 page faults (a third of its time
    on a 2-core machine); with it, ~0."""
    import resource
    if not minicnn.tune_process():
        pytest.skip("not Linux with glibc: the allocator setting does not apply")
    model, loss_fn = minicnn.models.mnist_cnn(), minicnn.CrossEntropyLoss()
    opt = minicnn.Adam(model.parameters())
    x = np.random.default_rng(5).standard_normal((128, 1, 28, 28)).astype(np.float32)
    y = np.arange(128) % 10

    def step():
        loss_fn(model(x), y)
        opt.zero_grad()
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    assert per_step < 200, f"{per_step:.0f} page faults per step"
