"""The train loop: resume, step, report, evaluate, checkpoint, stop on a signal or on NaN."""
from __future__ import annotations

import math
import pathlib
import time

import jax
from flax import nnx

from nsa_jax.data import make_train_batch, validation_loss
from nsa_jax.train.checkpoint import Checkpointer
from nsa_jax.train.distributed import global_batch, initialize_if_asked, local_rows
from nsa_jax.train.interrupts import Interrupted, catch_stop_signals
from nsa_jax.train.metrics import MetricsLog, plot_losses
from nsa_jax.train.optimizer import learning_rate_schedule, make_optimizer, warmup_steps
from nsa_jax.train.progress import Progress, format_eval_line, format_train_line
from nsa_jax.train.run_config import RunConfig, resolve
from nsa_jax.train.sharding import (batch_sharding, check_batch_size, check_sequence_length,
                                    make_mesh, state_shardings)
from nsa_jax.train.step import make_eval_step, make_train_step
from nsa_jax.train.trained_run import new_model
from nsa_jax.train.workdir import prepare_workdir


class TrainingDiverged(FloatingPointError):
    """The loss or gradient norm became NaN or Inf; nothing after the last checkpoint is saved."""


def train(config, workdir) -> dict:
    """Train the run `config` (ConfigDict or dict) in `workdir`, resuming from the newest good
    checkpoint there. Returns the last training and evaluation metrics."""
    run, workdir = resolve(config), pathlib.Path(workdir)
    initialize_if_asked(run.mesh.distributed)
    if jax.process_index() == 0:
        prepare_workdir(workdir, config.to_dict() if hasattr(config, "to_dict") else dict(config))
    trainer = Trainer(run, workdir)
    try:
        trainer.resume()
        return trainer.fit()
    finally:
        trainer.checkpointer.wait()
        trainer.checkpointer.close()


def sharded_start(run: RunConfig, mesh):
    """The fresh model and optimizer, created inside jit directly in their FSDP shardings (no
    device ever holds more than its share) -> ((model_def, opt_def), (model_state, opt_state),
    (model_shardings, opt_shardings), number of parameters)."""
    tx = make_optimizer(run.optimizer, run.train.steps)

    def create():
        model = new_model(run)
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    (model_def, model_shape), (opt_def, opt_shape) = map(nnx.split, nnx.eval_shape(create))
    shardings = state_shardings(model_shape, mesh), state_shardings(opt_shape, mesh)
    states = jax.jit(lambda: tuple(nnx.state(x) for x in create()), out_shardings=shardings)()
    num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model_shape, nnx.Param)))
    return (model_def, opt_def), states, shardings, num_params


