"""Issue 13: `lmwright demo --workdir X` never deletes a folder the demo did not create."""

from __future__ import annotations

import pytest

from lmwright.cli import main
from lmwright.config import ConfigError


def _precious(folder):
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work", encoding="utf-8")
    return folder


@pytest.mark.parametrize("extra", [[], ["--model", "missing-model.gguf"]])
def test_demo_refuses_a_foreign_nonempty_workdir(tmp_path, capsys, extra):
    work = _precious(tmp_path / "home")
    rc = main(["demo", "--quick", "--workdir", str(work), *extra])
    assert rc == 2
    assert (work / "thesis.tex").read_text(encoding="utf-8") == "years of work"
    err = capsys.readouterr().err
    assert "not created by `lmwright demo`" in err and "Traceback" not in err


def test_prepare_workdir_replaces_only_its_own(tmp_path):
    from lmwright.demo import WORKDIR_MARKER, prepare_workdir

    work = tmp_path / "d"
    prepare_workdir(work, overwrite=True)  # new folder: created with the marker
    assert (work / WORKDIR_MARKER).is_file()
    (work / "old-run.txt").write_text("x")
    prepare_workdir(work, overwrite=False)  # an earlier demo's folder, kept
    assert (work / "old-run.txt").exists()
    prepare_workdir(work, overwrite=True)  # an earlier demo's folder, replaced
    assert not (work / "old-run.txt").exists() and (work / WORKDIR_MARKER).is_file()

    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_workdir(empty, overwrite=True)  # an empty folder is fine to use
    assert (empty / WORKDIR_MARKER).is_file()

    foreign = _precious(tmp_path / "foreign")
    for overwrite in (True, False):
        with pytest.raises(ConfigError, match="not created by"):
            prepare_workdir(foreign, overwrite=overwrite)
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        prepare_workdir(a_file, overwrite=True)
    assert a_file.read_text() == "x"
