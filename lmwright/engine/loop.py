"""The one training loop. Every stage calls :func:`train` with its model, data, collate function and
objective; online stages (ppo, grpo) pass a batch source whose ``get(position)`` makes rollouts, and get
the same optimizer stepping, checkpointing, resume and metrics.

Loss normalisation: an objective returns a *sum* over target units plus their count. Gradients of
the sums are accumulated over all micro-batches of an optimizer step and then divided by the total
number of target units in that step across all processes, so ``k`` micro-batches of ``b`` equal one
batch of ``k*b`` exactly, whatever the padding or packing.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from lmwright.engine.checkpoint import (
    ResumeError,
    clean_temp,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    load_trainable,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lmwright.engine.config import TrainConfig
from lmwright.engine.run import Run
from lmwright.engine.schedule import lr_factor
from lmwright.objectives.base import LossOutput, keeps_output_dtype
from lmwright.utils.logging import get_logger

log = get_logger("lmwright.engine")


class Objective(Protocol):
    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput: ...


class TrainingDiverged(RuntimeError):
    """Loss or gradients became NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run: Run
    step: int
    last_metrics: dict[str, float] = field(default_factory=dict)
    eval_history: list[dict[str, float]] = field(default_factory=list)
    best_metric: float | None = None
    best_step: int | None = None
    interrupted: bool = False
    stopped_early: bool = False
    train_seconds: float = 0.0
    tokens_seen: int = 0


# ------------------------------------------------------------------------------------ optimizer
def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in n.lower() or n.endswith(".bias") else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters: check method.name and its options")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8)


def set_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int, total: int) -> float:
    lr = cfg.lr * lr_factor(step, cfg.warmup_steps, total, cfg.scheduler, cfg.min_lr_ratio)
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr


def make_accelerator(cfg: TrainConfig, model: torch.nn.Module | None = None):
    """The accelerator of a run; ``mixed_precision: auto`` decides on ``model`` (utils.hardware)."""
    from accelerate import Accelerator

    from lmwright.utils.hardware import choose_mixed_precision

    mp = choose_mixed_precision(cfg.mixed_precision, model)
    _allow_new_precision(mp)
    return Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())


def _allow_new_precision(mp: str) -> None:
    """accelerate keeps one process-wide state and refuses a second Accelerator with another
    precision. In a single process (the Python API, `lmwright compare`, tests) stages may ask for
    different precisions one after the other: drop the old state then. Never under a launcher."""
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mp) and PartialState().num_processes == 1:
        AcceleratorState._reset_state()


