"""configs/lm_8k_nsa.py's full-attention twin with matched parameters: the baseline of issue 21's
language-modelling study.

Run with it (configs/lm_8k_nsa.py has the commands and the budget). The same model, data,
optimizer and steps with model.attention="full" (cuDNN on a GPU) and its MLP widened
(nsa_jax.train.full_attention_twin) to the parameter count nearest to the NSA model's: 43.07M
against 43.06M (tests/experiments/test_study_configs.py holds them within 1%).
"""
import pathlib

from nsa_jax.train import full_attention_twin, load_config_file


def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("lm_8k_nsa.py"))
    c.name = "lm_8k_full"
    return full_attention_twin(c)
