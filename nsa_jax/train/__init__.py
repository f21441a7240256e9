"""The config-driven trainer.

    nsa-train --config configs/tiny.py [--workdir DIR] [--config.key=value ...]
    python -m nsa_jax.train --config configs/tiny.py ...

From Python: `train(config, workdir)` with a ConfigDict (or dict) laid out as settings.py says;
`parse_train_args(argv)` turns a command line into (config, workdir).
"""
from nsa_jax.train.command_line import load_config_file, parse_eval_args, parse_train_args
from nsa_jax.train.interrupts import Interrupted
from nsa_jax.train.loop import TrainingDiverged, train
from nsa_jax.train.settings import EvalSettings, RunConfig, TrainSettings, resolve

__all__ = ["EvalSettings", "Interrupted", "RunConfig", "TrainSettings", "TrainingDiverged",
           "load_config_file", "parse_eval_args", "parse_train_args", "resolve", "train"]
