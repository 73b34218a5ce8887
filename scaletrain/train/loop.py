"""The training loop: steps to train.max_steps with the log line, TensorBoard scalars, evaluation, checkpoints,
growth boundaries, early stopping and stop requests; `train()` is a whole run, from the run lock to shutdown.

The state it drives (engine, data position, lineage, resume) lives in trainer.py's `Trainer`.
"""

from __future__ import annotations

import math
import time

import torch

from scaletrain import __version__
from scaletrain.config import Config
from scaletrain.dtypes import DTYPES
from scaletrain.growth.in_run import grow
from scaletrain.kernels import cpu_matmul
from scaletrain.train import init_from
from scaletrain.train.distributed import all_reduce_sum, any_rank, barrier, collectives_status, shutdown
from scaletrain.train.metrics import Metrics, ThroughputWindow, format_duration, measure_peak_flops
from scaletrain.train.run_dir import RunLock, launch_info
from scaletrain.train.schedule import train_lr_at
from scaletrain.train.trainer import Trainer


def _already_over(tr: Trainer) -> dict | None:
    """The same command again after the run ended: status and TensorBoard stay as they are."""
    t = tr.cfg.train
    if tr.step >= t.max_steps:
        tr.log(f"run.dir {tr.run.path} has finished: step {tr.step} of train.max_steps {t.max_steps}, nothing "
               "to train (raise train.max_steps to train on, or use a new run.dir)")
        return {"state": "finished", "step": tr.step, "consumed_tokens": tr.tokens_seen}
    if tr.early_stop.stopped():
        tr.log(f"run.dir {tr.run.path} stopped early at step {tr.step}: {tr.early_stop.metric} did not improve "
               f"for {tr.early_stop.bad} evaluations (raise train.early_stop_patience to train on, or use a new run.dir)")
        return {"state": "early_stopped", "step": tr.step, "consumed_tokens": tr.tokens_seen}
    return None


