"""The config-driven trainer.

    nsa-train --config configs/tiny.py [--workdir DIR] [--config.key=value ...]
    python -m nsa_jax.train --config configs/tiny.py ...

From Python: `train(config, workdir)` with a ConfigDict (or dict) laid out as run_config.py says;
`parse_train_args(argv)` turns a command line into (config, workdir); `load_trained_run(workdir)`
reads a run back (model, step, resolved config) for evaluation and generation.
"""
from nsa_jax.train.command_line import load_config_file, parse_eval_args, parse_train_args
from nsa_jax.train.interrupts import Interrupted
from nsa_jax.train.loop import TrainingDiverged, train
from nsa_jax.train.run_config import (EvalSettings, RunConfig, TrainSettings, full_attention_twin,
                                      resolve)
from nsa_jax.train.trained_run import TrainedRun, load_trained_run

__all__ = ["EvalSettings", "Interrupted", "RunConfig", "TrainSettings", "TrainedRun",
           "TrainingDiverged", "full_attention_twin", "load_config_file", "load_trained_run",
           "parse_eval_args", "parse_train_args", "resolve", "train"]
