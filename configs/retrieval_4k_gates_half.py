"""configs/retrieval_4k_nsa.py with every gate starting at 0.5 (bias 0): issue 21's gate-init
ablation.

Run with the study (experiments/retrieval.py; configs/retrieval_4k_nsa.py has the commands).
Alone: nsa-train --config configs/retrieval_4k_gates_half.py      # -> runs/retrieval_4k_gates_half

Only model.gate_bias_init differs from retrieval_4k_nsa.py: (0, 0, 0) instead of the provisional
default (-2, -2, 2) (gates 0.12, 0.12, 0.88). The gates' weights start at zero either way, so the
parameter count and the estimated time are retrieval_4k_nsa.py's.
"""
import pathlib

from nsa_jax.train import load_config_file


def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("retrieval_4k_nsa.py"))
    c.name = "retrieval_4k_gates_half"
    c.model.gate_bias_init = (0.0, 0.0, 0.0)
    return c
