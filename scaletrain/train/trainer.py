"""A training run's state and its parts of a step: start-up (checks, resume, data, engine), one optimizer step,
evaluation and checkpoints. loop.py drives it to train.max_steps.

Re-running the same command on the same run.dir resumes from the checkpoint `latest` names, once its files
verify (else the newest one that does); that is all a requeued SLURM job needs. SIGUSR1/SIGTERM ask for a
checkpoint at the next step boundary and a clean exit (status "preempted").
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as tdist

from scaletrain import __version__, lineage
from scaletrain.config import Config
from scaletrain.data.sampler import micro_batch_ids
from scaletrain.data.mix_rules import part_names, phase_weights
from scaletrain.data.mixture import resolve_part
from scaletrain.data.sources import resolve_source
from scaletrain.ds_config import check_deepspeed_passthrough, deepspeed_config
from scaletrain.errors import UserError, alike_on_this_host, heard_elsewhere
from scaletrain.growth.in_run import RunGrowth
from scaletrain.model.attention import check_backend
from scaletrain.model.docmask import document_ids
from scaletrain.model.fused_ops import check_fused_ops
from scaletrain.model.llama import LlamaShape
from scaletrain.train import checkpoint, finetune, init_from, precision
from scaletrain.train.distributed import all_reduce_sum, launcher_rank, main_rank_does, setup
from scaletrain.train.metrics import flops_per_token
from scaletrain.train.build import build_model, build_optimizer
from scaletrain.plan import check_fits
from scaletrain.train import resume
from scaletrain.train.guard import StepGuard
from scaletrain.train.run_dir import RunDir, RunLock
from scaletrain.train.run_lineage import weights_id
from scaletrain.train.schedule import LrSchedule
from scaletrain.train.stop_flag import StopFlag
from scaletrain.train.validation import load_data, validate


class Trainer:
    def __init__(self, cfg: Config, lock: RunLock | None = None):
        self.stop = StopFlag()  # before any pid file exists: a USR1 during start-up is a stop request, not a kill
        try:
            cfg, asked = self._preflight(cfg, lock)
        except UserError as e:
            raise alike_on_this_host(e)
        self.dist = setup(cfg.train.threads)
        cfg, tag = self._starting_point(cfg, asked)
        self.cfg = cfg  # final from here on: this stage's model, agreed precision, resharded grad_accum
        self.log = print if self.dist.is_main else (lambda *a, **k: None)
        cache = self._open_data(cfg)
        self.ds_config = deepspeed_config(cfg, self.dist.world)
        # rank 0, while the others wait; its UserError stops every rank with the same line
        self.lineage = main_rank_does(lambda: self._write_start_files(cache, tag))
        self.run.check_shared(self.dist)  # a node-local run.dir: one line now, not broken checkpoints later
        (self.run.path / "pids" / f"rank{self.dist.rank}.pid").write_text(str(os.getpid()))
        self.shape = LlamaShape.from_config(cfg.model)
        reshard = self.resume_plan is not None and self.resume_plan.reshard
        self.engine = self._build_engine(self.resume_plan.tag_dir if reshard else None)  # resharding: saved weights
        self.step, self.consumed, self.saved_step = 0, 0, None
        self.tokens_seen = 0  # counted, not windows x seq_len: a resume may change train.seq_len
        self.early_stop = finetune.EarlyStop(cfg)
        self.val_metrics: dict = {}
        self._grad_norm: float | None = None
        self.guard = StepGuard(self.engine, cfg.train.max_skipped, self.dist.rank, lambda: self._grad_norm, self.log)
        self._resume(tag)
        init_from.release_pinned()  # every rank has its weights (DeepSpeed's start is collective)

    def _preflight(self, cfg: Config, lock: RunLock | None) -> tuple[Config, str]:
        """Every check that needs no process group, before anything is written (but the lock). Returns the config
        with init.from's settings and this rank's precision, and the precision asked for."""
        cfg = init_from.resolve(cfg)  # fails fast on a shape mismatch; sets data.tokenizer from init.from
        # train.precision auto -> bf16 / fp32 / fp16 for this rank's hardware (agreed across ranks after setup)
        asked = cfg.train.precision
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        cfg, self.precision_note = precision.resolve(cfg, device)
        check_deepspeed_passthrough(cfg)  # the deepspeed: mapping, through DeepSpeed's own config classes
        self.run = RunDir(cfg.run.dir)
        self.run.preflight(cfg)
        for part in cfg.data.mix:  # missing/empty data fails before DeepSpeed starts
            resolve_part(part, cfg.data.text_field)
        if not cfg.data.mix:
            resolve_source(cfg.data.source, cfg.data.text_field)
        check_fused_ops(cfg.model.fused_ops, cuda=device.type == "cuda")
        check_backend(cfg.model.attention, device, training=True, doc_mask=cfg.data.doc_mask, shape=cfg.model,
                      precision=cfg.train.precision)  # flash without CUDA, ...
        # estimated memory per rank vs what a rank has (scaletrain plan), before anything is written; a growing
        # run is checked at its last (largest) stage
        check_fits(RunGrowth(cfg).config_at(len(cfg.growth.schedule)))
        if lock is not None and launcher_rank() == 0:
            lock.acquire()  # a second trainer on this run.dir stops here, before it writes anything in it
        return cfg, asked

    def _starting_point(self, cfg: Config, asked: str) -> tuple[Config, str | None]:
        """Collective: the checkpoint this start resumes (None: a fresh run) and the config it runs with: the
        precision all ranks agree on, the growth stage's model, grad_accum for a changed rank count."""
        cfg, self.precision_note = precision.agree(cfg, asked, self.precision_note, self.dist.world)
        self.growth = RunGrowth(cfg)
        tag = self._find_tag()
        self.stage = self.growth.stage_of(self.run.checkpoints / tag if tag else None)
        if tag is not None:
            self.growth.check_numbering(self.run.path, self.stage)
        bounds = self.growth.bounds
        if tag is not None and self.stage < len(bounds) and bounds[self.stage] < checkpoint.step_of(tag):
            raise heard_elsewhere(UserError(
                f"growth.schedule[{self.stage}].at_step {bounds[self.stage]} lies before checkpoint {tag}, which this start "
                f"resumes before that growth: a boundary cannot be added in the past; set its at_step above "
                f"{checkpoint.step_of(tag)}"), not self.dist.is_main)  # (every rank: rank 0 prints it)
        cfg = self.growth.config_at(self.stage)  # grown model, remaining schedule
        # safe pickles, shapes, format; other world size / ZeRO stage: reshard (grad_accum keeps the global batch)
        self.resume_plan, cfg = resume.prepare(self.run.checkpoints, tag, cfg, self.dist)
        # init.from on a fresh run: one checkpoint, chosen by rank 0 (a run dir may still be training), gives every
        # rank its weights and the lineage its parent; a resume loads its own checkpoint instead
        self.init_source = init_from.pinned_source(cfg, self.dist) if cfg.init.from_ and tag is None else None
        return cfg, tag

    def _open_data(self, cfg: Config):
        """The data cache (built by rank 0 if missing) and its train/val streams; returns the cache."""
        cache = load_data(cfg, self.dist)
        self.data_cache = cache.dir.name
        if self.resume_plan is not None:
            resume.warn_if_data_changed(self.resume_plan, self.data_cache, self.log)
        self.eos_id = int(cache.meta.get("eos_id", 2))  # document boundaries for data.doc_mask
        t = cfg.train
        phases, self.mix_phase_lines = None, {}
        if cfg.data.mix_phases:  # data.mix's weights by step, in samples: the global batch is the same all run
            by_step, names = phase_weights(cfg.data), part_names(cfg.data.mix)
            phases = [(at * self.global_batch, weights) for at, weights in by_step]
            self.mix_phase_lines = {at: f"data.mix weights from step {at + 1}: " + ", ".join(
                f"{n} {w:g}" for n, w in zip(names, weights)) for at, weights in by_step[1:] if at < t.max_steps}
        extra = {"phases": phases} if phases else {}
        self.train_stream = cache.stream("train", t.seq_len, t.seed, **extra)  # packed text or one example per window
        self.val_stream = cache.stream("val", t.seq_len, t.seed, required=False)
        finetune.check_labels(cfg, self.train_stream, self.val_stream)
        if self.val_stream is None and t.eval_every:  # (a split too small for one window, or val_fraction 0)
            self.log(f"warning: no validation split (data.val_fraction={cfg.data.val_fraction} gave less than one "
                     f"train.seq_len={t.seq_len} window): train.eval_every={t.eval_every} evaluates nothing")
        left_out = sorted({n for n, _, _ in getattr(self.train_stream, "parts", [])} -
                          {n for n, _, _ in getattr(self.val_stream, "parts", [])})
        if left_out and t.eval_every:  # a data.mix source whose val split holds no window
            self.log(f"note: val/loss leaves out data.mix source(s) {', '.join(left_out)}: fewer than train.seq_len+1 "
                     "val tokens (raise data.val_fraction or add data to score them)")
        for note in (s.fit_note() for s in (self.train_stream, self.val_stream) if s is not None):
            if note:  # prompt/completion examples that do not fit the window
                self.log(note)
        self.last_val_loss: float | None = None
        return cache

    def _write_start_files(self, cache, tag: str | None):
        """Rank 0: config.yaml, ds_config.json, the lineage record, a clean pids/ dir. Returns the RunLineage."""
        from scaletrain.train.pid_files import rank_pid_files
        from scaletrain.train.run_lineage import RunLineage, check_tokenizer

        cfg = self.cfg
        check_tokenizer(self.run.path, Path(cache.tokenizer_path), resuming=tag is not None)
        self.run.remove_stale_temp_files()
        if tag is None or checkpoint.step_of(tag) < cfg.train.max_steps:  # a finished run's config.yaml keeps the
            self.run.write_start(cfg, self.ds_config)                     # settings it was trained with
        run_lineage = RunLineage(cfg, self.run.path, cache, self.init_source, self.run.checkpoints / tag if tag else None)
        if self.stage:  # resumed after growth inside this run
            run_lineage.grown(self.run.path / "growth" / f"stage{self.stage}", cfg)
        (self.run.path / "pids").mkdir(exist_ok=True)
        ranks, strays = rank_pid_files(self.run.path)  # an earlier start's ranks beyond this world: gone
        for f in strays + [f for r, f in ranks.items() if r >= self.dist.world]:
            f.unlink(missing_ok=True)
        return run_lineage

    def _build_engine(self, weights_from: Path | None = None):
        """`weights_from`: a checkpoint dir to start from (in-run growth), instead of init / init.from."""
        import deepspeed

        torch.manual_seed(self.cfg.train.seed)  # identical init on every rank and every ZeRO stage
        check_backend(self.shape.attention, self.dist.device, training=True, doc_mask=self.cfg.data.doc_mask,
                      shape=self.shape, precision=self.cfg.train.precision)
        model = build_model(self.shape, self.cfg, self.eos_id)
        if weights_from is not None:
            from scaletrain.weights import load_into, open_weights

            load_into(model, open_weights(weights_from, verify_files=False), "grown weights")  # (this run's own)
        elif self.init_source is not None:  # init.from, not resuming
            weights_from = self.init_source
            init_from.load_weights(model, weights_from)  # weights only: the optimizer below starts fresh
            # (unless `scaletrain grow --optimizer grow` wrote moments: install() below)
        if self.cfg.train.freeze:
            finetune.freeze(model, self.cfg)
        optimizer = build_optimizer(model, self.cfg)
        t = self.cfg.train
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config,
            lr_scheduler=lambda opt: LrSchedule.of(opt, t, *self.lr_restarts),
        )
        if weights_from is not None:
            from scaletrain.growth.engine_state import install

            # exact fp32 masters, grown Adam moments (init.from's files were verified when they were loaded above)
            install(engine, Path(weights_from), t.precision, t.grad_accum, verify_files=False)
        return engine

    def switch_model(self, cfg: Config, stage: int, weights_from: Path) -> None:
        """A growth boundary (growth/in_run.py): the engine is dropped and one is built for `cfg`'s model from the
        grown checkpoint dir `weights_from`, with its exact fp32 masters and grown Adam moments; the step, the
        data position and the lr schedule go on."""
        from scaletrain.growth.engine_state import release_engine

        self.guard.detach()  # its reference would keep the parent's weights and Adam state alive meanwhile
        freed = release_engine(self.engine)
        self.engine = None
        freed()  # collect the parent now: on a GPU its memory is needed for the child
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.cfg, self.stage = cfg, stage
        self.shape = LlamaShape.from_config(cfg.model)
        self.engine = self._build_engine(weights_from=weights_from)
        self.engine.lr_scheduler.load_state_dict({"steps_done": self.step})
        self.guard.attach(self.engine)
        if not freed():
            self.log("warning: the previous DeepSpeed engine is still referenced; memory grows with each stage")

    @property
    def lr_restarts(self) -> tuple:
        """(growth boundaries passed, re-warmup steps) for the lr schedule."""
        return self.growth.restarts(self.stage), self.cfg.growth.rewarmup_steps

    def _find_tag(self) -> str | None:
        # rank 0 hashes the newest checkpoint's files (minutes for a large one) while the others wait
        tag = [main_rank_does(lambda: checkpoint.find_resumable(self.run.checkpoints, log=print))]
        if self.dist.world > 1:
            tdist.broadcast_object_list(tag, src=0)
        return tag[0]

    def _resume(self, tag: str | None) -> str | None:
        if tag is None:
            return None
        client = resume.load(self.engine, self.resume_plan, self.cfg, self.dist)
        # DeepSpeed keeps the key "skipped_steps" to itself on load (its engine.skipped_steps gets the saved value):
        # ours has a name of its own; checkpoints from before that carry it in DeepSpeed's
        self.guard.total = int(client.get("guard_skipped_steps", client.get("skipped_steps", self.engine.skipped_steps)))
        self.guard.consecutive = int(client.get("guard_consecutive", 0))  # a streak goes on across a resume
        self.step, self.consumed = int(client["step"]), int(client["consumed_samples"])
        self.tokens_seen = int(client.get("consumed_tokens", self.consumed * self.cfg.train.seq_len))
        self.early_stop.load(client.get("early_stop"))
        self.last_val_loss = client.get("last_val_loss")
        self.saved_step = self.step
        saved_gb = int(client["global_batch"])
        if saved_gb != self.global_batch:  # (the same on every rank: rank 0 prints it)
            raise heard_elsewhere(UserError(
                f"checkpoint {tag} was trained with {saved_gb} sequences per step, this run has {self.global_batch}; "
                "keep micro_batch_size x grad_accum x ranks equal when resuming"), not self.dist.is_main)
        self.log(f"resumed from {self.run.checkpoints / tag} at step {self.step} ({self.tokens_seen:,} tokens)")
        return tag

    @property
    def global_batch(self) -> int:
        return self.cfg.global_batch_windows(self.dist.world)

    # -- one optimizer step ------------------------------------------------------------------
    def train_step(self) -> float:
        t, d = self.cfg.train, self.dist
        total = torch.zeros((), dtype=torch.float64, device=d.device)  # summed where it is: one host sync a step
        batches = [self.train_stream.batch(self.train_stream.window_ids(
            *micro_batch_ids(self.consumed, micro, d.rank, d.world, t.micro_batch_size))) for micro in range(t.grad_accum)]
        weights = finetune.token_weights(self.cfg, [y for _, y in batches], self.dist.world)
        for micro, (x, y) in enumerate(batches):
            loss = self.guard.inject(self._loss(x, y), self.step + 1, micro)  # testing hook (guard.py), else a no-op
            if weights is not None:
                loss = loss * weights[micro]
            self.engine.backward(loss)
            total += loss.detach()
            if micro == t.grad_accum - 1:
                if self.cfg.zero.stage == 0:
                    self._grad_norm = self._full_grad_norm()  # DeepSpeed only records it under ZeRO/mixed precision
                mean = all_reduce_sum([total.item() / t.grad_accum])[0] / d.world  # before the update: the NaN guard needs it
                self.guard.before_update(self.engine, mean)
            self.engine.step()
        self.step += 1
        self.consumed += self.global_batch  # a skipped step consumes its data too
        self.tokens_seen += self.global_batch * t.seq_len
        self.last_skipped = self.guard.after_update(self.step, mean)  # raises after train.max_skipped in a row
        return mean

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward of one micro-batch; with data.doc_mask the model also gets each token's document."""
        x, y = x.to(self.dist.device), y.to(self.dist.device)
        doc_ids = document_ids(x, self.eos_id) if self.cfg.data.doc_mask else None
        return self.engine(x, y, doc_ids=doc_ids)

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

    def evaluate(self) -> float | None:
        """val/loss (and the classifier's accuracy/F1) on the fixed val windows; None without a val split."""
        if self.val_stream is None:
            return None
        metrics = validate(self.engine, self.val_stream, self.cfg, self.dist, self._loss)
        if metrics is None:
            return None
        self.val_metrics, self.last_val_loss = metrics, metrics["val/loss"]
        return self.last_val_loss

    def save(self) -> Path | None:
        client = {
            "step": self.step, "consumed_samples": self.consumed, "global_batch": self.global_batch,
            "consumed_tokens": self.tokens_seen, "config_fingerprint": self.cfg.fingerprint(),
            "scaletrain_version": __version__, "early_stop": self.early_stop.state(), "guard_skipped_steps": self.guard.total,
            "guard_consecutive": self.guard.consecutive,
            "last_val_loss": self.last_val_loss,  # the lineage records of the checkpoints after a resume carry it too
        }
        meta = {"zero_stage": self.cfg.zero.stage, "precision": self.cfg.train.precision,
                "data_stream": resume.data_stream(self.cfg, self.data_cache),
                "model": self.cfg.model.model_dump(mode="json")}  # a restart builds this shape before loading
        t = self.cfg.train
        # lineage.json goes into the tag before its manifest (checked with the weights); its id hashes the
        # weights being saved (collective under ZeRO-3)
        content_id, record = weights_id(self.engine.module, self.dist.is_main), None
        if self.dist.is_main:
            tag_dir = self.run.checkpoints / checkpoint.tag_name(self.step)
            record = self.lineage.record(tag_dir, content_id, self.step, client["consumed_tokens"], self.last_val_loss)
        extra = {lineage.LINEAGE: lineage.dumps(record)} if record else None
        path = checkpoint.save(self.engine, self.run.checkpoints, self.step, client, self.dist, t.keep_last, meta,
                               t.keep_every, self.log, extra_files=extra, keep_steps=self.growth.bounds)
        if path is None:  # not enough disk space: said so, nothing written, training goes on
            return None
        self.saved_step = self.step
        if self.dist.is_main and self.stage and self.run.saved_config().model != self.cfg.model:
            self.run.write_start(self.cfg, self.ds_config)  # grown: config.yaml names the model of the checkpoints
        if record:
            lineage.write(self.run.path, record)
        return path

    def sizes(self) -> tuple[int, float]:
        """(parameters, training FLOPs per token) of the current model (it changes at growth boundaries)."""
        s, t = self.shape, self.cfg.train
        return s.num_params(), flops_per_token(s, t.seq_len)
