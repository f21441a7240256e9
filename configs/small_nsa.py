"""Small NSA language model at 8k context, sized for one H100 (about 43M parameters; its
full-attention twin has about 36M, the difference being NSA's learned compressors and gates).

Run (GPU; `pip install -e .` first):
    nsa-train --config configs/small_nsa.py            # -> runs/small_nsa
    nsa-eval --workdir runs/small_nsa                  # loss by length 512..16k, passkey grid
and its full-attention twin configs/small_full.py (same model and data, attention="full") to
compare the two loss curves (runs/*/loss.png, metrics.jsonl) and eval.png heat maps.

Produces runs/small_nsa/{metrics.jsonl, loss.png, config.json, run_info.json, checkpoints/,
eval.json, eval.png}. Data: Shakespeare and the Python standard library's source, 8192-byte
windows, with 5% of rows passkey and 5% MQAR examples so that retrieval is learnable; the corpora
are small (tens of MB), so this many steps repeats them several times. NSA uses the paper's
hyper-parameters (l=32, d=16, l'=64, n=16, w=512), bfloat16 activations, float32 parameters.
"""
import ml_collections

from nsa_jax.data import VOCAB_SIZE


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "small_nsa"
    c.seed = 0
    c.steps = 4000
    c.log_every = 20
    c.eval_every = 500
    c.eval_batches = 8
    c.checkpoint_every = 500
    c.max_to_keep = 2

    c.data = ml_collections.ConfigDict(dict(
        corpora="shakespeare:1,python_stdlib:1", seq_len=8192, batch_size=4,
        validation_fraction=0.05, passkey_prob=0.05, mqar_prob=0.05, mqar_num_pairs=16,
        packed=True))  # packed=False: no segment ids (the unpacked baseline of bench_model.py)

    c.model = ml_collections.ConfigDict(dict(
        vocab_size=VOCAB_SIZE, d_model=512, num_layers=12, num_heads=8, num_kv_heads=2,
        head_dim=64, v_head_dim=64, mlp_hidden=1536, rope_theta=10_000.0, norm_eps=1e-6,
        attention="nsa", compressor="mlp", compressor_hidden=64, separate_branch_kv=False,
        param_dtype="float32", dtype="bfloat16", remat=False,
        implementation=ml_collections.config_dict.placeholder(str)))
    c.model.nsa = ml_collections.ConfigDict(dict(
        compress_block=32, compress_stride=16, select_block=64, num_selected=16,
        num_init_blocks=1, num_local_blocks=2, window=512))

    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-3, warmup_steps=200, final_lr_fraction=0.1, weight_decay=0.1,
        b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0))

    # every device of the machine, parameters and optimizer state split FSDP-style (docs/scaling.md)
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, distributed=False))

    c.eval = ml_collections.ConfigDict(dict(
        lengths=(512, 1024, 2048, 4096, 8192, 16384), batch_size=4, max_batches=8,
        passkey_lengths=(1024, 2048, 4096, 8192, 16384),
        passkey_depths=(0.0, 0.25, 0.5, 0.75, 1.0), passkey_examples=16))
    return c
