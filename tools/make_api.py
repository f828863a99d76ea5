"""Write docs/api.md, the API reference, from minicnn's docstrings.

    python tools/make_api.py            # rewrites docs/api.md
    python tools/make_api.py --check    # exit 1 if docs/api.md differs from what would be written

Every name of ``minicnn.__all__`` gets a heading with the anchor ``#<name>`` (other pages link to
``api.md#Conv2d``), its signature, the file it is defined in, and its docstring; a class also lists
its public methods. Then the modules that are used by their module name (``MODULES`` below:
``minicnn.models``, ``minicnn.ops``, the fast path's modules, ``minicnn.onnx``,
``minicnn.distributed``, ...) are listed the same way, less what the first part holds.
Docstrings are shown as plain text, exactly as written in the code.
"""
import argparse
import importlib
import inspect
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import minicnn  # noqa: E402

OUT = ROOT / "docs" / "api.md"

# (section title, anchor, modules whose __all__ names it holds), in reading order
SECTIONS = [
    ("Modules and parameters", "sec-module", ["minicnn.module"]),
    ("Layers", "sec-layers", ["minicnn.layers", "minicnn.normalization", "minicnn.blocks"]),
    ("Loss", "sec-loss", ["minicnn.losses"]),
    ("Optimizers", "sec-optim", ["minicnn.optim"]),
    ("Learning-rate schedules", "sec-lr", ["minicnn.lr_scheduler"]),
    ("Training", "sec-train", ["minicnn.train"]),
    ("Prediction", "sec-predict", ["minicnn.inference"]),
    ("Mixed precision", "sec-amp", ["minicnn.amp"]),
    ("Data", "sec-data", ["minicnn.data", "minicnn.cifar"]),
    ("Checkpoints and PyTorch weights", "sec-io", ["minicnn.io", "minicnn.weights"]),
    ("Devices, dtype and randomness", "sec-backend", ["minicnn.backend"]),
    ("Checking gradients", "sec-testing", ["minicnn.testing.gradcheck"]),
    ("The fast path", "sec-fused", ["minicnn.fused.fuse"]),
    ("Errors", "sec-errors", ["minicnn.errors"]),
]

# modules used by their name, not re-exported name by name
MODULES = ["minicnn.models", "minicnn.augment", "minicnn.ops", "minicnn.cuda",
           "minicnn.testing.emulator", "minicnn.errors", "minicnn.fused.modules",
           "minicnn.fused.losses", "minicnn.fused.windows", "minicnn.fused.ops",
           "minicnn.fused.gemm", "minicnn.metrics", "minicnn.gradcam", "minicnn.plot",
           "minicnn.onnx", "minicnn.distributed"]


def _path(module):
    return os.path.relpath(inspect.getsourcefile(module), ROOT).replace(os.sep, "/")


def _doc_block(doc):
    doc = inspect.cleandoc(doc or "").strip()
    if not doc:
        return []
    return ["```text", doc, "```", ""]


def _signature(obj, method=False):
    """``(a, b=1)``; for a method, without its first parameter (self or cls)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    if method:
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])
    # a function as a default prints with its address, which changes every run: keep its name
    return re.sub(r"<function ([\w.<>]+) at 0x[0-9a-f]+>", r"\1", str(sig))


def _own_doc(obj):
    """The object's own docstring (a class's is not inherited)."""
    if inspect.isclass(obj):
        return obj.__dict__.get("__doc__")
    return getattr(obj, "__doc__", None)


def _constant_comment(module, name):
    """The comment lines right above the assignment of ``name`` in ``module``'s source."""
    lines = inspect.getsource(module).splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"^(\w+\s*,\s*)*{re.escape(name)}\b(\s*,\s*\w+)*\s*=", line):
            comment = []
            j = i - 1
            while j >= 0 and lines[j].startswith("#"):
                comment.insert(0, lines[j].lstrip("# "))
                j -= 1
            return " ".join(comment)
    return None


def _defines(module, name):
    """True when ``module``'s source assigns or defines ``name`` at top level."""
    source = inspect.getsource(module)
    pattern = (rf"^(class|def)\s+{re.escape(name)}\b|"
               rf"^(\w+\s*,\s*)*{re.escape(name)}\b(\s*,\s*\w+)*\s*=")
    return re.search(pattern, source, re.M) is not None


def _methods(cls):
    """(name, signature, doc, kind) of the public methods and properties ``cls`` defines itself
    or takes from a private base class of minicnn (``_BatchNorm``, ``_Pool2d``)."""
    out, seen = [], set()
    owners = [cls] + [b for b in cls.__mro__[1:]
                      if b.__name__.startswith("_") and b.__module__.startswith("minicnn")]
    for name, value in ((n, v) for owner in owners for n, v in vars(owner).items()):
        if name.startswith("_") or name in seen:
            continue
        seen.add(name)
        if isinstance(value, property):
            out.append((name, "", value.fget.__doc__, "property"))
        elif isinstance(value, staticmethod):
            fn = value.__func__
            out.append((name, _signature(fn), fn.__doc__, "method"))
        elif isinstance(value, classmethod):
            fn = value.__func__
            out.append((name, _signature(fn, method=True), fn.__doc__, "method"))
        elif inspect.isfunction(value):
            out.append((name, _signature(value, method=True), value.__doc__, "method"))
    return out


