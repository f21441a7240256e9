"""python -m nsa_jax.eval --workdir runs/NAME [--config.eval.key=value ...]"""
from nsa_jax.cli import evaluate

evaluate()
