"""configs/small_nsa.py with dense causal attention: the full-attention baseline.

Run (GPU):
    nsa-train --config configs/small_full.py           # -> runs/small_full
    nsa-eval --workdir runs/small_full
Same model sizes, data, optimizer and steps as small_nsa (only model.attention differs, so the
NSA-only settings in model.nsa and model.compressor are unused here); compare runs/small_full and
runs/small_nsa (loss.png, metrics.jsonl, eval.png).
"""
import pathlib

from nsa_jax.train import load_config_file


def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("small_nsa.py"))
    c.name = "small_full"
    c.model.attention = "full"
    return c
