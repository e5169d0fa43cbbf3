"""Methods are plugins (design convention 3, issue 14): outside the plugin files themselves, no code in
lmwright/ decides anything by a method's name. Everything a stage, tool or the registry needs to know about a
method is a hook or attribute of its plugin (``lmwright.methods.base.Method``), so adding a method is one new
file in lmwright/methods plus its row in tests/methods/test_contract.py (docs/contributing.md).

A method name here is any registered method or preset (``qlora``). Words such as ``prompt``, ``full`` or
``adapter`` are also data keys (``record["prompt"]``), so the check looks at the places where a string acts
as a method name: compared with something named ``*method*``/``*name*``, looked up through
``METHODS``/``get_method``/``COMPAT``, given as ``name=``/``"name":``/``"method":``, or listed beside two other
method names in one literal (a table of methods). In lmwright/methods' shared modules every such string counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

from lmwright.methods import METHODS, preset_names

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "lmwright"

# (file, name) -> why the literal cannot come from the registry. Keep this list short and justified.
ALLOWED = {
    ("lmwright/methods/base.py", "full"): "the default of method.name is a literal of the config dataclass",
    ("lmwright/demo/__init__.py", "lora"): "the demo tour's config chooses lora, as a user's YAML does",
    ("lmwright/demo/real.py", "lora"): "the real-model demo's configs choose lora, as a user's YAML does",
}


def _names() -> set[str]:
    return set(METHODS.names()) | set(preset_names())


def _registers(path: Path) -> bool:
    """Whether the module registers a method: a class decorated with ``@METHODS.register(...)``."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ClassDef):
            if any(isinstance(d, ast.Call) and ast.unparse(d.func) == "METHODS.register" for d in node.decorator_list):
                return True
    return False


def _plugin_files() -> set[Path]:
    return {p for p in (PKG / "methods").glob("*.py") if _registers(p)}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _consts(node: ast.AST, names: set[str]) -> list[ast.Constant]:
    """Method-name string constants that are ``node`` or an element of a tuple/list/set literal ``node``."""
    if isinstance(node, ast.Constant) and node.value in names:
        return [node]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e for e in node.elts if isinstance(e, ast.Constant) and e.value in names]
    return []


def _mentions(node: ast.AST, *words: str) -> bool:
    text = ast.unparse(node).lower()
    return any(w in text for w in words)


def _uses(tree: ast.AST, names: set[str], strict: bool) -> list[ast.Constant]:
    found: list[ast.Constant] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for i, op in enumerate(operands):
                others = operands[:i] + operands[i + 1:]
                if any(_mentions(o, "method", "name", "compat") for o in others):
                    found += _consts(op, names)
        elif isinstance(node, ast.Subscript) and _mentions(node.value, "method", "compat", "_no_merge"):
            found += _consts(node.slice, names)
        elif isinstance(node, ast.Call):
            if _mentions(node.func, "method", "compat"):
                for a in node.args:
                    found += _consts(a, names)
            for kw in node.keywords:
                if kw.arg in ("name", "method"):
                    found += _consts(kw.value, names)
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values, strict=True):
                if isinstance(k, ast.Constant) and k.value in ("name", "method"):
                    found += _consts(v, names)
            table = [c for k in node.keys if k is not None for c in _consts(k, names)]
            table += [c for v in node.values for c in _consts(v, names)]
            if len({c.value for c in table}) >= 3:
                found += table
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            table = _consts(node, names)
            if len({c.value for c in table}) >= 3:
                found += table
        if strict and isinstance(node, ast.Constant) and node.value in names:
            found.append(node)
    return found


def test_no_method_name_is_hard_coded_outside_the_plugins():
    names = _names()
    plugins = _plugin_files()
    assert plugins, "no plugin files found in lmwright/methods"
    problems = []
    for path in sorted(PKG.rglob("*.py")):
        if path in plugins:
            continue
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _docstrings(tree)
        strict = path.parent == PKG / "methods"
        seen = set()
        for c in _uses(tree, names, strict):
            if id(c) in skip or id(c) in seen or (rel, c.value) in ALLOWED:
                continue
            seen.add(id(c))
            problems.append(f"{rel}:{c.lineno}: method name {c.value!r} (ask the plugin: a hook of "
                            f"lmwright.methods.base.Method)")
    assert not problems, "\n".join(problems)


def test_every_plugin_implements_the_method_protocol():
    from dataclasses import is_dataclass

    from lmwright.methods.base import Method

    for name, cls in METHODS.items():
        m = cls()
        assert isinstance(m, Method), f"{name} lacks hooks of lmwright.methods.base.Method"
        assert m.name == name
        assert is_dataclass(cls.Options), f"{name}.Options must be a dataclass"


def test_allowlist_entries_are_still_needed():
    names = _names()
    used = set()
    for rel, _ in ALLOWED:
        path = ROOT / rel
        tree = ast.parse(path.read_text(encoding="utf-8"))
        used |= {(rel, c.value) for c in _uses(tree, names, path.parent == PKG / "methods")}
    assert set(ALLOWED) <= used, f"stale ALLOWED entries: {set(ALLOWED) - used}"


def test_the_shared_modules_import_no_plugin():
    """base.py is below the plugins (they import it): importing one back is the old methods/base <-> plugin circle."""
    plugins = {f"lmwright.methods.{p.stem}" for p in _plugin_files()}
    for path in (PKG / "methods").glob("*.py"):
        if path in _plugin_files():
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in plugins, f"{path.name} imports the plugin {node.module}"


def test_method_config_is_the_union_of_the_plugins_options():
    from dataclasses import dataclass, fields

    import pytest

    from lmwright.config import ConfigError, opt
    from lmwright.methods.base import PlainModelMethod, build_method_config
    from lmwright.registry import Registry

    reg = Registry("method")

    @dataclass
    class AOptions:
        r: int = opt(8, "rank")
        size: int = opt(4, "width")

        def check(self) -> None:
            if self.size < 1:
                raise ConfigError(f"method.size must be >= 1, got {self.size}")

    @dataclass
    class BOptions:
        r: int = opt(8, "rank of B")

    reg.register("a", type("A", (PlainModelMethod,), {"name": "a", "Options": AOptions}))
    reg.register("b", type("B", (PlainModelMethod,), {"name": "b", "Options": BOptions,
                                                      "presets": {"b4": {"model.quantize": "nf4"}}}))
    cfg_cls = build_method_config(reg)
    assert [f.name for f in fields(cfg_cls)] == ["name", "modules_to_save", "r", "size"]
    helps = {f.name: f.metadata["help"] for f in fields(cfg_cls)}
    assert helps["r"] == "a: rank; b: rank of B"
    assert "a, b" in helps["name"] and "b4 = b + model.quantize=nf4" in helps["name"]
    with pytest.raises(ConfigError, match="method.size must be >= 1"):
        cfg_cls(name="b", size=0).check()  # every key is validated by its owner, whatever the method

    @dataclass
    class COptions:
        r: int = opt(16, "another default")

    reg.register("c", type("C", (PlainModelMethod,), {"name": "c", "Options": COptions}))
    with pytest.raises(TypeError, match="method c: option r"):
        build_method_config(reg)
