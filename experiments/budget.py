"""How long a config takes to train on one H200, estimated (not measured) from its FLOPs per token
and the training throughput measured for configs/small_nsa.py and small_full.py.

    python experiments/budget.py CONFIG [CONFIG ...] [--config.key=value ...]

prints, per config: parameters, training FLOPs per token, and the estimated minutes of training,
of one start-up and (configs with passkey rows) of experiments/retrieval.py's default grid. The
study configs' docstrings quote it; tests/experiments/test_study_configs.py holds every retrieval
study config to RETRIEVAL_LIMIT_MINUTES with the MARGIN below.

Method. Model FLOPs of training are 3x the forward's (backward = 2x forward): every parameter is
one multiply-add per token, except the norms' and the learned compressor phi's, which runs once
per compressed token (every d tokens); the tied output layer adds V x d; attention adds
2 (Dk + Dv) per key per query head, where a query attends to every earlier key (full), or to its
visible compressed tokens (scored a second time, Dk only, to select blocks), the keys of its n
selected blocks and its window (NSA), averaged over the positions of a sequence. The measured runs
give each attention kind an achieved rate, FLOPs per token x tokens/s (REFERENCES below), and a
config's estimate is its FLOPs (training steps plus its periodic evaluations, forward only) over
that rate, plus STARTUP_S per chunk. Smaller models than the references reach a lower share of
the GPU (small matmuls, per-kernel overheads), so the estimate is a lower bound: configs are sized
so that MARGIN x the estimate fits the limit.
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nsa_jax.config import ModelConfig  # noqa: E402
from nsa_jax.models import num_params  # noqa: E402
from nsa_jax.train import RunConfig, load_config_file, parse_train_args, resolve  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Reference:
    config: str  # configs/ file name
    tokens_per_s: float
    source: str  # where docs/benchmarks.md has it


REFERENCES = {
    "nsa": Reference("small_nsa.py", 79_647, "H200, 1 GPU, docs/benchmarks.md 'One config on 1 vs "
                     "2 GPUs', 2026-11-23"),
    # no H200 measurement of full attention yet; the H200 has the H100's compute, more bandwidth
    "full": Reference("small_full.py", 329_255, "H100, docs/benchmarks.md 'Whole-model training "
                      "throughput', 2026-11-23"),
}
# docs/benchmarks.md 'One config on 1 vs 2 GPUs', 1 GPU: 120 s wall for 45 steps of 0.411 s, i.e.
# about 100 s of start-up, compilation, two evaluations and checkpoints
STARTUP_S = 100.0
MARGIN = 2.0
RETRIEVAL_LIMIT_MINUTES = 15.0  # issue 21: one retrieval model in <= 15 minutes on one H200


def attended_keys(cfg: ModelConfig, seq_len: int) -> tuple[float, float]:
    """(keys a query multiplies with q and p, keys it only scores with q), averaged over the
    positions 0 .. seq_len - 1 of one sequence."""
    t = np.arange(seq_len)
    if cfg.attention == "full":
        return float(np.mean(t + 1)), 0.0
    window = np.minimum(t + 1, cfg.nsa.window)
    if cfg.attention == "window":
        return float(np.mean(window)), 0.0
    nsa = cfg.nsa
    compressed = nsa.num_visible_compressed(t)
    selected = np.minimum(t + 1, nsa.num_selected * nsa.select_block)
    return float(np.mean(compressed + selected + window)), float(np.mean(compressed))


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward and backward) at context seq_len (docstring)."""
    norms = (2 * cfg.num_layers + 1) * cfg.d_model
    phi = num_params(cfg) - num_params(dataclasses.replace(cfg, compressor="mean"))
    weights = 2 * (num_params(cfg) - norms - phi) + 2 * phi / cfg.nsa.compress_stride
    both, scored = attended_keys(cfg, seq_len)
    attention = 2 * cfg.num_heads * ((cfg.head_dim + cfg.v_head_dim) * both + cfg.head_dim * scored)
    return 3.0 * (weights + cfg.num_layers * attention)


