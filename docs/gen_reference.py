"""Write docs/reference.md from the docstrings of the types a backend author uses.

    .venv/bin/python docs/gen_reference.py          # rewrite docs/reference.md
    .venv/bin/python docs/gen_reference.py --check  # exit 1 if it is stale

What goes in is derived, not listed: every public class of ``nexa.types`` and
``nexa.backend`` in source order, every error of ``nexa.errors``, and the ``__all__`` of
``nexa.text``, ``nexa.reasoning``, ``nexa.toolcalls`` and ``nexa.fim``. A field's docstring is the string literal under it (the attrs convention);
``core/tests/test_docs.py`` fails when the committed file differs from what this writes
or when a field, attribute or method has no docstring.
"""

from __future__ import annotations

import ast
import enum
import importlib
import inspect
import re
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs

OUT = Path(__file__).resolve().parent / "reference.md"

HEADER = """\
# API reference: the values a backend works with

Generated from the docstrings by `docs/gen_reference.py`; do not edit by hand. After
changing a docstring, a field or a signature in `nexa.types`, `nexa.backend`,
`nexa.errors`, `nexa.text`, `nexa.reasoning`, `nexa.toolcalls` or `nexa.fim`, run `.venv/bin/python docs/gen_reference.py` and commit
the result (`core/tests/test_docs.py` fails while this file is stale).

The [plugin guide](plugin-guide.md) shows these types at work; the on-disk form of
`Manifest` is described in [manifest.md](manifest.md).
"""

SECTIONS = (
    ("nexa.types", "Value types (`nexa.types`)",
     "Frozen attrs values: build variants with `attrs.evolve`, never mutate. Requests arrive "
     "already validated at the HTTP edge (`nexa.server.convert`)."),
    ("nexa.task_types", "Values of the other tasks (`nexa.task_types`, re-exported by `nexa.types`)",
     "Embeddings, images, rerank and speech to text: frozen like the values above, and importable "
     "from `nexa.types` too."),
    ("nexa.backend", "The backend contract (`nexa.backend`)", ""),
    ("nexa.errors", "Errors (`nexa.errors`)",
     "The client receives `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}` with the "
     "status below; an exception of any other type becomes a 500 whose message names no path "
     "and carries no traceback."),
    ("nexa.text", "Text helpers (`nexa.text`)", ""),
    ("nexa.reasoning", "Thinking models (`nexa.reasoning`)", ""),
    ("nexa.toolcalls", "Streamed tool calls (`nexa.toolcalls`)", ""),
    ("nexa.fim", "Fill-in-the-middle (`nexa.fim`)", ""),
)
# Modules documented by their ``__all__`` (functions and classes) rather than every class.
BY_ALL = ("nexa.text", "nexa.reasoning", "nexa.toolcalls", "nexa.fim")


def markdown(text: str) -> str:
    """reStructuredText literals (````x````) as Markdown code (```x```)."""
    return re.sub(r"``(.+?)``", r"`\1`", text)


def one_line(text: str | None) -> str:
    return markdown(" ".join((text or "").split()))


def paragraphs(text: str | None) -> str:
    """A docstring as Markdown: dedented, paragraphs kept, the lines of each joined, and
    ``- `` items kept as list items."""
    out = []
    for block in re.split(r"\n\s*\n", inspect.cleandoc(text or "")):
        items: list[list[str]] = []
        for line in block.splitlines():
            if not items or line.lstrip().startswith("- "):
                items.append([])
            items[-1].append(line.strip())
        out.append("\n".join(" ".join(" ".join(item).split()) for item in items if item))
    return markdown("\n\n".join(p for p in out if p))


def _source_tree(obj: Any) -> ast.ClassDef:
    source = textwrap.dedent(inspect.getsource(obj))
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.ClassDef)
    return node


def class_attributes(cls: type) -> list[tuple[str, str, str | None, str | None]]:
    """(name, annotation, default source, docstring) of each annotated class-body name."""
    out = []
    body = _source_tree(cls).body
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        if name.startswith("_"):
            continue
        annotation = ast.unparse(node.annotation)
        annotation = re.sub(r"^ClassVar\[(.*)\]$", r"\1", annotation)
        default = _default_source(node.value)
        doc = None
        following = body[i + 1] if i + 1 < len(body) else None
        if (isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            doc = following.value.value
        out.append((name, annotation, default, doc))
    return out


def _default_source(value: ast.expr | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, ast.Call) and ast.unparse(value.func) in ("attrs.field", "field"):
        for kw in value.keywords:
            if kw.arg == "default":
                return ast.unparse(kw.value)
            if kw.arg == "factory":
                return f"{ast.unparse(kw.value)}()"
        return None
    return ast.unparse(value)


def signature(fn: Any, *, drop_self: bool = True, returns: bool = True) -> str:
    """``(a: int, b: str = 'x') -> T`` from the source's own annotations (unevaluated)."""
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    if drop_self and params and params[0].name in ("self", "cls"):
        params = params[1:]
    parts = []
    star_done = False
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        if p.kind is p.VAR_POSITIONAL:
            star_done = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.annotation is not p.empty:
            text += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {p.default!r}"
        parts.append(text)
    out = f"({', '.join(parts)})"
    if returns and sig.return_annotation is not sig.empty:
        out += f" -> {_annotation(sig.return_annotation)}"
    return out


def _annotation(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))


def members(cls: type) -> list[tuple[str, Any]]:
    """Public methods and properties defined in ``cls`` itself, in source order."""
    out = []
    for node in _source_tree(cls).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_"):
            out.append((node.name, cls.__dict__[node.name]))
    return out


class Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.undocumented: list[str] = []

    def add(self, text: str = "") -> None:
        self.lines.append(text)

    def doc(self, qualname: str, text: str | None, *, inline: bool = False) -> str:
        """``text`` as Markdown (one line for a list item or table cell); a missing docstring
        is recorded in ``undocumented``."""
        if not one_line(text):
            self.undocumented.append(qualname)
            return "*(undocumented)*"
        return one_line(text) if inline else paragraphs(text)

    def text(self) -> str:
        return "\n".join(self.lines).rstrip() + "\n"

    # --- one section per kind of thing ----------------------------------------------

    def klass(self, module: ModuleType, cls: type) -> None:
        if issubclass(cls, enum.Enum):
            return self.enum(cls)
        kind = ("frozen value" if attrs.has(cls) and cls.__setattr__ is not object.__setattr__
                else "attrs class" if attrs.has(cls) else "class")
        bases = [b.__name__ for b in cls.__bases__ if b is not object]
        self.add(f"### `{cls.__name__}`")
        self.add()
        header = f"*{kind}*"
        if bases:
            header += f", subclass of {', '.join(f'`{b}`' for b in bases)}"
        if not attrs.has(cls) and "__init__" in cls.__dict__:
            header += f" — `{cls.__name__}{signature(cls.__init__, returns=False)}`"
        self.add(header)
        self.add()
        self.add(self.doc(cls.__qualname__, cls.__doc__))
        self.add()
        fields = class_attributes(cls)
        if fields:
            self.add("Fields:" if attrs.has(cls) else "Class attributes:")
            self.add()
            for name, annotation, default, doc in fields:
                line = f"- `{name}`: `{annotation}`"
                constant = getattr(module, default, None) if default and default.isidentifier() else None
                if isinstance(constant, int | str):
                    default = repr(constant)  # a module constant: show its value
                if default is not None:
                    line += f" = `{default}`"
                self.add(f"{line} — {self.doc(f'{cls.__qualname__}.{name}', doc, inline=True)}")
            self.add()
        methods = members(cls)
        if methods:
            self.add("Methods and properties:")
            self.add()
            for name, member in methods:
                qual = f"{cls.__qualname__}.{name}"
                if isinstance(member, property):
                    returns = inspect.signature(member.fget).return_annotation
                    shown = f"`{name}` (property)"
                    if returns is not inspect.Signature.empty:
                        shown = f"`{name}` (property) -> `{_annotation(returns)}`"
                    self.add(f"- {shown} — {self.doc(qual, member.__doc__, inline=True)}")
                else:
                    fn = member.__func__ if isinstance(member, classmethod | staticmethod) else member
                    prefix = "classmethod " if isinstance(member, classmethod) else ""
                    self.add(f"- {prefix}`{name}{signature(fn)}` — {self.doc(qual, fn.__doc__, inline=True)}")
            self.add()
        return None

    def enum(self, cls: type[enum.Enum]) -> None:
        self.add(f"### `{cls.__name__}`")
        self.add()
        self.add(f"*enum* — {self.doc(cls.__qualname__, cls.__doc__)}")
        self.add()
        self.add(", ".join(f"`{m.name}` = `{m.value!r}`" for m in cls))
        self.add()

    def errors(self, module: ModuleType) -> None:
        classes = public_classes(module)
        self.add("| error | subclass of | HTTP status | `type` | `code` | meaning |")
        self.add("|---|---|---|---|---|---|")
        for cls in classes:
            base = cls.__bases__[0].__name__
            status = getattr(cls, "status", None)
            kind = getattr(cls, "type", None)
            code = getattr(cls, "code", None)
            cells = [
                f"`{cls.__name__}`", f"`{base}`",
                str(status) if status is not None else "—",
                f"`{kind}`" if kind else "—",
                f"`{code}`" if code else "—",
                self.doc(cls.__qualname__, cls.__doc__, inline=True).replace("|", "\\|"),
            ]
            self.add("| " + " | ".join(cells) + " |")
        self.add()
        base = module.NexaError
        self.add(f"`NexaError{signature(base.__init__)}`: `param` names the request field at fault "
                 "(OpenAI's `param`); `code` overrides the class's code.")
        self.add()

    def functions(self, module: ModuleType) -> None:
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj):
                self.klass(module, obj)
            else:
                self.add(f"### `{name}{signature(obj, drop_self=False)}`")
                self.add()
                self.add(self.doc(name, obj.__doc__))
                self.add()


def public_classes(module: ModuleType) -> list[type]:
    classes = [c for name, c in vars(module).items()
               if inspect.isclass(c) and c.__module__ == module.__name__ and not name.startswith("_")]
    return sorted(classes, key=lambda c: inspect.getsourcelines(c)[1])


def render() -> tuple[str, list[str]]:
    """The reference's text, and the names that lack a docstring."""
    w = Writer()
    w.add(HEADER)
    for module_name, title, intro in SECTIONS:
        module = importlib.import_module(module_name)
        w.add(f"## {title}")
        w.add()
        w.add(w.doc(module_name, module.__doc__))
        w.add()
        if intro:
            w.add(intro)
            w.add()
        if module_name == "nexa.errors":
            w.errors(module)
        elif module_name in BY_ALL:
            w.functions(module)
        else:
            for cls in public_classes(module):
                w.klass(module, cls)
    return w.text(), w.undocumented


def main(argv: list[str]) -> int:
    text, undocumented = render()
    if undocumented:
        print("no docstring: " + ", ".join(undocumented), file=sys.stderr)
    if "--check" in argv:
        if OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is stale: run python docs/gen_reference.py", file=sys.stderr)
            return 1
        return 1 if undocumented else 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