def _entry(qualname, obj, module, prefix):
    """Markdown of one documented name."""
    name = qualname.rsplit(".", 1)[-1]
    lines = [f"### {name} {{#{name if prefix == 'minicnn' else prefix + '.' + name}}}", ""]
    where = f"`{_path(module)}`"
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        base = obj.__bases__[0].__name__
        lines += [f"exception `{prefix}.{name}` (a `{base}`), defined in {where}", ""]
        lines += _doc_block(_own_doc(obj))
    elif inspect.isclass(obj) or callable(obj):
        kind = "class" if inspect.isclass(obj) else "function"
        lines += [f"{kind} `{prefix}.{name}{_signature(obj)}`, defined in {where}", ""]
        lines += _doc_block(_own_doc(obj))
        if inspect.isclass(obj):
            documented, plain = [], []
            for mname, sig, doc, mkind in _methods(obj):
                (documented if (doc or "").strip() else plain).append((mname, sig, doc, mkind))
            for mname, sig, doc, mkind in documented:
                label = f"`{name}.{mname}{sig}`" + (" (property)" if mkind == "property" else "")
                lines += [f"**{label}**", ""] + _doc_block(doc)
            if plain:
                lines += ["Also defines: " + ", ".join(f"`{m}{s}`" for m, s, _, _ in plain) + ".", ""]
    else:
        lines += [f"constant `{prefix}.{name} = {obj!r}`, defined in {where}", ""]
        comment = _constant_comment(module, name)
        if comment:
            lines += [comment, ""]
    return lines


def _public_names(module):
    """Names a module defines itself and does not mark private, in source order."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items()
                 if not n.startswith("_") and (inspect.isclass(v) or inspect.isfunction(v))
                 and getattr(v, "__module__", None) == module.__name__]
    return sorted(names, key=lambda n: _line_of(module, n))


def _line_of(module, name):
    obj = getattr(module, name)
    try:
        return inspect.getsourcelines(obj)[1]
    except (TypeError, OSError):
        source = inspect.getsource(module).splitlines()
        for i, line in enumerate(source):
            if re.match(rf"^(\w+\s*,\s*)*{re.escape(name)}\b", line):
                return i
        return 10**9


def render():
    """The text of docs/api.md."""
    modules = {m: importlib.import_module(m) for _, _, ms in SECTIONS for m in ms}
    home = {}
    for name in minicnn.__all__:
        obj = getattr(minicnn, name)
        mod = getattr(obj, "__module__", None) if (inspect.isclass(obj) or callable(obj)) else None
        if mod not in modules:
            mod = next((m for m in modules if _defines(modules[m], name)), None)
        if mod is None:
            raise SystemExit(f"make_api: cannot tell which module defines minicnn.{name}; add its "
                             "module to SECTIONS in tools/make_api.py")
        home[name] = mod

    out = ["# API reference", "",
           "Generated from the docstrings by `python tools/make_api.py`; edit the docstrings, not "
           "this page. Every name in the first part is importable from the package itself "
           "(`minicnn.Conv2d`, `minicnn.fit`, ...); the second part lists the modules used by "
           "their module name (`minicnn.models.mnist_cnn`, `minicnn.ops.im2col`, ...).", "",
           "Shapes are written as in the code: B batch, C channels, H, W height and width, "
           "OH, OW output size, K classes (or kh*kw*C columns of im2col).", ""]
    out += ["## Contents", ""]
    for title, anchor, ms in SECTIONS:
        names = [n for n in minicnn.__all__ if home[n] in ms]
        links = ", ".join(f"[{n}](#{n})" for n in
                          sorted(names, key=lambda n: (ms.index(home[n]),
                                                       _line_of(modules[home[n]], n))))
        out.append(f"- [{title}](#{anchor}): {links}")
    for m in MODULES:
        out.append(f"- [`{m}`](#{m.replace('.', '-')})")
    out.append("")

    for title, anchor, ms in SECTIONS:
        out += [f"## {title} {{#{anchor}}}", ""]
        for m in ms:
            names = sorted((n for n in minicnn.__all__ if home[n] == m),
                           key=lambda n: _line_of(modules[m], n))
            for name in names:
                out += _entry(name, getattr(minicnn, name), modules[m], "minicnn")

    out += ["## Modules used by name {#sec-modules}", ""]
    for m in MODULES:
        module = importlib.import_module(m)
        out += [f"## `{m}` {{#{m.replace('.', '-')}}}", "", f"Defined in `{_path(module)}`.", ""]
        out += _doc_block(module.__doc__)
        for name in _public_names(module):
            obj = getattr(module, name)
            if inspect.ismodule(obj) or home.get(name) == m:
                continue
            out += _entry(name, obj, module, m)
    return "\n".join(out).rstrip() + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="do not write; exit 1 if docs/api.md is not what would be written")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            print(f"{OUT} is out of date: run python tools/make_api.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
