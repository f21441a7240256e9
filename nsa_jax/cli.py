"""Console entry points (thin: parse arguments, call the library)."""
from __future__ import annotations

import argparse
import sys
import time


def at_least(kind, minimum):
    """An argparse type: a `kind` (int or float) >= minimum, so a bad value is rejected while
    parsing, before anything loads, in a message naming the flag."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value >= minimum:
            raise argparse.ArgumentTypeError(f"must be {'an int' if kind is int else 'a number'}"
                                             f" >= {minimum}, got {text!r}")
        return value
    return parse


def demo(argv=None) -> None:
    """`nsa-demo`: run nsa_attention with the paper's hyper-parameters on random data and show
    which selection blocks a few queries chose."""
    import jax
    import jax.numpy as jnp

    from nsa_jax import NSAConfig, ops

    parser = argparse.ArgumentParser(prog="nsa-demo", description=demo.__doc__)
    parser.add_argument("--length", type=at_least(int, 1), default=4096, help="tokens T")
    parser.add_argument("--q-heads", type=at_least(int, 1), default=16)
    parser.add_argument("--kv-heads", type=at_least(int, 1), default=1)
    parser.add_argument("--head-dim", type=at_least(int, 1), default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--implementation", default=None, choices=ops.IMPLEMENTATIONS)
    args = parser.parse_args(argv)

    cfg = NSAConfig()
    keys = jax.random.split(jax.random.PRNGKey(args.seed), 4)
    shape_q = (1, args.length, args.q_heads, args.head_dim)
    shape_kv = (1, args.length, args.kv_heads, args.head_dim)
    q = jax.random.normal(keys[0], shape_q)
    k = jax.random.normal(keys[1], shape_kv)
    v = jax.random.normal(keys[2], shape_kv)
    gates = jax.nn.sigmoid(jax.random.normal(keys[3], shape_q[:3] + (3,)))

    fn = jax.jit(lambda *a: ops.nsa_attention(*a, cfg, implementation=args.implementation,
                                              return_aux=True))
    start = time.perf_counter()
    out, aux = jax.block_until_ready(fn(q, k, v, gates))
    elapsed = time.perf_counter() - start
    print(f"{cfg}\nq {shape_q}, k/v {shape_kv}: nsa_attention -> {out.shape} {out.dtype} "
          f"in {elapsed:.2f} s (compile included) on {jax.default_backend()}, "
          f"finite: {bool(jnp.all(jnp.isfinite(out)))}")
    print("selected blocks (KV head 0; block j = tokens [64j, 64j+63]; -1 = unused slot):")
    for t in sorted({0, 63, 64, 700, args.length // 2, args.length - 1} & set(range(args.length))):
        print(f"  query {t:6d} (block {t // cfg.select_block:3d}): {aux['indices'][0, t, 0].tolist()}")


TRAIN_USAGE = """usage: nsa-train --config FILE [--workdir DIR] [--config.key=value ...]

Train the run described by FILE (a Python file whose get_config() returns an ml_collections
ConfigDict; see configs/). DIR defaults to runs/<FILE name>. Re-running the same command resumes
from the newest good checkpoint in DIR. SIGTERM / Ctrl-C save a checkpoint and stop."""

EVAL_USAGE = """usage: nsa-eval --workdir DIR [--config.eval.key=value ...]

Evaluate the newest checkpoint of the nsa-train run in DIR: validation loss and perplexity at
each context length of config.eval.lengths, passkey retrieval accuracy on the
(eval.passkey_lengths x eval.passkey_depths) grid. Writes DIR/eval.json and DIR/eval.png."""


def train(argv=None) -> None:
    """`nsa-train` and `python -m nsa_jax.train`."""
    from nsa_jax.train import Interrupted, TrainingDiverged, parse_train_args, train as run

    argv = _args_or_usage(argv, TRAIN_USAGE)
    try:
        config, workdir = parse_train_args(argv)
        run(config, workdir)
    except (ValueError, FileNotFoundError, TrainingDiverged) as error:
        sys.exit(f"nsa-train: error: {error}")
    except Interrupted as stop:
        print(f"nsa-train: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)


def evaluate(argv=None) -> None:
    """`nsa-eval` and `python -m nsa_jax.eval`."""
    from nsa_jax.eval import evaluate_workdir, parse_eval_args

    argv = _args_or_usage(argv, EVAL_USAGE)
    try:
        config, workdir = parse_eval_args(argv)
        evaluate_workdir(config, workdir)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"nsa-eval: error: {error}")


def generate(argv=None) -> None:
    """`nsa-generate`: sample text from the newest checkpoint of an nsa-train run, with the
    decoding cache (prefill, then one jitted step per token); prints the text and tokens/s."""
    from nsa_jax import ops

    parser = argparse.ArgumentParser(prog="nsa-generate", description=generate.__doc__)
    parser.add_argument("--workdir", required=True, help="directory of an nsa-train run")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=at_least(int, 1), default=200)
    parser.add_argument("--temperature", type=at_least(float, 0), default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=at_least(int, 1), default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--implementation", default=None, choices=ops.IMPLEMENTATIONS,
                        help="decode attention (default: the run's model.implementation)")
    args = parser.parse_args(argv)
    try:
        _generate(args)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"nsa-generate: error: {error}")


def _generate(args) -> None:
    import jax

    from nsa_jax.data import BOS_ID, EOS_ID, VOCAB_SIZE, detokenize, tokenize
    from nsa_jax.generation import generate as sample_tokens
    from nsa_jax.train import load_trained_run

    trained = load_trained_run(args.workdir)
    model, step = trained.model, trained.step
    prompt = [BOS_ID, *tokenize(args.prompt).tolist()]
    out = sample_tokens(model, [prompt], args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, seed=args.seed, num_tokens=VOCAB_SIZE,
                        implementation=args.implementation)
    tokens = out.tokens[0]
    text = detokenize(tokens[:tokens.index(EOS_ID)] if EOS_ID in tokens else tokens)
    print(f"{args.prompt}{text}", flush=True)
    print(f"[{args.workdir} step {step}, {model.cfg.attention} attention, "
          f"{jax.default_backend()}] prompt {len(prompt)} tokens: prefill + first token "
          f"{out.prefill_seconds:.2f} s (compilation included); {out.tokens_per_second:.1f} "
          f"tokens/s over {out.timed_steps} decode steps (compilation excluded)",
          file=sys.stderr, flush=True)


def _args_or_usage(argv, usage: str) -> list[str]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or {"-h", "--help"} & set(argv):
        print(usage)
        sys.exit(0 if argv else 2)
    return argv
