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
