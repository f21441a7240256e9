"""Language modelling at 8k context, NSA: issue 21's LM study (the paper's Fig. 4 at small scale),
paired with its matched full-attention twin configs/lm_8k_full.py.

Run (one H200; `train` spends at most --minutes per call: repeat it until it says all 6 runs are
finished; experiments/nsa_vs_full.py says what each stage does):
    python experiments/nsa_vs_full.py train --out runs/lm_8k --minutes 9 \
        --configs configs/lm_8k_nsa.py configs/lm_8k_full.py --seeds 0 1 2
    python experiments/nsa_vs_full.py report --out runs/lm_8k
(two GPUs: add --gpus 2). Produces runs/lm_8k/<config>/seed<k>/ (metrics.jsonl, loss.png,
checkpoints/) and runs/lm_8k/{val_loss.png, report.md}: validation loss every 250 steps with a
band over seeds, training tokens/s.

configs/small_nsa.py (43.06M parameters: 12 layers x 512, 8 query heads over 2 KV heads of 64
dims, the paper's MLP phi and NSA hyper-parameters) on text only (Shakespeare and the Python
standard library, no passkey or MQAR rows, loss per token), so the validation loss measures
language modelling alone; its twin's MLP is widened by 366 units per layer to match NSA's
compressors and gates within 0.02%. The gate init is spelled out, so that it can be overridden.

Budget: `python experiments/budget.py configs/lm_8k_nsa.py configs/lm_8k_full.py` estimates 14.1
minutes of training per NSA seed and 3.7 per full-attention seed (2000 steps of 4 x 8192 tokens,
65.5M tokens, 6.7x the 300-step run in docs/results.md), + 1.7 minutes of start-up per chunk: NSA
is configs/small_nsa.py itself, whose H200 throughput (79,647 tokens/s) the estimate rests on.
With 9-minute chunks that is 2 chunks per NSA seed and 1 per twin, about 70 minutes of one H200
for 3 seeds (about 46 for 2). Whether 2000 steps separate the curves from the seeds' noise is
what the band will show; if not, the next step is --config.steps=4000 in a fresh OUT.
"""
import pathlib

from nsa_jax.train import load_config_file


def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("small_nsa.py"))
    c.name = "lm_8k_nsa"
    c.steps = 2000
    c.log_every = 25
    c.eval_every = 250
    c.eval_batches = 8
    c.checkpoint_every = 250
    c.loss_normalization = "token"
    c.data.passkey_prob = 0.0
    c.data.mqar_prob = 0.0
    c.model.gate_bias_init = (-2.0, -2.0, 2.0)
    return c
