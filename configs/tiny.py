"""Tiny NSA language model on Shakespeare, for a CPU: the README's main job.

Run (2m24s of CPU time, compilation included: 1m40s wall on 2 idle cores, up to 5 minutes on 2
cores shared with other jobs, measured 4m40s; the README gives the same figures):
    nsa-train --config configs/tiny.py                 # or: python -m nsa_jax.train --config ...
    nsa-eval --workdir runs/tiny                       # loss by context length, passkey grid

Produces runs/tiny/{metrics.jsonl, loss.png, config.json, run_info.json, checkpoints/}. The
validation loss (nats per byte) falls from about 6.1 at step 0 to about 2.0 at step 150; a log
line every 10 steps and an eval line every 50. Re-running the command resumes (or, when
finished, only reports). Override anything with --config.key=value, e.g. --config.steps=50.

Sizes: a 2-layer model (d_model 128, 4 query heads sharing 1 KV head of dim 32) on 256-byte
windows. The NSA hyper-parameters are scaled down with T so that selection really selects: with
compression blocks of l=16 every d=8 tokens, selection blocks of l'=32, n=4 selected blocks
(block 0 and the two local ones forced, one chosen by score) and a 64-token window, a query at
the end of a 256-token window sees 4 of its 8 blocks through selection. The "reference"
implementation (the dense-mask oracle, exact NSA) is the fastest one on a CPU at T=256.
"""
import ml_collections

from nsa_jax.data import VOCAB_SIZE


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "tiny"
    c.seed = 0
    c.steps = 150
    c.log_every = 10
    c.eval_every = 50
    c.eval_batches = 4
    c.checkpoint_every = 50
    c.max_to_keep = 2

    c.data = ml_collections.ConfigDict(dict(
        corpora="shakespeare", seq_len=256, batch_size=8, validation_fraction=0.1,
        passkey_prob=0.0, mqar_prob=0.0, mqar_num_pairs=8, packed=True))

    c.model = ml_collections.ConfigDict(dict(
        vocab_size=VOCAB_SIZE, d_model=128, num_layers=2, num_heads=4, num_kv_heads=1,
        head_dim=32, mlp_hidden=384, attention="nsa", compressor="mean",
        implementation="reference", dtype="float32", param_dtype="float32"))
    c.model.nsa = ml_collections.ConfigDict(dict(
        compress_block=16, compress_stride=8, select_block=32, num_selected=4,
        num_init_blocks=1, num_local_blocks=2, window=64))

    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=3e-3, warmup_steps=20, final_lr_fraction=0.1, weight_decay=0.1,
        b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0))

    # every device of the machine, parameters and optimizer state split FSDP-style (docs/scaling.md)
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, distributed=False))

    c.eval = ml_collections.ConfigDict(dict(
        lengths=(64, 128, 256, 512), batch_size=8, max_batches=4, passkey_lengths=(128, 256, 512),
        passkey_depths=(0.0, 0.5, 1.0), passkey_examples=8))
    return c
