"""Per-token decode latency: NSA (Pallas decode kernels) vs full attention, 8k-64k context.

Run on a GPU (H100), from the repository root:
    python experiments/bench_decode.py --out runs/bench_decode/h100.log            # ~5-10 min
    python experiments/bench_decode.py --quick --out runs/bench_decode/quick.log   # ~1 min

First checks the Pallas decode kernels against the xla decode path on the GPU (exits 1 on a
mismatch, before any timing). Then, per context length and batch size, times (median of --iters
calls after --warmup) on random bf16 caches of the paper's shape (Hq=64, Hkv=4, D=128; l=32,
d=16, l'=64, n=16, w=512):
  attention op  one decode step of one layer's attention: NSA pallas, the same with the top-n
                in XLA instead of its kernel, NSA xla, full attention through XLA, cuDNN
                and jax's Pallas GQA decode kernel (whichever run here);
  model step    nsa_jax.generation.step of a 1-layer synthetic DecoderLM (d_model --d-model) whose
                cache is filled with random K/V, NSA vs full.
Each is timed twice: "op"/"model" lines dispatch every step from Python and wait for it (what a
host-driven generation loop sees, launch and dispatch overhead included); "oploop"/"modelloop"
lines run --loop-iters steps inside one jitted fori_loop (greedy generation on the device) and
divide, which leaves the GPU's own time per step. Ratios are full / NSA with the fastest
full-attention variant that ran. Every line also goes to --out.
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nsa_jax import ModelConfig, NSAConfig, ops  # noqa: E402
from nsa_jax.generation import cache_sizes, init_state, step  # noqa: E402

HQ, HKV, D = 64, 4, 128


class Log:
    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("a")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def random_cache(key, cfg: NSAConfig, batch: int, context: int, dtype):
    """Full and compressed caches of `context` tokens, laid out as nsa_jax.generation.cache does."""
    sizes = cache_sizes(ModelConfig(nsa=cfg), context)
    ks = jax.random.split(key, 6)
    kv = lambda k, n: jax.random.normal(k, (batch, n, HKV, D), dtype)
    return dict(q=jax.random.normal(ks[0], (batch, HQ, D), dtype), k=kv(ks[1], sizes["full"]),
                v=kv(ks[2], sizes["full"]), k_cmp=kv(ks[3], sizes["compressed"]),
                v_cmp=kv(ks[4], sizes["compressed"]),
                gates=jax.nn.sigmoid(jax.random.normal(ks[5], (batch, HQ, 3))).astype(dtype),
                position=jnp.full((batch,), context - 1, jnp.int32))


def nsa_fn(cfg, implementation):
    return jax.jit(lambda a: ops.nsa_decode_attention(
        a["q"], a["k"], a["v"], a["k_cmp"], a["v_cmp"], a["gates"], a["position"], cfg,
        implementation=implementation, return_aux=True))


def nsa_xla_topn_fn(cfg):
    """The Pallas decode path with its top-n done by XLA between the kernels, as before the
    top-n kernel: shows what that kernel saves."""
    from nsa_jax.ops.decode_attention import select_decode_blocks
    from pallas_kernels.gpu.triton.decode_attention import nsa_decode_attention

    def run(a):
        top_n = lambda logits, lse, position: select_decode_blocks(
            logits, lse, position, cfg, a["k"].shape[1] // cfg.select_block)
        return nsa_decode_attention(a["q"], a["k"], a["v"], a["k_cmp"], a["v_cmp"], a["gates"],
                                    a["position"], cfg, top_n=top_n)

    return jax.jit(run)


def full_fns():
    """Full-attention decode variants: name -> jitted f(args) -> [B, Hq, D]."""
    fns = {"full-xla": jax.jit(lambda a: ops.dense_decode_attention(
        a["q"], a["k"], a["v"], a["position"]))}
    fns["full-cudnn"] = jax.jit(lambda a: jax.nn.dot_product_attention(
        a["q"][:, None], a["k"], a["v"], key_value_seq_lengths=a["position"] + 1,
        implementation="cudnn")[:, 0])
    try:
        from jax.experimental.pallas.ops.gpu import decode_attention
        fns["full-pallas-gqa"] = jax.jit(lambda a: decode_attention.gqa(
            a["q"], a["k"], a["v"], kv_seq_len=a["position"] + 1))
    except ImportError:
        pass
    return fns


def median_ms(fn, args, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def device_loop_ms(fn, args, iters: int, repeats: int = 3) -> float:
    """Per-call time of `fn` chained `iters` times inside one jitted fori_loop: the GPU's time per
    step without a host dispatch per step. Each call's position depends on the loop index, so
    XLA cannot hoist a call out of the loop."""
    def loop(a):
        def body(i, total):
            out = fn(dict(a, position=a["position"] - i % 2))
            out = out[0] if isinstance(out, tuple) else out
            return total + jnp.sum(out.astype(jnp.float32))
        return jax.lax.fori_loop(0, iters, body, jnp.float32(0))

    return median_ms(jax.jit(loop), args, warmup=1, iters=repeats) / iters


def check_kernels(cfg, context: int, log) -> bool:
    """Pallas vs xla decode path on the GPU, f32 (HIGHEST-precision dots) and bf16, for queries
    before the first compressed token, mid-cache and at the last slot."""
    ok = True
    for dtype, tolerance in ((jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)):
        args = random_cache(jax.random.key(0), cfg, 3, context, dtype)
        args["position"] = jnp.array([10, context // 2 + 7, context - 1], jnp.int32)
        got, got_aux = nsa_fn(cfg, "pallas")(args)
        want, want_aux = nsa_fn(cfg, "xla")(args)
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        err = float(np.abs(got - want).max() / np.abs(want).max())
        same = float(np.mean(np.asarray(got_aux["indices"]) == np.asarray(want_aux["indices"])))
        finite = bool(np.isfinite(got).all())
        good = finite and err < tolerance and same > (0.999 if dtype == jnp.float32 else 0.95)
        log(f"check {jnp.dtype(dtype).name}: max rel err {err:.2e} (limit {tolerance:.0e}), "
            f"indices equal {same:.4f}, finite {finite}: {'ok' if good else 'FAILED'}")
        ok &= good
    return ok


def log_ratio(log, what, batch, context, times):
    best_full = min((v, k) for k, v in times.items() if k.startswith("full"))
    cols = "  ".join(f"{k} {v:8.3f} ms" for k, v in times.items())
    log(f"{what} B={batch:<2d} T={context:<6d} {cols}  full/nsa "
        f"{best_full[0] / times['nsa-pallas']:5.2f}x (vs {best_full[1]})")


def bench_ops(cfg, contexts, batches, warmup, iters, loop_iters, with_xla, log):
    full = full_fns()
    for batch in batches:
        for context in contexts:
            args = random_cache(jax.random.key(context + batch), cfg, batch, context, jnp.bfloat16)
            times = {"nsa-pallas": median_ms(nsa_fn(cfg, "pallas"), args, warmup, iters),
                     "nsa-pallas-xla-topn": median_ms(nsa_xla_topn_fn(cfg), args, warmup, iters)}
            if with_xla:
                times["nsa-xla"] = median_ms(nsa_fn(cfg, "xla"), args, warmup, iters)
            for name, fn in full.items():
                try:
                    times[name] = median_ms(fn, args, warmup, iters)
                except Exception as error:  # a baseline this GPU/JAX cannot run is reported
                    log(f"  {name} unavailable at B={batch} T={context}: "
                        f"{type(error).__name__}: {str(error).splitlines()[0][:160]}")
                    full = {k: f for k, f in full.items() if k != name}
            log_ratio(log, "op   ", batch, context, times)
            loops = {"nsa-pallas": device_loop_ms(nsa_fn(cfg, "pallas"), args, loop_iters)}
            loops.update({name: device_loop_ms(fn, args, loop_iters) for name, fn in full.items()})
            log_ratio(log, "oploop", batch, context, loops)
            del args


def synthetic_state(cfg: ModelConfig, batch: int, context: int, key):
    """A decode state whose caches hold random K/V for `context` - 1 tokens per sequence."""
    state = init_state(cfg, batch, context)
    leaves, tree = jax.tree.flatten(state.layers)
    keys = jax.random.split(key, len(leaves))
    layers = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape, x.dtype)
                                       for x, k in zip(leaves, keys)])
    return state._replace(layers=layers, lengths=jnp.full((batch,), context - 1, jnp.int32))


def generation_loop(graphdef, steps: int):
    """`steps` greedy decode steps inside one jitted fori_loop (no host dispatch per token)."""
    from flax import nnx

    def loop(params, state, tokens):
        model = nnx.merge(graphdef, params)

        def body(_, carry):
            logits, state = step(model, *carry)
            return state, jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.lax.fori_loop(0, steps, body, (state, tokens))
    return jax.jit(loop)


def bench_model(contexts, batches, d_model, warmup, iters, loop_iters, log):
    from flax import nnx

    from nsa_jax.models import DecoderLM

    for batch in batches:
        for context in contexts:
            times, loops = {}, {}
            for kind in ("nsa", "full"):
                cfg = ModelConfig(vocab_size=512, d_model=d_model, num_layers=1, num_heads=HQ,
                                  num_kv_heads=HKV, head_dim=D, mlp_hidden=4 * d_model,
                                  attention=kind, nsa=NSAConfig(), dtype="bfloat16",
                                  param_dtype="bfloat16")
                graphdef, params = nnx.split(DecoderLM(cfg, rngs=nnx.Rngs(0)))
                run = jax.jit(lambda p, s, t: step(nnx.merge(graphdef, p), s, t),
                              donate_argnums=1)
                # room for every timed step: host-dispatched ones, then the device loop
                state = synthetic_state(cfg, batch, context + warmup + iters + loop_iters + 1,
                                        jax.random.key(1))
                state = state._replace(lengths=jnp.full((batch,), context - 1, jnp.int32))
                tokens = jnp.zeros((batch,), jnp.int32)
                samples = []
                for i in range(warmup + iters):
                    start = time.perf_counter()
                    logits, state = run(params, state, tokens)
                    jax.block_until_ready(logits)
                    if i >= warmup:
                        samples.append(time.perf_counter() - start)
                times[kind] = 1e3 * statistics.median(samples)
                loop = generation_loop(graphdef, loop_iters)  # state is not donated: kept
                loops[kind] = median_ms(lambda s: loop(params, s, tokens), state, 1, 3) / loop_iters
                del state
            for what, t in (("model    ", times), ("modelloop", loops)):
                log(f"{what} B={batch:<2d} T={context:<6d} nsa {t['nsa']:8.3f} ms  full "
                    f"{t['full']:8.3f} ms  full/nsa {t['full'] / t['nsa']:5.2f}x "
                    f"(1 layer, d_model {d_model})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="log file (appended to)")
    parser.add_argument("--contexts", default=None, help="default 8192,16384,32768,65536")
    parser.add_argument("--batches", default=None, help="default 1,8")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=None, help="default 50")
    parser.add_argument("--loop-iters", type=int, default=100,
                        help="steps per device-side loop (the *loop lines)")
    parser.add_argument("--check-context", type=int, default=4096,
                        help="cache length of the kernel check")
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="defaults become: contexts 8k and "
                        "64k, batch 1, 10 iterations, no model step")
    parser.add_argument("--no-xla", action="store_true", help="skip the NSA xla timing")
    parser.add_argument("--no-model", action="store_true", help="skip the model-step timing")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (testing)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.no_model |= quick
    args.iters = args.iters or (10 if quick else 50)
    try:
        contexts = [int(x) for x in (args.contexts or ("8192,65536" if quick else
                                                       "8192,16384,32768,65536")).split(",")]
        batches = [int(x) for x in (args.batches or ("1" if quick else "1,8")).split(",")]
    except ValueError:
        parser.error("--contexts and --batches take comma-separated integers")
    if min(contexts + batches + [args.iters, args.loop_iters]) < 1 or args.warmup < 0 \
            or args.check_context < 64:
        parser.error("contexts, batches, --iters must be >= 1, --warmup >= 0, "
                     "--check-context >= 64")
    log = Log(args.out)
    backend = jax.default_backend()
    log(f"# bench_decode {datetime.datetime.now().isoformat(timespec='seconds')} "
        f"jax {jax.__version__} backend {backend} devices "
        f"{[d.device_kind for d in jax.devices()]}\n# argv {sys.argv[1:]}")
    if backend != "gpu" and not args.allow_cpu:
        log("no GPU: the Pallas kernels would run in interpret mode; pass --allow-cpu to try")
        return 2
    cfg = NSAConfig()
    if not check_kernels(cfg, args.check_context, log):
        log("kernel check FAILED: no timings")
        return 1
    bench_ops(cfg, contexts, batches, args.warmup, args.iters, args.loop_iters, not args.no_xla,
              log)
    if not args.no_model:
        bench_model(contexts, batches, args.d_model, args.warmup, args.iters, args.loop_iters,
                    log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