def _peak_units(tr: Trainer) -> tuple[int, str]:
    """What one train.peak_flops figure describes: a GPU, or a CPU machine (its ranks split its cores, so a
    figure per CPU rank would change with the rank count)."""
    d = tr.dist
    if d.device.type == "cpu":
        return max(1, d.world // max(1, d.local_world)), "CPU machine(s)"
    return d.world, "GPU(s)"


def _peak_flops(tr: Trainer) -> float:
    """The FLOP/s of all ranks together that train/mfu divides by: train.peak_flops x GPUs (or CPU machines), or
    measured now."""
    t, d = tr.cfg.train, tr.dist
    if t.peak_flops:
        return t.peak_flops * _peak_units(tr)[0]
    barrier()  # ranks sharing a CPU's cores measure together: one alone would find idle cores and a peak too high
    return all_reduce_sum([measure_peak_flops(DTYPES[t.precision], d.device)])[0]


def _announce(tr: Trainer, n_params: int, peak: float) -> None:
    """The start-up lines: what runs where, the precision chosen, TensorBoard, the CPU kernels."""
    cfg, t, d = tr.cfg, tr.cfg.train, tr.dist
    tr.log(f"scaletrain {__version__} | {d.world} rank(s) on {d.device.type} | {n_params / 1e6:.2f}M params | "
           f"ZeRO-{cfg.zero.stage} {t.precision} | {tr.global_batch * t.seq_len:,} tokens/step | run.dir {tr.run.path}")
    if tr.precision_note:
        tr.log(tr.precision_note)
    if t.lr_schedule != "constant" and t.warmup_steps and tr.step == 0 and \
            train_lr_at(t.max_steps - 1, t) > t.min_lr:  # the last step would be warmup's
        tr.log(f"warning: train.warmup_steps {t.warmup_steps} >= train.max_steps - 1 ({t.max_steps - 1}): the lr rises "
               f"for the whole run and never decays to train.min_lr (lower train.warmup_steps)")
    tr.log(f"TensorBoard: tensorboard --logdir {tr.run.path.parent}")
    # said so that a later run can pass the same figure (train.peak_flops) and keep its MFU comparable
    units, what = _peak_units(tr)
    source = "train.peak_flops" if t.peak_flops else f"measured now; train.peak_flops={peak / units:.4g} reuses it"
    tr.log(f"MFU peak: {peak / 1e12:.4g} TFLOP/s over {units} {what} in {t.precision} ({source})")
    if d.device.type == "cpu":  # every rank loads them here (built once, under a lock), not mid-step
        tr.log(f"CPU kernels: {cpu_matmul.kernels_status()} | collectives: {collectives_status()}")


def _log_step(tr: Trainer, metrics: Metrics, loss: float, tps: float, step_s: float, fpt: float, peak: float,
              n_params: int, elapsed: float) -> None:
    """The step line and the train/* scalars (tokens/s and MFU over the steps since the last line)."""
    t = tr.cfg.train
    lr = train_lr_at(tr.step - 1, t, *tr.lr_restarts)  # the lr this step used
    grad_norm = tr.grad_norm()
    tr.log(f"step {tr.step:>6}/{t.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
           f"grad {grad_norm if grad_norm is not None else float('nan'):.3f} | {tps:,.0f} tok/s | "
           f"{format_duration(elapsed)}")
    metrics.scalars(tr.step, {
        "train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
        "train/tokens_per_sec": tps, "train/mfu": tps * fpt / peak,
        "train/consumed_tokens": tr.tokens_seen,
        "train/step_time_s": step_s, "train/model_params": n_params,
        "train/skipped_steps": tr.guard.total,
    })


def _evaluate(tr: Trainer, metrics: Metrics) -> tuple[float | None, bool]:
    """val/* scalars and the line; returns (val loss, whether early stopping ends the run now)."""
    val_loss = tr.evaluate()
    if val_loss is None:
        return None, False
    acc = "".join(f" | val {k[4:]} {v:.4f}" for k, v in tr.val_metrics.items() if k in ("val/accuracy", "val/f1"))
    acc += "".join(f" | {k[4:-5]} {v:.4f}" for k, v in tr.val_metrics.items() if k.endswith("/loss") and k.count("/") == 2)
    tr.log(f"step {tr.step:>6} | val loss {val_loss:.4f} | val ppl {math.exp(min(val_loss, 50)):.2f}{acc}")
    metrics.scalars(tr.step, tr.val_metrics)
    return val_loss, tr.early_stop.update(tr.val_metrics)  # same metrics on every rank: same decision


def fit(tr: Trainer) -> dict:
    """Train from the trainer's step to train.max_steps (or a stop request / early stop); returns the summary that
    status.json gets."""
    over = _already_over(tr)
    if over is not None:
        return over
    t, d = tr.cfg.train, tr.dist
    n_params, fpt = tr.sizes()
    tokens_per_step = tr.global_batch * t.seq_len
    peak = _peak_flops(tr)
    _announce(tr, n_params, peak)
    passed = [at for at in tr.mix_phase_lines if at <= tr.step]
    if passed:  # a resume inside a later data.mix phase: the weights it goes on with
        tr.log(tr.mix_phase_lines[max(passed)])
    metrics = Metrics(tr.run.tb if d.is_main else None, purge_step=tr.step + 1)  # +1 also on a fresh start: drops a crashed first attempt's events
    if d.is_main:
        # a resumed run's file held the last start's summary: its loss and seconds must not pass for this start's
        tr.run.write_status(state="running", step=tr.step, max_steps=t.max_steps, world_size=d.world,
                            local_ranks=d.local_world, loss=None, val_loss=None, seconds=None,
                            consumed_tokens=tr.tokens_seen, **launch_info())  # host/pid, SLURM job id + restart count
    start_time, window = time.time(), ThroughputWindow()
    last_loss, val_loss, state = math.nan, None, "finished"
    first = tr.step + 1  # the first step of a start (or after growth) is logged alone: it warms up
    try:
        while tr.step < t.max_steps:
            if tr.growth.due(tr.stage, tr.step):
                grow(tr, metrics)
                n_params, fpt = tr.sizes()
                first, window = tr.step + 1, ThroughputWindow()  # the old model's steps must not mix in
            step_t0, early = time.time(), False
            last_loss = tr.train_step()
            if d.device.type == "cuda":  # the optimizer step and ZeRO's gathers are still queued on the GPU
                torch.cuda.synchronize(d.device)
            step_s = time.time() - step_t0
            if tr.step in tr.mix_phase_lines:  # (said when the last step of the old weights is done)
                tr.log(tr.mix_phase_lines[tr.step])
            window.add(tokens_per_step, step_s)
            if tr.step % t.log_every == 0 or tr.step == first or tr.step == t.max_steps:
                _log_step(tr, metrics, last_loss, window.take(), step_s, fpt, peak, n_params, time.time() - start_time)
            elif tr.last_skipped:
                metrics.scalars(tr.step, {"train/skipped_steps": tr.guard.total})
            if t.eval_every and (tr.step % t.eval_every == 0 or tr.step == t.max_steps):
                val_loss, early = _evaluate(tr, metrics)
            stopping = any_rank(tr.stop.requested)
            path = None
            if stopping or early or tr.step == t.max_steps or (t.save_every and tr.step % t.save_every == 0):
                path = tr.save()
                if path is not None:
                    tr.log(f"saved checkpoint {path}")
                    if d.is_main:  # where a reader of status.json finds the run now, not only at its start and end
                        tr.run.write_status(step=tr.step, loss=last_loss, val_loss=val_loss, consumed_tokens=tr.tokens_seen,
                                            seconds=round(time.time() - start_time, 1))
            if stopping and tr.step < t.max_steps:  # (a stop at the last step ends the run as finished)
                state = "preempted"
                saved = f"{'checkpointed' if path is not None else 'could not checkpoint (see above)'} at step {tr.step}"
                tr.log(f"stop requested by signal: {saved}, exiting cleanly")
                break
            if early:
                state = "early_stopped"
                e = tr.early_stop
                tr.log(f"early stop: {e.metric} did not improve on {e.best:.4f} for {e.patience} evaluations")
                break
    except BaseException:
        if d.is_main:
            tr.run.write_status(state="failed", step=tr.step, loss=last_loss)  # (not the last checkpoint's loss)
        raise
    finally:
        metrics.close()
    summary = {"state": state, "step": tr.step, "loss": last_loss, "val_loss": val_loss,
               "consumed_tokens": tr.tokens_seen, "seconds": round(time.time() - start_time, 1)}
    if d.is_main:
        tr.run.write_status(**summary)
    return summary


def train(cfg: Config) -> dict:
    """One start of a run: lock run.dir, build the trainer (resuming where a checkpoint is), fit, shut down."""
    lock = RunLock(cfg.run.dir)
    try:
        try:
            trainer = Trainer(cfg, lock)
        except BaseException:
            lock.release(failed_start=True)
            init_from.release_pinned()  # (a process that lives on -- a notebook, tests -- must not hold the parent's tag)
            raise
        try:
            summary = fit(trainer)
        finally:
            trainer.engine.destroy() if hasattr(trainer.engine, "destroy") else None
    finally:
        lock.release()
    shutdown()  # reached by every rank of a run that ended normally (a failing rank raises instead)
    return summary
