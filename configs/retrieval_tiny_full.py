"""configs/retrieval_tiny.py with dense causal attention: its twin in the CPU passkey experiment.

Run with it (configs/retrieval_tiny.py has the commands). Only model.attention differs (so the
NSA-only settings are unused); not matched in parameters: NSA's gates add 3,096 (0.75%).
"""
import pathlib

from nsa_jax.train import load_config_file


def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("retrieval_tiny.py"))
    c.name = "retrieval_tiny_full"
    c.model.attention = "full"
    return c
