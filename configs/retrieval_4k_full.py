"""configs/retrieval_4k_nsa.py's full-attention twin with matched parameters: issue 21's baseline.

Run with the study (experiments/retrieval.py; configs/retrieval_4k_nsa.py has the commands).
Alone: nsa-train --config configs/retrieval_4k_full.py      # -> runs/retrieval_4k_full

The same model, data, optimizer and steps with model.attention="full", its MLP widened
(nsa_jax.train.full_attention_twin) so that its parameter count is the nearest to the NSA model's
(tests/experiments/test_study_configs.py holds the two within 1%): NSA's extra parameters are its
gates, a d_model -> 3 x 8 heads linear map with biases per layer (4 x 24 x 257 = 24,672), so the
twin gets 8 more MLP units per layer (4 x 8 x 3 x 256 = 24,576).
`python experiments/budget.py configs/retrieval_4k_full.py` estimates 1.3 minutes of training on
one H200 (2x: 2.5) + 1.7 minutes of start-up (configs/retrieval_4k_nsa.py says how).
"""
import pathlib

from nsa_jax.train import full_attention_twin, load_config_file


def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("retrieval_4k_nsa.py"))
    c.name = "retrieval_4k_full"
    return full_attention_twin(c)
