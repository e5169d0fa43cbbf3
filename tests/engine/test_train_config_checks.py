"""Issue 13: `validate` refuses train values that would crash or silently misbehave later."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmwright.cli import main
from lmwright.config import ConfigError

CLM = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "clm.yaml"


@pytest.mark.parametrize("override, field", [
    ("train.keep_last=0", "keep_last"),
    ("train.log_every=0", "log_every"),
    ("train.lr=nan", "lr"),
    ("train.lr=inf", "lr"),
    ("train.weight_decay=nan", "weight_decay"),
    ("train.max_grad_norm=-1", "max_grad_norm"),
    ("train.epochs=-1", "epochs"),
    ("train.epochs=inf", "epochs"),
    ("train.betas=[0.9]", "betas"),
    ("train.betas=[0.9,1.5]", "betas"),
    ("train.betas=[-0.1,0.9]", "betas"),
    ("train.warmup_steps=-5", "warmup_steps"),
    ("train.min_lr_ratio=2", "min_lr_ratio"),
])
def test_validate_refuses_bad_train_values(override, field, capsys):
    assert main(["validate", "-c", str(CLM), override]) == 2
    err = capsys.readouterr().err
    assert f"train.{field}" in err and "Traceback" not in err


def test_good_train_values_still_pass():
    from lmwright.engine import TrainConfig

    TrainConfig(keep_last=1, log_every=1, epochs=0.5, betas=[0.0, 0.999], max_grad_norm=0.0).check()
    with pytest.raises(ConfigError, match="keep_last"):
        TrainConfig(keep_last=0).check()
