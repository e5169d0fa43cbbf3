"""Issue 13: ResumeError and TrainingDiverged print one clear line, not a traceback."""

from __future__ import annotations

import pytest

import lmwright.cli.validate as validate_cmd
from lmwright.cli import main


@pytest.mark.parametrize("exc, rc, text", [
    ("resume", 2, "error: checkpoint runs/x/checkpoints/step-4 is corrupt"),
    ("corrupt", 2, "error: checkpoint runs/x/checkpoints/step-4 is corrupt"),
    ("diverged", 1, "error: training diverged: step 5: loss=nan"),
])
def test_training_errors_print_one_line(monkeypatch, capsys, exc, rc, text):
    from lmwright.engine import TrainingDiverged
    from lmwright.engine.checkpoint import CorruptCheckpoint, ResumeError

    errors = {"resume": ResumeError, "corrupt": CorruptCheckpoint, "diverged": TrainingDiverged}
    message = {"diverged": "step 5: loss=nan grad_norm=nan is not finite"}.get(
        exc, "checkpoint runs/x/checkpoints/step-4 is corrupt (optimizer.pt: EOFError)")

    def boom(args):
        raise errors[exc](message)

    monkeypatch.setattr(validate_cmd, "run_validate", boom)
    assert main(["validate", "-c", "x.yaml"]) == rc
    err = capsys.readouterr().err
    assert err.startswith(text) and "Traceback" not in err and err.count("\n") == 1