def achieved_flops_per_s(attention: str) -> float:
    """FLOP/s the reference run of `attention` reached: its FLOPs per token x its tokens/s."""
    if attention not in REFERENCES:
        raise ValueError(f"no measured throughput for attention {attention!r}; known: "
                         f"{sorted(REFERENCES)}")
    ref = REFERENCES[attention]
    run = resolve(load_config_file(ROOT / "configs" / ref.config))
    return train_flops_per_token(run.model, run.data.seq_len) * ref.tokens_per_s


def training_seconds(run: RunConfig) -> float:
    """Estimated seconds of the run's training steps and periodic evaluations (no start-up)."""
    per_token = train_flops_per_token(run.model, run.data.seq_len)
    batch_tokens = run.data.batch_size * run.data.seq_len
    evaluations = run.train.steps // run.train.eval_every + 2  # step 0, every eval_every, the last
    eval_tokens = evaluations * run.train.eval_batches * len(run.data.corpora) * batch_tokens
    flops = per_token * (run.train.steps * batch_tokens + eval_tokens / 3)
    return flops / achieved_flops_per_s(run.model.attention)


def grid_seconds(run: RunConfig, lengths, cells_per_length: int) -> float:
    """Estimated seconds of forward passes over `cells_per_length` examples at each of `lengths`
    (forward = a third of training FLOPs; compilation not counted)."""
    flops = sum(cells_per_length * n * train_flops_per_token(run.model, n) / 3 for n in lengths)
    return flops / achieved_flops_per_s(run.model.attention)


def describe(config: pathlib.Path, overrides: list[str]) -> str:
    run = resolve(parse_train_args(["--config", str(config), *overrides])[0])
    minutes = training_seconds(run) / 60
    per_token = train_flops_per_token(run.model, run.data.seq_len)
    speed = achieved_flops_per_s(run.model.attention) / per_token
    return (f"{config.name}: {run.model.attention}, {num_params(run.model) / 1e6:.2f}M parameters, "
            f"{per_token / 1e6:.1f} MFLOP per training token at {run.data.seq_len} "
            f"({speed:,.0f} tokens/s; {MARGIN:g}x slower: {speed / MARGIN:,.0f}), "
            f"{run.train.steps} steps of {run.data.batch_size} x {run.data.seq_len}: "
            f"{minutes:.1f} min estimated ({MARGIN:g}x: "
            f"{MARGIN * minutes:.1f} min) + {STARTUP_S / 60:.1f} min start-up per chunk" +
            (_grid_line(run) if run.data.passkey_prob > 0 else ""))


def _grid_line(run: RunConfig) -> str:
    from experiments.retrieval import DEPTHS, EXAMPLES, LENGTH_FACTORS

    lengths = [run.data.seq_len * f for f in LENGTH_FACTORS]
    minutes = grid_seconds(run, lengths, len(DEPTHS) * EXAMPLES) / 60
    return (f"; passkey grid {lengths} x {len(DEPTHS)} depths x {EXAMPLES} examples: "
            f"{minutes:.1f} min estimated ({MARGIN:g}x: {MARGIN * minutes:.1f} min) + compilation")


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv
    configs = [pathlib.Path(a) for a in args if not a.startswith("--")]
    overrides = [a for a in args if a.startswith("--")]
    if not configs:
        sys.exit("usage: python experiments/budget.py CONFIG [CONFIG ...] [--config.key=value ...]")
    for attention, ref in REFERENCES.items():
        print(f"reference {attention}: configs/{ref.config} at {ref.tokens_per_s:,.0f} tokens/s "
              f"({ref.source}) = {achieved_flops_per_s(attention) / 1e12:.1f} TFLOP/s achieved")
    for config in configs:
        print(describe(config, overrides))


if __name__ == "__main__":
    main()