# ---------------------------------------------------------------------------------------- data
class MicroBatches:
    """Deterministic micro-batch order: a seeded permutation per epoch, sharded across processes.

    ``position`` counts micro-batches consumed by this process; it is all a resume needs.
    """

    def __init__(self, data: Sequence, collate: Callable, micro: int, seed: int, rank: int = 0, world: int = 1):
        self.data, self.collate, self.micro, self.seed = data, collate, micro, seed
        self.rank, self.world = rank, world
        self.per_epoch = len(data) // (micro * world)
        if self.per_epoch < 1:
            raise ValueError(f"only {len(data)} training examples for a micro-batch of {micro} x {world} "
                             f"process(es): add data or lower train.micro_batch_size")
        self._perm_epoch, self._perm = -1, None

    def get(self, position: int) -> dict[str, Any]:
        epoch, j = divmod(position, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(len(self.data), generator=g).tolist()
            self._perm_epoch = epoch
        start = (j * self.world + self.rank) * self.micro
        return self.collate([self.data[i] for i in self._perm[start:start + self.micro]])


def batch_to(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def count_tokens(batch: dict[str, Any]) -> int | torch.Tensor:
    if "num_tokens" in batch:
        return batch["num_tokens"]
    if "attention_mask" in batch and batch["attention_mask"] is not None:
        return batch["attention_mask"].sum()
    ids = batch.get("input_ids")
    return ids.numel() if isinstance(ids, torch.Tensor) else 0


# ------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate_loss(model, objective: Objective, data: Sequence, collate: Callable, micro: int,
                  device, max_batches: int | None = None, prefix: str = "val_") -> dict[str, float]:
    """Target-weighted mean loss (and objective metrics) over ``data``."""
    was_training = model.training
    model.eval()
    loss_sum, n, sums, means, nb = 0.0, 0.0, {}, {}, 0
    for b, start in enumerate(range(0, len(data), micro)):
        if max_batches is not None and b >= max_batches:
            break
        batch = batch_to(collate([data[i] for i in range(start, min(start + micro, len(data)))]), device)
        out = objective(model, batch)
        loss_sum += float(out.loss_sum)
        n += float(out.n_targets)
        for k, v in out.metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        for k, v in out.means.items():
            means[k] = means.get(k, 0.0) + float(v)
        nb += 1
    model.train(was_training)
    res = {f"{prefix}loss": loss_sum / max(n, 1.0)}
    res.update({f"{prefix}{k}": v / max(n, 1.0) for k, v in sums.items()})
    res.update({f"{prefix}{k}": v / max(nb, 1) for k, v in means.items()})
    return res


# ----------------------------------------------------------------------------------- interrupts
class _StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM (preemption, ``kill``, a scheduler's time limit) asks the loop to save a
    checkpoint at the end of the current step and stop; a second signal aborts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.stop = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers at all
                break
        return self

    def _handle(self, signum, frame) -> None:
        if self.stop:  # a second signal: give up immediately
            raise KeyboardInterrupt
        self.stop = True
        log.warning("%s received: saving a checkpoint at the end of this step (again to abort)",
                    signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ------------------------------------------------------------------------------------- the loop
def total_steps(cfg: TrainConfig, n_examples: int, world: int = 1) -> int:
    if cfg.epochs:
        per_epoch = max(1, n_examples // (cfg.micro_batch_size * world * cfg.grad_accum))
        return max(1, math.ceil(cfg.epochs * per_epoch))
    return cfg.max_steps


def train(model: torch.nn.Module, train_data: Sequence, collate: Callable, objective: Objective,
          cfg: TrainConfig, run: Run, val_data: Sequence | None = None,
          evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
          save_model: Callable[[torch.nn.Module, Path], None] | None = None,
          flops_per_token: float | None = None, accelerator=None,
          derive_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None,
          on_log: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ``model`` until ``cfg.max_steps`` (or ``cfg.epochs``); see the module docstring."""
    acc = accelerator or make_accelerator(cfg, model)
    device = acc.device
    world, rank = acc.num_processes, acc.process_index
    run.is_main = acc.is_main_process
    torch.manual_seed(cfg.seed + rank)

    model = model.to(device)
    model.train()
    optimizer = build_optimizer(model, cfg)
    steps = total_steps(cfg, len(train_data), world)
    # an online stage (ppo, grpo) passes its own batch source: ``get(position)`` makes rollouts as needed
    data = train_data if hasattr(train_data, "get") else \
        MicroBatches(train_data, collate, cfg.micro_batch_size, cfg.seed, rank, world)

    # ---- resume
    start_step, position, best, best_step, bad_evals, eval_history = 0, 0, None, None, 0, []
    clean_temp(run.checkpoints)
    ckpts = list_checkpoints(run.checkpoints)
    resume_from: Path | None = None
    state: dict | None = None
    if cfg.resume in ("auto", "force"):  # force: the run folder accepted a changed config (Run.start)
        if ckpts:  # the newest checkpoint that reads back (a corrupt newer one is skipped with a warning)
            resume_from, state = load_latest_checkpoint(ckpts, model, optimizer, rank)
    elif cfg.resume == "never":
        if ckpts and run.is_main:
            raise ResumeError(f"{run.dir} already has checkpoints ({ckpts[-1].name}); use a new train.run_name "
                              f"or train.resume=auto to continue it")
    else:
        resume_from = Path(cfg.resume)
        if not (resume_from / "trainer_state.json").exists():
            raise ResumeError(f"train.resume={cfg.resume}: not a checkpoint folder (no trainer_state.json)")
    if resume_from is not None:
        if state is None:
            state = load_checkpoint(resume_from, model, optimizer, rank)
        if state.get("world", 1) != world or state.get("micro_batch_size") != cfg.micro_batch_size \
                or state.get("grad_accum") != cfg.grad_accum:
            raise ResumeError(f"{resume_from} was written with world={state.get('world')}, micro_batch_size="
                              f"{state.get('micro_batch_size')}, grad_accum={state.get('grad_accum')}; resume "
                              f"needs the same values to continue exactly")
        start_step, position = state["step"], state["position"]
        best, best_step, bad_evals = state.get("best"), state.get("best_step"), state.get("bad_evals", 0)
        eval_history = state.get("eval_history", [])
        if run.is_main:
            _truncate_metrics(run, start_step)
        log.info("resumed from %s (step %d)", resume_from, start_step)

    fwd_model = model
    if cfg.compile:
        fwd_model = torch.compile(model)
    rng = rng_state()  # as seeded or restored: what runs from here to the loop (DDP set-up, the FLOP/s probe)
    # must not draw from it, or a resumed run's dropout masks differ from an uninterrupted run's
    fwd_model, optimizer = acc.prepare(fwd_model, optimizer)
    if world > 1:  # DDP wraps the module; keep `model` as the bare one for saving
        model = acc.unwrap_model(fwd_model)
        if cfg.compile:
            model = getattr(model, "_orig_mod", model)

    native_forward = _native_forward(fwd_model) if keeps_output_dtype(objective) else None
    peak = None
    if flops_per_token:
        from lmwright.utils.hardware import peak_flops

        peak, how = peak_flops("bf16" if acc.mixed_precision == "bf16" else "fp32")
        run.write_info(peak_flops=peak, peak_flops_source=how)
    if cfg.mixed_precision == "auto":
        from lmwright.utils.hardware import probe_decides
        from lmwright.utils.precision import bf16_probe

        if probe_decides():  # the figures auto went by (measured earlier in this process or cached)
            run.write_info(precision_probe=bf16_probe(model))
    run.write_info(total_steps=steps, world_size=world, mixed_precision=acc.mixed_precision,
                   global_batch=cfg.micro_batch_size * cfg.grad_accum * world)

    tb = _tensorboard(run) if cfg.tensorboard and run.is_main else None
    result = TrainResult(run=run, step=start_step, eval_history=eval_history, best_metric=best, best_step=best_step)
    greater = cfg.best_is_greater()
    params = [p for p in model.parameters() if p.requires_grad]
    progress = _progress(cfg, steps, start_step, run.is_main, run.stage)
    t_log, tok_log, t_start = time.perf_counter(), 0, time.perf_counter()
    acc_loss = torch.zeros((), device=device)
    acc_n = torch.zeros((), device=device)
    acc_tok = torch.zeros((), device=device)
    acc_metrics: dict[str, torch.Tensor] = {}
    last_ckpt = ckpts[-1] if ckpts else None

    def checkpoint(step: int) -> Path | None:
        nonlocal last_ckpt
        rngs = None
        if world > 1:  # every rank's RNG (dropout, masking): a resume continues each rank exactly
            from accelerate.utils import gather_object

            rngs = gather_object([rng_state()])
        if run.is_main:
            st = {"step": step, "position": position, "best": best, "best_step": best_step,
                  "bad_evals": bad_evals, "eval_history": result.eval_history, "world": world,
                  "micro_batch_size": cfg.micro_batch_size, "grad_accum": cfg.grad_accum,
                  "metric_for_best": cfg.metric_for_best}
            saver = (lambda d: save_model(model, d)) if save_model else None
            last_ckpt = save_checkpoint(run.checkpoints, step, model, optimizer, st, saver, rngs)
            prune_checkpoints(run.checkpoints, cfg.keep_last, {best_step} if best_step is not None else set())
        acc.wait_for_everyone()
        return last_ckpt

    step = start_step
    set_rng_state(*rng)
    with _StopFlag() as stop:
        while step < steps:
            lr = set_lr(optimizer, cfg, step, steps)
            step_loss = torch.zeros((), device=device)
            step_n = torch.zeros((), device=device)
            step_sums: dict[str, torch.Tensor] = {}
            for micro in range(cfg.grad_accum):
                batch = batch_to(data.get(position), device)
                position += 1
                ntok = count_tokens(batch)
                sync = micro == cfg.grad_accum - 1
                ctx = acc.no_sync(fwd_model) if (world > 1 and not sync) else _null()
                with ctx, acc.autocast(), _forward_as(fwd_model, native_forward):
                    out = objective(fwd_model, batch)
                    acc.backward(out.loss_sum.float())
                step_loss += out.loss_sum.detach().float()
                step_n += torch.as_tensor(out.n_targets, device=device, dtype=torch.float32)
                acc_tok += torch.as_tensor(ntok, device=device, dtype=torch.float32)
                for k, v in out.metrics.items():
                    step_sums[k] = step_sums.get(k, 0.0) + v.detach().float()
                for k, v in out.means.items():
                    acc_metrics[k] = acc_metrics.get(k, 0.0) + v.detach().float() / cfg.grad_accum
            n_global = acc.reduce(step_n.clone(), "sum") if world > 1 else step_n
            for k, v in step_sums.items():  # sums over targets -> per-target means of this step
                v = acc.reduce(v.clone(), "sum") if world > 1 else v
                acc_metrics[k] = acc_metrics.get(k, 0.0) + v / n_global.clamp(min=1.0)
            # DDP already averaged gradients over processes: undo that, divide by all targets.
            scale = float(world) / n_global.clamp(min=1.0)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.dtype))
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            loss_global = (acc.reduce(step_loss.clone(), "sum") if world > 1 else step_loss) / n_global.clamp(min=1.0)
            if not bool(torch.isfinite(grad_norm) & torch.isfinite(loss_global)):  # one host sync per step
                optimizer.zero_grad(set_to_none=True)
                where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else ""
                raise TrainingDiverged(
                    f"step {step + 1}: loss={float(loss_global):.4g} grad_norm={float(grad_norm):.4g} is not "
                    f"finite{where}. Lower train.lr, raise train.warmup_steps or check the data.")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            acc_loss += loss_global.detach()
            acc_n += 1
            result.step = step

            if step % cfg.log_every == 0 or step == steps:
                now = time.perf_counter()
                tokens = float(acc.reduce(acc_tok.clone(), "sum") if world > 1 else acc_tok)
                tok_s = (tokens - tok_log) / max(now - t_log, 1e-9)
                rec = {"step": step, "loss": float(acc_loss / acc_n), "lr": lr, "grad_norm": float(grad_norm),
                       "tokens_per_s": tok_s, "tokens": tokens, "elapsed_s": now - t_start,
                       "peak_mem_mb": _peak_mem()}
                for k, v in acc_metrics.items():
                    rec[k] = float(v) / float(acc_n)
                if peak and flops_per_token:
                    rec["mfu"] = flops_per_token * tok_s / peak
                run.log_metrics(rec)
                if tb:
                    for k, v in rec.items():
                        tb.add_scalar(f"train/{k}", v, step)
                if on_log:
                    on_log(rec)
                progress.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                result.last_metrics = rec
                t_log, tok_log = now, tokens
                acc_loss.zero_()
                acc_n.zero_()
                acc_metrics.clear()
            progress.update(1)

            do_eval = (cfg.eval_every and step % cfg.eval_every == 0) or step == steps
            improved = False
            if do_eval and (val_data is not None or evaluate is not None):
                metrics: dict[str, float] = {}
                if val_data is not None and len(val_data):
                    metrics.update(evaluate_loss(fwd_model, objective, val_data, collate, cfg.micro_batch_size,
                                                 device, cfg.eval_max_batches))
                if evaluate is not None:
                    metrics.update(evaluate(model))
                if derive_metrics is not None:
                    metrics.update(derive_metrics(metrics))
                metrics["step"] = step
                result.eval_history.append(metrics)
                run.log_metrics({"step": step, **{k: v for k, v in metrics.items() if k != "step"}})
                if tb:
                    for k, v in metrics.items():
                        tb.add_scalar(f"eval/{k}", v, step)
                if on_log:
                    on_log(metrics)
                val = metrics.get(cfg.metric_for_best)
                if val is not None and math.isfinite(val):
                    if best is None or (val > best if greater else val < best):
                        best, best_step, bad_evals, improved = val, step, 0, True
                        result.best_metric, result.best_step = best, best_step
                    else:
                        bad_evals += 1
                progress.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                             if k != "step"))
            stop_early = cfg.early_stopping_patience > 0 and bad_evals >= cfg.early_stopping_patience
            stop_now = stop.stop
            if world > 1:  # a signal may reach the ranks in different steps: they stop together
                stop_now = bool(acc.reduce(torch.tensor(float(stop_now), device=device), "sum") > 0)
            if improved or (cfg.save_every and step % cfg.save_every == 0) or step == steps or stop_now \
                    or stop_early:
                checkpoint(step)
            if stop_now:
                result.interrupted = True
                log.warning("stopped at step %d; checkpoint %s. To resume, run the same command again (it "
                            "continues the newest unfinished run of this config) or add train.run_name=%s",
                            step, last_ckpt, run.dir.name)
                break
            if stop_early:
                result.stopped_early = True
                progress.write(f"early stopping at step {step}: {cfg.metric_for_best} has not improved for "
                               f"{bad_evals} evaluations (best {best:.4g} at step {best_step})")
                break
    progress.close()
    if tb:
        tb.close()
    result.train_seconds = time.perf_counter() - t_start
    result.tokens_seen = int(float(acc_tok))
    if cfg.load_best_at_end and best_step is not None and best_step != step and not result.interrupted:
        best_dir = run.checkpoints / f"step-{best_step}"
        if best_dir.exists():
            load_trainable(best_dir, model)
            log.info("loaded the best checkpoint (step %d, %s=%.4g)", best_step, cfg.metric_for_best, best)
    run.write_info(final_step=step, best_step=best_step, best_metric=best, interrupted=result.interrupted,
                   stopped_early=result.stopped_early, train_seconds=result.train_seconds)
    return result


def _native_forward(fwd_model):
    """The forward under accelerate's mixed-precision wrapper (autocast + a cast of every output to fp32), or
    None where there is none (no mixed precision). The training step runs the objective under ``acc.autocast()``
    itself, so for an objective that keeps the outputs' dtype (``objectives.base.keeps_output_dtype``) the bare
    forward computes the same thing without the fp32 copy of the logits."""
    bare = getattr(fwd_model, "module", fwd_model)  # DDP wraps the module whose forward accelerate patched
    return bare.__dict__.get("_original_forward")


class _forward_as:
    """Within the block, ``fwd_model``'s (inner) module runs ``forward`` instead of its own (None: unchanged)."""

    def __init__(self, fwd_model, forward) -> None:
        self.bare, self.forward, self.saved = getattr(fwd_model, "module", fwd_model), forward, None

    def __enter__(self):
        if self.forward is not None:
            self.saved = self.bare.__dict__.get("forward")
            self.bare.forward = self.forward

    def __exit__(self, *exc):
        if self.forward is not None:
            if self.saved is None:
                del self.bare.forward
            else:
                self.bare.forward = self.saved
        return False


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _peak_mem() -> float:
    from lmwright.utils.hardware import peak_memory_mb

    return peak_memory_mb()


def _truncate_metrics(run: Run, step: int) -> None:
    import json

    f = run.metrics_file
    if not f.exists():
        return
    keep = [line for line in f.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    f.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def _progress(cfg: TrainConfig, total: int, initial: int, is_main: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not (cfg.progress and is_main), desc=desc,
                unit="step", dynamic_ncols=True)


def _tensorboard(run: Run):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("train.tensorboard=true but tensorboard is not installed: pip install tensorboard")
        return None
    return SummaryWriter(str(run.dir / "tensorboard"))
