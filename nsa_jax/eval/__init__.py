"""Evaluation of trained runs.

    nsa-eval --workdir runs/tiny [--config.eval.key=value ...]
    python -m nsa_jax.eval --workdir runs/tiny

Validation loss and perplexity by context length (eval.lengths) and passkey retrieval accuracy on
the (eval.passkey_lengths x eval.passkey_depths) grid -> WORKDIR/eval.json and WORKDIR/eval.png.
NSA's selection hit rate on such examples: selection_hits (experiments/retrieval.py runs it).
"""
from nsa_jax.eval.context_length import loss_by_length
from nsa_jax.eval.passkey import passkey_cell, passkey_grid
from nsa_jax.eval.run import evaluate_workdir
from nsa_jax.eval.selection import selection_hits
from nsa_jax.train import parse_eval_args

__all__ = ["evaluate_workdir", "loss_by_length", "parse_eval_args", "passkey_cell", "passkey_grid",
           "selection_hits"]
