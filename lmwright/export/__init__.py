"""Export a trained model to another format, each export followed by an automatic parity check.

Exporters are plugins registered by name in ``EXPORTERS`` (``hf``, ``onnx``, ``gguf``), one module
each in this package. :func:`export` is the one entry point and owns the guarantees every format
gets for free:

- bad input (an architecture the format cannot represent, a missing tokenizer, an existing output
  folder without ``overwrite``, an adapter that cannot be merged) fails *before* anything is written;
- the artefact is written into a temporary sibling folder and renamed into place only after its
  parity check passed, so an export never leaves a half-written folder behind;
- parity (exported artefact vs the source model, see :mod:`lmwright.export.parity`) is always run
  and printed; a failed check fails the export and removes the output.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lmwright.registry import Registry
from lmwright.utils.files import replace_dir

EXPORTERS = Registry("exporter", package="lmwright.export")


class ExportError(RuntimeError):
    """An export that cannot be done or did not pass parity; the message says why and how to fix it.

    (``lmwright.cli`` prints errors of this name without a traceback.)
    """


@dataclass
class Source:
    """The model to export, loaded once: the path it came from, its task, the tokenizer and metadata.

    ``model`` is the *merged*, plain transformers model in eval mode; ``reference`` holds what the
    source produced before merging (logits on the parity prompts), so parity compares the artefact
    with the model as it was trained (adapter and all), not with the merge.
    """

    path: Path
    task: str
    model: Any
    tokenizer: Any
    meta: dict[str, Any]
    reference: Any = None
    merged_from: str | None = None  # the adapter method folded in, if any


class Exporter(Protocol):
    name: str
    suffix: str  # "" for a folder artefact; ".gguf" for a single file inside the output folder

    def check(self, source_path: Path, meta: dict[str, Any], config: dict[str, Any], opts: dict[str, Any]
              ) -> None:
        """Raise ExportError if this format cannot represent the model (runs before loading weights)."""

    def write(self, src: Source, out_dir: Path, opts: dict[str, Any]) -> None:
        """Write the artefact into ``out_dir`` (a fresh temporary folder)."""

    def parity(self, src: Source, out_dir: Path, opts: dict[str, Any]) -> Any:
        """Compare the artefact in ``out_dir`` with ``src``; return a ``ParityReport``."""


@dataclass
class ExportResult:
    out_dir: Path
    format: str
    parity: Any
    files: list[str] = field(default_factory=list)


def export(model: str | Path, out: str | Path, fmt: str = "hf", overwrite: bool = False,
           log: Callable[[str], None] | None = print, **opts: Any) -> ExportResult:
    """Export the model at ``model`` (run, checkpoint, HF or adapter folder) to ``out`` as ``fmt``.

    ``opts`` are format options (``gguf_type`` for gguf, ``atol`` to override the parity tolerance).
    Returns the result with its parity report; raises ExportError (nothing left at ``out``) on failure.
    """
    from lmwright.export.parity import reference_outputs
    from lmwright.export.source import inspect_source, load_source, merge_model

    exporter = EXPORTERS.get(fmt)()
    out = Path(out)
    say = log or (lambda _msg: None)
    # -- checks: nothing is written before every one of them passed
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"output {out} already exists; pass --overwrite to replace it, or choose another --to")
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a folder; remove it or choose another --to")
    source_path, meta, config = inspect_source(model)
    exporter.check(source_path, meta, config, opts)
    src = load_source(model, meta)
    say(f"exporting {src.path} ({src.task}{', merged ' + src.merged_from if src.merged_from else ''}) "
        f"-> {out} [{fmt}]")
    src.reference = reference_outputs(src)  # computed before the merge replaced src.model
    src.model = merge_model(src)
    # -- write into a temporary sibling, check, then rename into place
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        exporter.write(src, tmp, opts)
        report = exporter.parity(src, tmp, opts)
        say(report.summary())
        if not report.ok:
            raise ExportError(f"parity check failed for the {fmt} export of {src.path}: {report.failure}. "
                              f"Nothing was written to {out}. {report.hint}".strip())
        replace_dir(tmp, out)  # fsynced, then renamed; an old export is swapped out, then deleted
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    say(f"wrote {out} ({len(files)} files)")
    return ExportResult(out_dir=out, format=fmt, parity=report, files=files)


__all__ = ["EXPORTERS", "ExportError", "ExportResult", "Exporter", "Source", "export"]
