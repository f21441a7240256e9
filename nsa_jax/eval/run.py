"""nsa-eval: evaluate the newest good checkpoint of a training run."""
from __future__ import annotations

import pathlib

import jax
import numpy as np
from flax import nnx

from nsa_jax.eval.context_length import loss_by_length
from nsa_jax.eval.passkey import passkey_grid
from nsa_jax.eval.report import write_report
from nsa_jax.models import logits_and_gates, token_losses
from nsa_jax.train import load_trained_run


def evaluate_workdir(config, workdir) -> dict:
    """Loss by context length and the passkey grid for the run in `workdir` (its stored config
    with any overrides); writes eval.json and eval.png there and returns the result."""
    workdir = pathlib.Path(workdir)
    run, model_def, model_state, step = load_trained_run(workdir, config)
    settings = run.eval
    print(f"{run.train.name}: evaluating the checkpoint of step {step}", flush=True)
    logits = jax.jit(lambda state, batch: logits_and_gates(nnx.merge(model_def, state), batch)[0])
    eval_step = jax.jit(lambda state, batch: token_losses(nnx.merge(model_def, state), batch)[:2])
    lengths = loss_by_length(eval_step, model_state, run.data, settings.lengths,
                             settings.batch_size, settings.max_batches)
    for row in lengths:
        print(f"  length {row['length']:>6}: val_loss {row['val_loss']:.4f}  perplexity "
              f"{row['val_perplexity']:.2f}", flush=True)
    accuracy = passkey_grid(
        lambda batch: np.asarray(logits(model_state, {k: batch[k] for k in
                                                      ("tokens", "segment_ids")})),
        settings.passkey_lengths, settings.passkey_depths, settings.passkey_examples,
        settings.batch_size, run.train.seed)
    result = {"step": step, "loss_by_length": lengths,
              "passkey": {"lengths": list(settings.passkey_lengths),
                          "depths": list(settings.passkey_depths),
                          "examples": settings.passkey_examples, "accuracy": accuracy.tolist(),
                          "trained_on_passkeys": run.data.passkey_prob > 0}}
    json_path, png_path = write_report(result, workdir, run.train.name)
    unseen = "" if run.data.passkey_prob > 0 else "; this model never saw passkey data"
    print(f"  passkey accuracy (rows: lengths {list(settings.passkey_lengths)}, columns: depths "
          f"{list(settings.passkey_depths)}{unseen}):\n"
          f"{np.array2string(accuracy, precision=2)}\nwrote {json_path} and {png_path}",
          flush=True)
    return result
