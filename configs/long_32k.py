"""The small NSA model trained at 32k context (one H100-class GPU; remat on).

Run (GPU):
    nsa-train --config configs/long_32k.py             # -> runs/long_32k
    nsa-eval --workdir runs/long_32k                   # loss by length up to 64k, passkey to 32k
Produces the same files as small_nsa in runs/long_32k. It is small_nsa (configs/small_nsa.py)
with 32768-byte windows, one row per batch, rematerialised blocks, and more passkey / MQAR rows
(10% each) so that long-range retrieval is trained; evaluation extends to 65536 tokens to show
how loss and retrieval behave past the training length.
"""
import pathlib

from nsa_jax.train import load_config_file


def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("small_nsa.py"))
    c.name = "long_32k"
    c.data.seq_len = 32768
    c.data.batch_size = 1
    c.data.passkey_prob = 0.1
    c.data.mqar_prob = 0.1
    c.model.remat = True
    c.eval.lengths = (1024, 4096, 16384, 32768, 65536)
    c.eval.batch_size = 1
    c.eval.passkey_lengths = (2048, 8192, 16384, 32768)
    return c
