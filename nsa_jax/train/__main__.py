"""python -m nsa_jax.train --config configs/tiny.py [--workdir DIR] [--config.key=value ...]"""
from nsa_jax.cli import train

train()
