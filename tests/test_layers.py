"""Imports point downward only (design.md section 2), and `import lmwright` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "lmwright"

# lower number = lower layer; a module may import its own layer and the layers below it
LEVELS = {
    "config": 0, "registry": 0, "utils": 0,
    "data": 1,
    "models": 2,
    "objectives": 3,
    "methods": 4,
    "engine": 5,
    "stages": 6, "serve": 6, "eval": 6, "export": 6,
    "demo": 7,
    "cli": 8,
}


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "lmwright" or len(parts) < 2:
        return None
    return LEVELS.get(parts[1])


def imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
    return out


def imported_names(path: Path) -> list[tuple[str, str | None, int]]:
    """(module, name or None, line) of every absolute import; ``from a.b import c`` of a submodule ``c`` gives
    (``a.b.c``, None)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[tuple[str, str | None, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = PKG.parent.joinpath(*f"{node.module}.{a.name}".split("."))
                if sub.with_suffix(".py").exists() or (sub / "__init__.py").exists():
                    out.append((f"{node.module}.{a.name}", None, node.lineno))
                else:
                    out.append((node.module, a.name, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
    return out


def modules():
    for path in sorted(PKG.rglob("*.py")):
        yield ".".join(path.relative_to(PKG.parent).with_suffix("").parts), path


def private(module: str, name: str | None) -> bool:
    """A name with one leading underscore, or a module whose last part has one (``__init__`` is not)."""
    def one(part: str) -> bool:
        return part.startswith("_") and not part.startswith("__")
    return one(module.split(".")[-1]) or (name is not None and one(name))


def test_no_upward_imports():
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        mod = ".".join(rel.parts)
        if mod in ("lmwright.__init__",):
            continue  # the package root re-exports lmwright.load lazily
        mine = layer_of(mod)
        assert mine is not None, f"{mod} is in no layer: add it to LEVELS in this test and to design.md"
        for target, line in imports(path):
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {target} (layer {theirs} > {mine})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_import_lmwright_is_light():
    code = ("import sys, lmwright, lmwright.cli; lmwright.cli.build_parser(); "
            "heavy = [m for m in ('torch', 'transformers', 'gradio', 'vllm', 'onnx', 'bitsandbytes', 'peft') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"`import lmwright` / `lmwright --help` imported: {out.stdout.strip()}"


def test_tools_do_not_import_each_other_for_shared_code():
    """export, eval and serve are siblings: what two of them share (sampling, pooling, metrics) lives below
    them (export used to import serve's sampling)."""
    bad = []
    for tool in ("export", "eval"):
        for path in (PKG / tool).rglob("*.py"):
            for target, line in imports(path):
                if target.startswith(("lmwright.serve", "lmwright.export", "lmwright.eval")) \
                        and not target.startswith(f"lmwright.{tool}"):
                    bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {target}")
    assert not bad, "tool -> tool imports:\n" + "\n".join(bad)


PRIVATE_ALLOWED: set[tuple[str, str, str]] = set()  # (module, target, name): none


def test_no_private_imports_across_packages():
    """A ``_private`` name or module belongs to its own top-level package (lmwright.X): another package that
    needs it asks for a public home (an upward or sideways reach into internals is how duplicates start)."""
    bad = []
    for mod, path in modules():
        for target, name, line in imported_names(path):
            parts = target.split(".")
            if parts[0] != "lmwright" or len(parts) < 2 or parts[1] == mod.split(".")[1]:
                continue
            if private(target, name) and (mod, target, name) not in PRIVATE_ALLOWED:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {target}" + (f".{name}" if name else ""))
    assert not bad, "private names used across packages:\n" + "\n".join(bad)


def is_stage_shared(module: str) -> bool:
    """In lmwright/stages a module named ``_*`` or ``common`` holds helpers shared by stages; every other
    module is a stage (or ``compare``, which runs stages through the registry)."""
    last = module.split(".")[-1]
    return last.startswith("_") or last == "common"


def test_no_stage_imports_another_stage():
    """A stage file reads top to bottom on its own: what two stages share lives in a shared helper module
    (stages/common.py, stages/_align.py, stages/_online.py), never in one of the stages."""
    bad = []
    for mod, path in modules():
        if not mod.startswith("lmwright.stages."):
            continue
        for target, _, line in imported_names(path):
            if target.startswith("lmwright.stages.") and target.count(".") == 2 and target != mod \
                    and not is_stage_shared(target):
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports the stage {target}")
    assert not bad, "stage -> stage imports (move the shared part to a shared helper module):\n" + "\n".join(bad)


def test_tools_use_only_public_stage_functions():
    """serve, eval, export, demo and cli sit above the stages and call their public functions, never their
    private helpers (a ``_*`` module of stages/ or a ``_*`` name of a stage)."""
    bad = []
    for mod, path in modules():
        if mod.split(".")[1] not in ("serve", "eval", "export", "demo", "cli"):
            continue
        for target, name, line in imported_names(path):
            if target.startswith("lmwright.stages") and private(target, name):
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {target}" + (f".{name}" if name else ""))
    assert not bad, "tools importing stage internals:\n" + "\n".join(bad)


def test_objectives_do_not_load_models():
    """An objective is a loss over a batch: it is handed a model and never loads one (no ``from_pretrained``,
    no ``lmwright.models.load``, no ``load_trained``); loading lives in models/ and methods/."""
    bad = []
    for path in sorted((PKG / "objectives").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "from_pretrained":
                bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno} calls .from_pretrained")
        for target, name, line in imported_names(path):
            if target == "lmwright.models.load" or name == "load_trained" or target == "lmwright.models.gguf_import":
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {target}" + (f".{name}" if name else ""))
    assert not bad, "objectives loading models:\n" + "\n".join(bad)


def test_model_introspection_lives_in_models():
    """Task and family introspection has one home, lmwright.models.introspect (issue 14: there were two
    ``model_family`` functions and a task-class table imported by its private name across modules): no
    module outside lmwright/models defines ``model_family`` or a task-class table, and no module outside
    lmwright/models imports a private name from it."""
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent)
        if rel.parts[1] == "models":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "model_family":
                bad.append(f"{rel}:{node.lineno} defines model_family")
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, ast.AnnAssign) else []
            for t in targets:
                if isinstance(t, ast.Name) and "TASK_CLASS" in t.id.upper() and isinstance(node.value, ast.Dict):
                    bad.append(f"{rel}:{node.lineno} defines the task-class table {t.id}")
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmwright."):
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private and (node.module.startswith("lmwright.models") or
                                {"_TASK_CLASSES", "_task_from_arch", "_task_of"} & set(private)):
                    bad.append(f"{rel}:{node.lineno} imports {', '.join(private)} from {node.module}")
    assert not bad, "use lmwright.models.introspect:\n" + "\n".join(bad)
