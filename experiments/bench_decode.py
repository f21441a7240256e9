"""Decoding at the memory-traffic limit (issue 19): NSA decode steps against cuDNN full attention,
steps chained on the device.

Run on one GPU (H200), from the repository root:
    python experiments/bench_decode.py            # ~5 min, compiles included
    python experiments/bench_decode.py --quick    # ~1 min: checks, the op at 64k and 8k, batch 1
    python experiments/bench_decode.py --smoke    # CPU self-test of this script (interpret mode)
Prints a short table; with $OUT set also writes $OUT/bench_decode.json and $OUT/bench_decode.md.

1. check: every NSA decode implementation timed below (the Triton kernels with automatic
   splits, and with one compressed split that also ranks the blocks; the Mosaic GPU compressed
   pass on Hopper) against the xla decode path on this GPU, float32 and bfloat16, one
   batch whose rows sit on compressed-token, selection-block and tile boundaries (so its rows
   have different lengths); and cuDNN's decode against the xla dense decode. Exit 1 if the
   default implementation fails; a failing variant is reported and not timed.
2. op: one layer's attention for one new token, paper shape (Hq=64, Hkv=4, D=128, bf16, l=32,
   d=16, l'=64, n=16, w=512), random cache, at 64k context with batch 1 and 32 and 8k with batch
   1. Steps are chained in one jitted fori_loop (the position changes every step, so no step can
   be hoisted; each step's output is summed into the carry), time / steps. Printed per row: ms
   per step, full / NSA ratios against cuDNN, the cache bytes the step must read and the time
   they take at the HBM bandwidth (--hbm-tbps, default by device), and the kernels XLA launches
   per step (instructions of the compiled step that run on the device).
3. model: tokens/s of a 12-layer model of configs/small_nsa.py's shape (random weights, every
   cache filled with random K/V) at 64k context, batch 8, NSA against the same model with full
   attention (its decode is cuDNN's through ops.dense_decode_attention): greedy generation
   chained on the device, and host-driven as nsa-generate runs (one jitted step per token,
   blocked once at the end).
4. graphs (not with --quick): the NSA op (Triton) and cuDNN at 64k, batch 1, re-timed in child
   processes with XLA command buffers (CUDA graphs) off, and with WHILE added to jax 0.11.2's
   default set (FUSION, CUBLAS, CUBLASLT, CUDNN, CUSTOM_CALL, CONDITIONAL, DYNAMIC_SLICE_FUSION,
   --xla_gpu_graph_min_graph_size=5, which `op` runs with): then the whole chained loop is one
   graph. Pallas-Triton calls are kernel thunks (FUSION), Mosaic GPU's an FFI call marked
   command-buffer compatible (CUSTOM_CALL), cuDNN's CUDNN.
Targets (issue 19): 64k batch 1 >= 2x cuDNN, batch 32 >= 6x, 8k batch 1 >= 1.0x, the model
>= 3x the full-attention model's tokens/s.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nsa_jax import ModelConfig, NSAConfig, ops  # noqa: E402
from nsa_jax.generation import cache_sizes, init_state, step  # noqa: E402

SHAPE = dict(hq=64, hkv=4, d=128)  # the paper's kernel-benchmark shape (--smoke shrinks it)
CFG = NSAConfig()
HBM_TBPS = {"H200": 4.8, "H100": 3.35}  # spec-sheet HBM bandwidth by device kind
GRAPH_MODES = {"off": "--xla_gpu_enable_command_buffer=",  # the default is timed in `op`
               "while": "--xla_gpu_enable_command_buffer=+WHILE"}
# HLO instructions that launch nothing
NO_LAUNCH = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
             "opt-barrier", "partition-id", "replica-id"}
INTERPRET = False  # --smoke: kernels in interpret mode on CPU
MODEL_S, GRAPHS_S = 120, 60  # what the model and graphs sections take, compiles included


# --- inputs ---------------------------------------------------------------------------------------

def random_cache(key, batch: int, context: int, dtype):
    """Caches of `context` tokens laid out as nsa_jax.generation.cache does, the query at the
    last position."""
    hq, hkv, d = SHAPE["hq"], SHAPE["hkv"], SHAPE["d"]
    sizes = cache_sizes(ModelConfig(nsa=CFG), context)
    ks = jax.random.split(key, 6)
    kv = lambda k, n: jax.random.normal(k, (batch, n, hkv, d), dtype)
    return dict(q=jax.random.normal(ks[0], (batch, hq, d), dtype), k=kv(ks[1], sizes["full"]),
                v=kv(ks[2], sizes["full"]), k_cmp=kv(ks[3], sizes["compressed"]),
                v_cmp=kv(ks[4], sizes["compressed"]),
                gates=jax.nn.sigmoid(jax.random.normal(ks[5], (batch, hq, 3))).astype(dtype),
                position=jnp.full((batch,), context - 1, jnp.int32))


def boundary_positions(context: int):
    """Rows at: no compressed token yet, a compressed token just completed, the first and last
    key of a selection block, the position completing a full 128-slot compressed tile, the
    last slot."""
    l, d, lp = CFG.compress_block, CFG.compress_stride, CFG.select_block
    tile_full = 127 * d + l - 1
    return jnp.array([l - 2, l - 1 + 3 * d, 5 * lp, 6 * lp - 1, tile_full, tile_full + d,
                      context - 1], jnp.int32)


# --- what is timed --------------------------------------------------------------------------------

def nsa_variants():
    """name -> (f(args) -> (out, aux), the cache dtypes it takes): the NSA decode kernels this
    GPU runs, the Triton ones and, on Hopper, those with the Mosaic GPU compressed pass."""
    from pallas_kernels.gpu.mosaic import common
    from pallas_kernels.gpu.mosaic import decode_attention as mosaic
    from pallas_kernels.gpu.triton import decode_attention as triton

    def kernel(entry, context=contextlib.nullcontext, tiling=None):
        def run(a):
            with context():
                return entry(a["q"], a["k"], a["v"], a["k_cmp"], a["v_cmp"], a["gates"],
                             a["position"], CFG, interpret=INTERPRET, tiling=tiling)
        return run

    both = (jnp.float32, jnp.bfloat16)
    variants = {"nsa-triton": (kernel(triton.nsa_decode_attention), both),
                # one compressed split per (sequence, KV head), the top-n inside it: 3 launches
                "nsa-triton-fused": (kernel(triton.nsa_decode_attention,
                                            tiling=triton.Tiling(compressed_splits=1)), both)}
    if ops.backend() == "hopper" or INTERPRET:
        interpreted = common.abstract_hopper if INTERPRET else contextlib.nullcontext
        variants["nsa-mosaic"] = (kernel(mosaic.nsa_decode_attention, interpreted),
                                  (jnp.bfloat16,))
    return variants


def nsa_op(implementation):
    return lambda a: ops.nsa_decode_attention(
        a["q"], a["k"], a["v"], a["k_cmp"], a["v_cmp"], a["gates"], a["position"], CFG,
        implementation=implementation, return_aux=True)


def full_op(implementation):
    return lambda a: ops.dense_decode_attention(a["q"], a["k"], a["v"], a["position"],
                                                implementation=implementation)


def first(out):
    return out[0] if isinstance(out, tuple) else out


def chained_ms(fn, args, steps: int, repeats: int = 3) -> float:
    """ms per call of `fn` chained `steps` times in one jitted fori_loop (median of `repeats`)."""
    def loop(a):
        def body(i, total):
            out = first(fn(dict(a, position=a["position"] - i % 2)))
            return total + jnp.sum(out.astype(jnp.float32))
        return jax.lax.fori_loop(0, steps, body, jnp.float32(0))

    run = jax.jit(loop)
    jax.block_until_ready(run(args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times) / steps


def launches(fn, *args) -> int:
    """Instructions of the compiled entry computation that run on the device: of `fn` (a
    compiled executable, or a function jitted and compiled for `args`)."""
    compiled = fn if hasattr(fn, "as_text") else jax.jit(fn).lower(*args).compile()
    bodies = re.findall(r"\n(?:ENTRY |%?command_buffer)[^\n]*\{\n(.*?)\n\}", compiled.as_text(),
                        re.S)  # the entry, and command buffers if XLA outlined them in HLO
    found = re.findall(r"=\s*(?:\([^=]*?\)|\S+)\s+([\w-]+)\(", "\n".join(bodies))
    return sum(op not in NO_LAUNCH | {"call"} for op in found)


def cache_bytes(kind: str, batch: int, context: int, itemsize: int = 2) -> int:
    """Cache bytes one step must read: full attention every key [0, t]; NSA the visible
    compressed tokens, n selected blocks and the window."""
    keys = context
    if kind == "nsa":
        keys = (CFG.num_compressed(context) + CFG.num_selected * CFG.select_block
                + min(CFG.window, context))
    return batch * SHAPE["hkv"] * keys * 2 * SHAPE["d"] * itemsize


# --- 1. check -------------------------------------------------------------------------------------

def check(context: int, log) -> dict:
    """name -> passed, for every NSA variant and cuDNN's decode."""
    results = {}
    want = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        args = random_cache(jax.random.key(0), 7, context, dtype)
        args["position"] = boundary_positions(context)
        want[dtype] = jax.jit(nsa_op("xla"))(args)
        for name, (fn, dtypes) in nsa_variants().items():
            if dtype not in dtypes:
                continue
            try:
                out, aux = jax.jit(fn)(args)
                ok, line = _compare(out, aux, *want[dtype], dtype)
            except Exception as error:  # a variant this GPU cannot compile is reported
                ok, line = False, f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            results[name] = results.get(name, True) and ok
            log(f"check {name:11s} {jnp.dtype(dtype).name:8s} {line}")
    args = random_cache(jax.random.key(1), 3, context, jnp.bfloat16)
    args["position"] = jnp.array([0, context // 3, context - 1], jnp.int32)
    try:
        got = jax.jit(full_op("pallas"))(args)
        err = _rel(got, jax.jit(full_op("xla"))(args))
        results["full-cudnn"] = err < 2e-2
        log(f"check full-cudnn  bfloat16 max rel err {err:.2e}: "
            f"{'ok' if err < 2e-2 else 'FAILED'}")
    except Exception as error:
        results["full-cudnn"] = False
        log(f"check full-cudnn unavailable: {type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}")
    return results


def _rel(got, want) -> float:
    """max |got - want| / max |want| over finite entries; inf where the non-finite ones differ
    (an lse is -inf where a row sees no compressed token)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    finite = np.isfinite(want)
    if not np.array_equal(np.isfinite(got), finite) or not np.array_equal(got[~finite],
                                                                          want[~finite]):
        return float("inf")
    return float(np.abs(got[finite] - want[finite]).max() / np.abs(want[finite]).max())


def _compare(out, aux, want, want_aux, dtype):
    err, lse = _rel(out, want), _rel(aux["lse_cmp"], want_aux["lse_cmp"])
    same = float(np.mean(np.asarray(aux["indices"]) == np.asarray(want_aux["indices"])))
    limit = 1e-4 if dtype == jnp.float32 else 3e-2
    ok = bool(np.isfinite(np.asarray(out, np.float32)).all()) and err < limit and lse < limit \
        and same >= (1.0 if dtype == jnp.float32 else 0.99)
    return ok, (f"max rel err {err:.2e}, lse {lse:.2e} (limit {limit:.0e}), indices equal "
                f"{same:.4f}: {'ok' if ok else 'FAILED'}")


# --- 2. op ----------------------------------------------------------------------------------------

def bench_ops(configs, variants, steps: int, hbm_tbps: float, with_xla: bool, log) -> list:
    """The first config also times the xla paths (NSA and full) when `with_xla`."""
    rows, counted = [], {}
    for context, batch in configs:
        args = random_cache(jax.random.key(context + batch), batch, context, jnp.bfloat16)
        fns = dict(variants)
        fns["full-cudnn"] = full_op("pallas")
        if with_xla and (context, batch) == configs[0]:
            fns["nsa-xla"], fns["full-xla"] = nsa_op("xla"), full_op("xla")
        for name, fn in fns.items():
            try:
                ms = chained_ms(fn, args, steps)
                if name not in counted:
                    counted[name] = launches(lambda a: first(fn(a)), args)
            except Exception as error:
                log(f"  {name} unavailable at {context} x {batch}: {type(error).__name__}: "
                    f"{str(error).splitlines()[0][:160]}")
                continue
            kind = "nsa" if name.startswith("nsa") else "full"
            nbytes = cache_bytes(kind, batch, context)
            rows.append(dict(context=context, batch=batch, name=name, ms=ms,
                             launches=counted[name], mbytes=nbytes / 1e6,
                             floor_ms=nbytes / (hbm_tbps * 1e9)))
        del args
        _log_rows(log, [r for r in rows if (r["context"], r["batch"]) == (context, batch)])
    return rows


def _log_rows(log, rows):
    base = next((r["ms"] for r in rows if r["name"] == "full-cudnn"), None)
    for r in rows:
        ratio = f"{base / r['ms']:6.2f}x" if base else "   n/a"
        log(f"op {r['context']:>6d} B={r['batch']:<3d} {r['name']:12s} {r['ms']:8.4f} ms  "
            f"cudnn/this {ratio}  {r['mbytes']:8.1f} MB  floor {r['floor_ms']:7.4f} ms "
            f"({100 * r['floor_ms'] / r['ms']:5.1f}% of HBM)  {r['launches']:3d} launches")


# --- 3. model -------------------------------------------------------------------------------------

def model_config(attention: str, smoke: bool) -> ModelConfig:
    from nsa_jax.train import load_config_file
    from nsa_jax.train.run_config import model_config as from_section

    section = load_config_file(REPO / "configs" / "small_nsa.py").model
    section.attention = attention
    if smoke:
        section.num_layers, section.d_model, section.mlp_hidden = 2, 64, 128
    return from_section(section)


def synthetic_state(cfg: ModelConfig, batch: int, max_len: int, length: int, key):
    """A decode state whose caches hold random K/V, `length` tokens per sequence."""
    state = init_state(cfg, batch, max_len)
    leaves, tree = jax.tree.flatten(state.layers)
    keys = jax.random.split(key, len(leaves))
    layers = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape, x.dtype)
                                       for x, k in zip(leaves, keys)])
    return state._replace(layers=layers, lengths=jnp.full((batch,), length, jnp.int32))


def bench_model(context: int, batch: int, steps: int, smoke: bool, log) -> list:
    from flax import nnx

    from nsa_jax.models import DecoderLM

    rows = []
    for attention in ("nsa", "full"):
        cfg = model_config(attention, smoke)
        graphdef, params = nnx.split(DecoderLM(cfg, rngs=nnx.Rngs(0)))
        tokens = jnp.zeros((batch,), jnp.int32)
        max_len = context + 3 * steps + 8
        state = synthetic_state(cfg, batch, max_len, context - 1, jax.random.key(1))

        def loop(p, s, t):  # greedy generation on the device
            model = nnx.merge(graphdef, p)

            def body(_, carry):
                logits, s = step(model, *carry)
                return s, jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return jax.lax.fori_loop(0, steps, body, (s, t))[1]

        chained = jax.jit(loop)
        jax.block_until_ready(chained(params, state, tokens))
        device_s = []
        for _ in range(3):
            start = time.perf_counter()
            jax.block_until_ready(chained(params, state, tokens))
            device_s.append(time.perf_counter() - start)
        device_s = statistics.median(device_s)
        one = jax.jit(lambda p, s, t: step(nnx.merge(graphdef, p), s, t),
                      donate_argnums=1).lower(params, state, tokens).compile()
        count = launches(one)
        host_s = _host_loop(one, params, state, tokens, steps)
        rows.append(dict(attention=attention, context=context, batch=batch,
                         layers=cfg.num_layers, device_tokens_per_s=batch * steps / device_s,
                         host_tokens_per_s=batch * steps / host_s, launches=count))
        r = rows[-1]
        log(f"model {attention:4s} {context:>6d} B={batch:<2d} {cfg.num_layers} layers  device "
            f"{r['device_tokens_per_s']:9.0f} tok/s  host {r['host_tokens_per_s']:9.0f} tok/s  "
            f"{count} launches/step")
        del state
    ratio = lambda key: rows[0][key] / rows[1][key]  # nsa / full
    log(f"model nsa/full tokens/s: device {ratio('device_tokens_per_s'):.2f}x, host "
        f"{ratio('host_tokens_per_s'):.2f}x (target >= 3x)")
    return rows


def _host_loop(one, params, state, tokens, steps: int) -> float:
    """Seconds for `steps` tokens, one jitted step each, as nsa-generate dispatches them (the
    first two steps compile and warm up; blocked once at the end)."""
    for _ in range(2):
        logits, state = one(params, state, tokens)
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    jax.block_until_ready(tokens)
    start = time.perf_counter()
    for _ in range(steps):
        logits, state = one(params, state, tokens)
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    jax.block_until_ready(tokens)
    return time.perf_counter() - start


# --- 4. graphs ------------------------------------------------------------------------------------

def bench_graphs(context: int, steps: int, log) -> dict:
    """The Triton NSA op re-timed in child processes under each XLA command-buffer setting."""
    out = {}
    for mode, flag in GRAPH_MODES.items():
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flag).strip())
        done = subprocess.run([sys.executable, __file__, "--child-op", str(context),
                               "--steps", str(steps)], env=env, capture_output=True, text=True,
                              timeout=240)
        found = re.findall(r"^child (\{.*\})$", done.stdout, re.M)
        if done.returncode or not found:
            log(f"graphs {mode}: failed ({done.returncode}): {done.stderr.strip()[-300:]}")
            continue
        out[mode] = json.loads(found[-1])
        log(f"graphs {mode:8s} 64k B=1 nsa-triton {out[mode]['nsa-triton']:.4f} ms  full-cudnn "
            f"{out[mode]['full-cudnn']:.4f} ms  ({flag or 'jax defaults'})")
    return out


def child_op(context: int, steps: int) -> None:
    args = random_cache(jax.random.key(0), 1, context, jnp.bfloat16)
    times = {"nsa-triton": chained_ms(nsa_variants()["nsa-triton"][0], args, steps),
             "full-cudnn": chained_ms(full_op("pallas"), args, steps)}
    print("child " + json.dumps(times), flush=True)


# --- main -----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU self-test, tiny shapes")
    parser.add_argument("--steps", type=int, default=None, help="steps per chained loop "
                        "(default 200; model 32)")
    parser.add_argument("--hbm-tbps", type=float, default=None)
    parser.add_argument("--budget-s", type=float, default=330.0, help="sections that would "
                        "likely end past this many seconds are skipped (one device call)")
    parser.add_argument("--child-op", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_op:
        child_op(args.child_op, args.steps or 200)
        return 0
    global INTERPRET
    INTERPRET = args.smoke
    if args.smoke:
        SHAPE.update(hq=16, hkv=2, d=64)
    lines = []

    def log(line=""):
        print(line, flush=True)
        lines.append(line)

    device = jax.devices()[0].device_kind
    log(f"# bench_decode {time.strftime('%Y-%m-%d %H:%M:%S')} jax {jax.__version__} {device} "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} argv {sys.argv[1:]}")
    if jax.default_backend() != "gpu" and not args.smoke:
        log("no GPU (use --smoke for the CPU self-test)")
        return 2
    hbm = args.hbm_tbps or next((v for k, v in HBM_TBPS.items() if k in device), 3.35)
    started = time.perf_counter()
    smoke = args.smoke
    passed = check(2048 if smoke else 4096, log)
    if not passed.get("nsa-triton"):
        log("check FAILED for the default NSA decode kernels: no timings")
        return 1
    variants = {k: fn for k, (fn, _) in nsa_variants().items() if passed.get(k)}
    steps = args.steps or (4 if smoke else 200)
    if smoke:
        configs = [(2048, 1), (2048, 2)]
    elif args.quick:
        configs = [(65536, 1), (8192, 1)]
    else:
        configs = [(65536, 1), (65536, 32), (8192, 1)]
    result = dict(device=device, jax=jax.__version__, hbm_tbps=hbm, check=passed,
                  op=bench_ops(configs, variants, steps, hbm, not args.quick, log))
    left = lambda: args.budget_s - (time.perf_counter() - started)
    if not args.quick and (smoke or left() > MODEL_S):
        result["model"] = bench_model(2048 if smoke else 65536, 2 if smoke else 8,
                                      2 if smoke else 32, smoke, log)
    if not (args.quick or smoke) and left() > GRAPHS_S:
        result["graphs"] = bench_graphs(65536, steps, log)
    for name, need in (("model", MODEL_S), ("graphs", GRAPHS_S)):
        if name not in result and not (args.quick or smoke):
            log(f"# {name} skipped: under {need} s of the {args.budget_s:.0f} s budget left")
    log(f"# {time.perf_counter() - started:.0f} s")
    _write(result, lines)
    return 0


def _write(result: dict, lines: list) -> None:
    out = os.environ.get("OUT")
    if not out:
        return
    path = pathlib.Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "bench_decode.json").write_text(json.dumps(result, indent=1))
    (path / "bench_decode.md").write_text("```\n" + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    sys.exit(main())
