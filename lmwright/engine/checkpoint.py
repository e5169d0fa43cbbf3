"""Checkpoint layout, atomic writes and exact resume: the one home of the checkpoint format.

``checkpoints/step-N/`` holds
  ``trainable.safetensors``  every trainable parameter (the resume truth; frozen weights are rebuilt)
  ``optimizer.pt``           optimizer state (tensors only; loaded with ``weights_only=True``)
  ``rng.pt`` / ``rng.json``  torch (+CUDA) RNG states / Python RNG state (of rank 0)
  ``rng-rankR.pt/.json``     the same for every other rank R of a data-parallel run
  ``trainer_state.json``     step, data position, scheduler step, best metric, patience counter
  ``model/``                 the model as the method saves it, so a checkpoint is also loadable

A checkpoint is written to ``.tmp-step-N``, every file fsynced, and renamed into place: a kill mid-save
leaves the previous checkpoint intact, and temp folders are ignored and cleaned on the next start. A
newest checkpoint that is corrupt anyway (a disk error, a copy cut short) is skipped with a warning by
:func:`load_latest_checkpoint`, which resumes from the newest good one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmwright.utils.files import fsync_path, fsync_tree
from lmwright.utils.logging import get_logger

STATE_FILE = "trainer_state.json"
log = get_logger("lmwright.engine")


class ResumeError(RuntimeError):
    """A resume was asked for but cannot continue exactly; never silently restart from step 0."""


class CorruptCheckpoint(ResumeError):
    """A checkpoint file cannot be read (truncated, garbled): an older checkpoint may still be good."""


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    out = [p for p in ckpt_dir.iterdir()
           if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).exists()]
    return sorted(out, key=lambda p: int(p.name.split("-")[1]))


def clean_temp(ckpt_dir: Path) -> None:
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    py = random.getstate()
    return tensors, {"python": [py[0], list(py[1]), py[2]]}


def set_rng_state(tensors: dict[str, torch.Tensor], py: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)
    v = py["python"]
    random.setstate((v[0], tuple(v[1]), v[2]))


def rng_files(rank: int) -> tuple[str, str]:
    return ("rng.pt", "rng.json") if rank == 0 else (f"rng-rank{rank}.pt", f"rng-rank{rank}.json")


def save_checkpoint(ckpt_dir: Path, step: int, model: torch.nn.Module, optimizer, state: dict[str, Any],
                    save_model: Callable[[Path], None] | None = None,
                    rng_states: list[tuple[dict, dict]] | None = None) -> Path:
    """Write ``step-N`` atomically (see the module docstring). ``rng_states``: every rank's
    :func:`rng_state` under data parallelism (rank 0 first); default: this process's."""
    from safetensors.torch import save_file

    final = ckpt_dir / f"step-{step}"
    tmp = ckpt_dir / f".tmp-step-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    for rank, (tensors, py) in enumerate(rng_states or [rng_state()]):
        pt, js = rng_files(rank)
        torch.save(tensors, tmp / pt)
        (tmp / js).write_text(json.dumps(py))
    if save_model is not None:
        save_model(tmp / "model")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))  # written last: marks completeness
    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(ckpt_dir)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, rank: int = 0) -> dict[str, Any]:
    """Restore parameters, optimizer and this rank's RNG states; return the trainer state.

    Every file is read before anything is restored, so a :class:`CorruptCheckpoint` leaves the model,
    optimizer and RNGs untouched (and an older checkpoint can be tried).
    """
    from safetensors.torch import load_file

    rng_pt, rng_js = rng_files(rank)
    if rank and not (path / rng_pt).exists():  # written before per-rank states were saved: rank 0's
        log.warning("%s has no RNG state of rank %d: it continues from rank 0's (dropout masks differ from an "
                    "uninterrupted run)", path, rank)
        rng_pt, rng_js = rng_files(0)
    need = ["trainable.safetensors", "optimizer.pt", rng_pt, rng_js, STATE_FILE]
    missing = [n for n in need if not (path / n).exists()]
    if missing:
        raise CorruptCheckpoint(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); "
                                f"delete it or pass train.resume=never to start over")
    reading = need[0]
    try:
        weights = load_file(str(path / reading))
        reading = "optimizer.pt"
        opt_state = torch.load(path / reading, weights_only=True, map_location="cpu")
        reading = rng_pt
        rng_tensors = torch.load(path / reading, weights_only=True)
        reading = rng_js
        rng_py = json.loads((path / reading).read_text())
        reading = STATE_FILE
        state = json.loads((path / reading).read_text())
        if not isinstance(state, dict) or "step" not in state or "position" not in state:
            raise ValueError("no step/position in it")
    except Exception as e:  # noqa: BLE001 - safetensors, pickle, zip and json each raise their own type
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt ({reading}: {type(e).__name__}: {e}); "
                                f"delete it or pass train.resume=never to start over") from None
    load_trainable(path, model, weights)
    optimizer.load_state_dict(opt_state)
    set_rng_state(rng_tensors, rng_py)
    return state


def load_trainable(path: Path, model: torch.nn.Module, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Copy a checkpoint's trainable parameters (``trainable.safetensors``, or ``weights`` already read from
    it) into ``model``; they must be exactly the model's trainable parameters."""
    if weights is None:
        from safetensors.torch import load_file

        weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        extra, lost = sorted(set(weights) - expected)[:3], sorted(expected - set(weights))[:3]
        raise ResumeError(f"checkpoint {path} does not match this model/method (unexpected {extra}, "
                          f"missing {lost}); resume with the config the run was started with")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def load_latest_checkpoint(ckpts: list[Path], model: torch.nn.Module, optimizer,
                           rank: int = 0) -> tuple[Path, dict[str, Any]]:
    """Resume from the newest of ``ckpts`` (oldest first) that reads back; a corrupt newer one is skipped
    with a warning. Raises the newest one's :class:`CorruptCheckpoint` if none is good."""
    first: CorruptCheckpoint | None = None
    for path in reversed(ckpts):
        try:
            return path, load_checkpoint(path, model, optimizer, rank)
        except CorruptCheckpoint as e:
            first = first or e
            log.warning("%s; trying the previous checkpoint", e)
    assert first is not None, "load_latest_checkpoint needs at least one checkpoint"
    raise first


def prune_checkpoints(ckpt_dir: Path, keep_last: int, keep: set[int]) -> None:
    ckpts = list_checkpoints(ckpt_dir)
    for p in ckpts[:-keep_last] if keep_last > 0 else ckpts:
        if int(p.name.split("-")[1]) not in keep:
            shutil.rmtree(p, ignore_errors=True)