class Trainer:
    def __init__(self, run: RunConfig, workdir: pathlib.Path):
        self.run, self.workdir, steps = run, workdir, run.train.steps
        self._started = time.perf_counter()
        self.schedule = learning_rate_schedule(run.optimizer, steps)
        self.mesh = make_mesh(run.mesh)
        check_batch_size(run.data.batch_size, self.mesh)
        check_sequence_length(run.data.seq_len, self.mesh)
        self.lead = jax.process_index() == 0  # the one process that logs, prints and plots
        (model_def, opt_def), (self.model_state, self.opt_state), shardings, self.num_params = (
            sharded_start(run, self.mesh))
        self.batch_sharding = batch_sharding(self.mesh)
        self.rows = local_rows(self.batch_sharding, (run.data.batch_size, run.data.seq_len))
        self.train_step = make_train_step(model_def, opt_def, (*shardings, self.batch_sharding),
                                          run.train.loss_normalization)
        self._eval_step = make_eval_step(model_def, (shardings[0], self.batch_sharding))
        self.checkpointer = Checkpointer(workdir, run.train.max_to_keep)
        self.log = MetricsLog(workdir)
        self.step = 0

    def resume(self) -> None:
        restored = self.checkpointer.restore_latest(self.model_state, self.opt_state)
        if restored is not None:
            self.step, self.model_state, self.opt_state, _ = restored
        if self.lead:
            self.log.truncate_after(self.step)

    def fit(self) -> dict:
        with jax.set_mesh(self.mesh):  # the mesh per-device kernels (shard_map) run on
            return self._fit()

    def _fit(self) -> dict:
        t = self.run.train
        self.progress = Progress(t.steps, self.step, quiet=not self.lead)
        self.progress.line(self._header())
        if self.step == 0:
            self._evaluate()
        self._first_step, self._window = self.step + 1, 0
        self._clock = time.perf_counter()
        with catch_stop_signals() as signals:
            pending = None
            for step in range(self.step + 1, t.steps + 1):
                batch = self._global(make_train_batch(self.run.data, t.seed, step - 1,
                                                      rows=self.rows))
                self.model_state, self.opt_state, metrics = self.train_step(
                    self.model_state, self.opt_state, batch)
                if pending is not None:  # read step - 1 while step runs (async dispatch)
                    self._report(*pending)
                pending, self.step = (step, metrics), step
                save = step % t.checkpoint_every == 0 or step == t.steps or bool(signals)
                evaluate = step % t.eval_every == 0 or step == t.steps
                if save or evaluate:  # never checkpoint or evaluate a diverged state
                    self._report(*pending)
                    pending = None
                if save:
                    self._save()
                if evaluate:
                    self._evaluate()
                if signals:
                    self.progress.close()
                    raise Interrupted(signals[0], step)
        self.progress.close()
        return self._finish()

    def _global(self, local: dict) -> dict:
        return global_batch(local, self.batch_sharding, self.run.data.batch_size)

    def _eval(self, model_state, batch: dict):
        """The eval step on a whole validation batch, of which this process passes its rows."""
        rows = slice(self.rows.start, self.rows.stop)
        return self._eval_step(model_state, self._global({k: v[rows] for k, v in batch.items()}))

    def _header(self) -> str:
        r, d, mesh = self.run, self.run.data, self.mesh
        where = (f"resuming at step {self.step}" if self.step else "starting at step 0")
        warmup = warmup_steps(r.optimizer, r.train.steps)
        if warmup < r.optimizer.warmup_steps:
            where += (f"; warm-up capped at {warmup} steps (half the run; optimizer."
                      f"warmup_steps={r.optimizer.warmup_steps})")
        return (f"{r.train.name}: {r.model.attention} attention, {self.num_params / 1e6:.2f}M "
                f"parameters ({r.model.num_layers} layers, d_model {r.model.d_model}); batch "
                f"{d.batch_size} x {d.seq_len} tokens; {r.train.steps} steps on "
                f"{jax.default_backend()}, mesh data={mesh.shape['data']} x "
                f"fsdp={mesh.shape['fsdp']} x context={mesh.shape['context']} "
                f"({mesh.size} of {jax.device_count()} device(s), "
                f"{jax.process_count()} process(es)); {where}; workdir {self.workdir}")

    def _report(self, step: int, metrics) -> None:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(math.isfinite(v) for v in values.values()):
            raise TrainingDiverged(
                f"training diverged at step {step}: loss {values['loss']}, grad_norm "
                f"{values['grad_norm']}. Nothing after the last checkpoint was kept; lower "
                "optimizer.learning_rate or raise optimizer.warmup_steps and start again.")
        self.progress.advance(values["loss"])
        self._window += 1
        if step == self._first_step:
            self.progress.line(f"compiled and ran the first step in "
                               f"{time.perf_counter() - self._clock:.1f} s")
        if step % self.run.train.log_every == 0 or step == self.run.train.steps:
            self._log_train(step, values)
        elif step == self._first_step:  # later windows measure running speed, not compilation
            self._window, self._clock = 0, time.perf_counter()

    def _log_train(self, step: int, values: dict) -> None:
        elapsed = max(time.perf_counter() - self._clock, 1e-9)
        per_step = elapsed / max(self._window, 1)
        tokens = self.run.data.batch_size * self.run.data.seq_len
        record = {"step": step, "loss": values.pop("loss"), **values, "learning_rate": float(self.schedule(step - 1)),
                  "tokens_per_s": tokens / per_step}
        peak = (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
        if peak is not None:  # GPU/TPU only: the CPU client keeps no statistics
            record["peak_memory_gib"] = peak / 2**30
        if self.lead:
            self.log.write(record)
        self.progress.line(format_train_line(record, self.run.train.steps,
                                             per_step * (self.run.train.steps - step)))
        self._window, self._clock = 0, time.perf_counter()

    def _evaluate(self) -> None:
        started = time.perf_counter()
        record = {"step": self.step, **validation_loss(self._eval, self.model_state,
                                                        self.run.data, self.run.train.eval_batches)}
        self.progress.line(format_eval_line(record))
        if self.lead:
            self.log.write(record)
            plot_losses(self.log.read(), self.workdir / "loss.png", self.run.train.name)
        if hasattr(self, "_clock"):  # evaluation time is not training throughput
            self._clock += time.perf_counter() - started

    def _save(self) -> None:
        self.checkpointer.save(self.step, self.model_state, self.opt_state,
                               {"step": self.step, "name": self.run.train.name})

    def _finish(self) -> dict:
        records = self.log.read()
        last = {kind: next((r for r in reversed(records) if key in r), {})
                for kind, key in (("train", "loss"), ("eval", "val_loss"))}
        self.progress.line(
            f"done: step {self.step}, {time.perf_counter() - self._started:.0f} s since the model "
            f"was built; train loss {last['train'].get('loss', math.nan):.4f}, val_loss "
            f"{last['eval'].get('val_loss', math.nan):.4f}\n  metrics {self.log.path}\n  plot "
            f"{self.workdir / 'loss.png'}\n  checkpoints {self.workdir / 'checkpoints'}")
        return {"step": self.step, **last}
