"""The training loop: data -> DeepSpeed engine -> optimizer steps, with eval, checkpoints, resume, metrics.

Re-running the same command on the same run.dir resumes from its newest verified checkpoint; that is
all a requeued SLURM job needs. SIGUSR1/SIGTERM ask for a checkpoint at the next step boundary and a
clean exit (status "preempted").
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as tdist

from scaletrain import __version__
from scaletrain.config import Config, deepspeed_config
from scaletrain.data.prepare import find_cache, open_cache, prepare_data
from scaletrain.data.sampler import WindowStream, eval_window_ids, micro_batch_ids
from scaletrain.errors import UserError
from scaletrain.model.llama import LlamaForCausalLM, LlamaShape
from scaletrain.train import checkpoint
from scaletrain.train.distributed import Dist, all_reduce_sum, any_rank, barrier, setup
from scaletrain.train.metrics import Metrics, flops_per_token, format_duration, measure_peak_flops
from scaletrain.train.run_dir import RunDir
from scaletrain.train.schedule import WarmupCosine, lr_at

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class StopFlag:
    """Set by SIGUSR1/SIGTERM; read at step boundaries (a handler must not checkpoint mid-collective)."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.requested = True


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (norm gains are not decayed)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    t = cfg.train
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)


def load_data(cfg: Config, dist: Dist):
    """Rank 0 builds the cache when missing; the others wait for it, then everyone opens it."""
    if dist.is_main:
        cache = prepare_data(cfg, progress=True)
    barrier()
    if not dist.is_main:
        cache = open_cache(find_cache(cfg)[0])
    return cache


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run = RunDir(cfg.run.dir)
        self.run.preflight(cfg)
        self.dist = setup(cfg.train.threads)
        self.log = print if self.dist.is_main else (lambda *a, **k: None)
        cache = load_data(cfg, self.dist)
        t = cfg.train
        self.train_stream = WindowStream(cache.tokens("train"), t.seq_len, t.seed, "train")
        val_tokens = cache.tokens("val")
        self.val_stream = WindowStream(val_tokens, t.seq_len, t.seed, "val") if len(val_tokens) > t.seq_len else None
        self.ds_config = deepspeed_config(cfg, self.dist.world)
        if self.dist.is_main:
            self.run.write_start(cfg, self.ds_config)
            (self.run.path / "pids").mkdir(exist_ok=True)
        barrier()
        (self.run.path / "pids" / f"rank{self.dist.rank}.pid").write_text(str(os.getpid()))
        self.shape = LlamaShape.from_config(cfg.model)
        self.engine = self._build_engine()
        self.step, self.consumed = 0, 0
        self._grad_norm: float | None = None
        self.resumed_from = self._resume()

    def _build_engine(self):
        import deepspeed

        torch.manual_seed(self.cfg.train.seed)  # identical init on every rank and every ZeRO stage
        model = LlamaForCausalLM(self.shape)
        optimizer = build_optimizer(model, self.cfg)
        t = self.cfg.train
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config,
            lr_scheduler=lambda opt: WarmupCosine(opt, t.lr, t.min_lr, t.warmup_steps, t.max_steps),
        )
        return engine

    def _resume(self) -> str | None:
        tag = [checkpoint.find_resumable(self.run.checkpoints, log=self.log) if self.dist.is_main else None]
        if self.dist.world > 1:
            tdist.broadcast_object_list(tag, src=0)
        if tag[0] is None:
            return None
        client = checkpoint.load(self.engine, self.run.checkpoints, tag[0], self.dist)
        self.step, self.consumed = int(client["step"]), int(client["consumed_samples"])
        saved_gb = int(client["global_batch"])
        if saved_gb != self.global_batch:
            raise UserError(
                f"checkpoint {tag[0]} was trained with {saved_gb} sequences per step, this run has {self.global_batch}; "
                "keep micro_batch_size x grad_accum x ranks equal when resuming"
            )
        self.log(f"resumed from {self.run.checkpoints / tag[0]} at step {self.step} ({self.consumed * self.cfg.train.seq_len:,} tokens)")
        return tag[0]

    @property
    def global_batch(self) -> int:
        return self.cfg.global_batch_windows(self.dist.world)

    # -- one optimizer step ------------------------------------------------------------------
    def train_step(self) -> float:
        t, d = self.cfg.train, self.dist
        total = 0.0
        for micro in range(t.grad_accum):
            start, count = micro_batch_ids(self.consumed, micro, d.rank, d.world, t.micro_batch_size)
            x, y = self.train_stream.batch(self.train_stream.window_ids(start, count))
            loss = self.engine(x.to(d.device), y.to(d.device))
            self.engine.backward(loss)
            if micro == t.grad_accum - 1 and self.cfg.zero.stage == 0:
                self._grad_norm = self._full_grad_norm()  # DeepSpeed only records it under ZeRO/mixed precision
            self.engine.step()
            total += loss.item()
        self.step += 1
        self.consumed += self.global_batch
        return all_reduce_sum([total / t.grad_accum])[0] / d.world

    @torch.no_grad()
    def _full_grad_norm(self) -> float:
        """Pre-clip global grad norm when every rank holds full, averaged gradients (ZeRO-0)."""
        sq = sum(p.grad.float().pow(2).sum() for p in self.engine.module.parameters() if p.grad is not None)
        return float(torch.as_tensor(sq).sqrt())

    def grad_norm(self) -> float | None:
        value = self.engine.get_global_grad_norm()
        if value is None:
            value = self._grad_norm
        return float(value) if value is not None else None

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_stream is None:
            return None
        t, d = self.cfg.train, self.dist
        # Same count on every rank (ZeRO-3 forwards are collective), same set for any world size.
        total = (t.eval_batches * t.micro_batch_size) // d.world * d.world
        ids = eval_window_ids(self.val_stream.num_windows, max(total, d.world), d.rank, d.world)
        self.engine.eval()
        loss_sum, n = 0.0, 0
        for i in range(0, len(ids), t.micro_batch_size):
            chunk = ids[i : i + t.micro_batch_size]
            x, y = self.val_stream.batch(chunk)
            loss_sum += self.engine(x.to(d.device), y.to(d.device)).item() * len(chunk)
            n += len(chunk)
        self.engine.train()
        loss_sum, n = all_reduce_sum([loss_sum, float(n)])
        return loss_sum / n

    def save(self) -> Path:
        client = {
            "step": self.step, "consumed_samples": self.consumed, "global_batch": self.global_batch,
            "consumed_tokens": self.consumed * self.cfg.train.seq_len, "config_fingerprint": self.cfg.fingerprint(),
            "scaletrain_version": __version__,
        }
        meta = {"zero_stage": self.cfg.zero.stage, "precision": self.cfg.train.precision}
        return checkpoint.save(self.engine, self.run.checkpoints, self.step, client, self.dist, self.cfg.train.keep_last, meta)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, t, d = self.cfg, self.cfg.train, self.dist
        n_params = self.shape.num_params()
        tokens_per_step = self.global_batch * t.seq_len
        fpt = flops_per_token(self.shape.num_params(include_embedding=False), self.shape.num_layers, self.shape.hidden_size, t.seq_len)
        peak = all_reduce_sum([measure_peak_flops(DTYPES[t.precision], d.device)])[0]
        self.log(
            f"scaletrain {__version__} | {d.world} rank(s) on {d.device.type} | {n_params / 1e6:.2f}M params | "
            f"ZeRO-{cfg.zero.stage} {t.precision} | {tokens_per_step:,} tokens/step | run.dir {self.run.path}"
        )
        self.log(f"TensorBoard: tensorboard --logdir {self.run.path.parent}")
        metrics = Metrics(self.run.tb if d.is_main else None, purge_step=self.step + 1 if self.resumed_from else None)
        if d.is_main:
            self.run.write_status(state="running", step=self.step, max_steps=t.max_steps, world_size=d.world)
        stop = StopFlag()
        start_time, window_t0, window_tokens = time.time(), time.time(), 0
        last_loss, val_loss, state = math.nan, None, "finished"
        try:
            while self.step < t.max_steps:
                step_t0 = time.time()
                last_loss = self.train_step()
                window_tokens += tokens_per_step
                if self.step % t.log_every == 0 or self.step == 1 or self.step == t.max_steps:
                    elapsed = time.time() - window_t0
                    tps = window_tokens / max(elapsed, 1e-9)
                    lr = lr_at(self.step - 1, t.lr, t.min_lr, t.warmup_steps, t.max_steps)  # the lr this step used
                    grad_norm = self.grad_norm()
                    self.log(
                        f"step {self.step:>6}/{t.max_steps} | loss {last_loss:.4f} | lr {lr:.2e} | "
                        f"grad {grad_norm if grad_norm is not None else float('nan'):.3f} | {tps:,.0f} tok/s | "
                        f"{format_duration(time.time() - start_time)}"
                    )
                    metrics.scalars(self.step, {
                        "train/loss": last_loss, "train/lr": lr, "train/grad_norm": grad_norm,
                        "train/tokens_per_sec": tps, "train/mfu": tps * fpt / peak,
                        "train/consumed_tokens": self.consumed * t.seq_len,
                        "train/step_time_s": time.time() - step_t0,
                    })
                    window_t0, window_tokens = time.time(), 0
                if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.max_steps):
                    val_loss = self.evaluate()
                    if val_loss is not None:
                        self.log(f"step {self.step:>6} | val loss {val_loss:.4f} | val ppl {math.exp(min(val_loss, 50)):.2f}")
                        metrics.scalars(self.step, {"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50))})
                stopping = any_rank(stop.requested)
                if stopping or self.step == t.max_steps or (t.save_every and self.step % t.save_every == 0):
                    path = self.save()
                    self.log(f"saved checkpoint {path}")
                if stopping:
                    state = "preempted"
                    self.log(f"stop requested by signal: checkpointed at step {self.step}, exiting cleanly")
                    break
        except BaseException:
            if d.is_main:
                self.run.write_status(state="failed", step=self.step)
            raise
        finally:
            metrics.close()
        summary = {"state": state, "step": self.step, "loss": last_loss, "val_loss": val_loss,
                   "consumed_tokens": self.consumed * t.seq_len, "seconds": round(time.time() - start_time, 1)}
        if d.is_main:
            self.run.write_status(**summary)
        return summary


def train(cfg: Config) -> dict:
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.engine.destroy() if hasattr(trainer.engine, "destroy") else None
