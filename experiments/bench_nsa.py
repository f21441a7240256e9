"""Benchmark of the whole NSA op, `nsa_attention(..., implementation="pallas")`, against cuDNN full
causal attention and a peer NSA, forward and forward+backward, with compiled peak-memory estimates.

Run on a GPU:  python experiments/bench_nsa.py [--seq 8192 65536] [--budget 300] [--peer DIR]
1. --peer DIR (a folder holding MDY's `flash_nsa` package and ../shared/bench/peer_mdy_nsa.py; see
   that folder's README): the peer runs first, in a subprocess (PyTorch + Triton, before JAX takes
   the GPU), at the same T; its window branch is stubbed, so cuDNN's sliding window at the same
   shape, timed here, is added to its times, as baselines.md does.
2. Times each pallas-path piece's forward at T=8192 (a failing piece is reported, not fatal),
   checks the pallas path against the xla implementation at T=2048 (exit 1 on mismatch).
3. One markdown row per (shape, T) (paper hyper-parameters l=32, d=16, l'=64, n=16, w=512; bf16,
   B=1, D=128): NSA and cuDNN times (experiments/timing.device_ms), the speed-ups, peak memory, and
   the peer's times and speed-ups against the same cuDNN; then the per-piece breakdown at the
   largest T. Cases past the time budget (seconds since the start) are skipped and listed.
"""
from __future__ import annotations

import argparse
import functools
import os
import pathlib
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from experiments.bench_kernels import SHAPES
from experiments.timing import device_ms
from nsa_jax import NSAConfig, ops
from nsa_jax.ops import selection

CFG = NSAConfig()


def problem(t, hq, hkv, d=128, seed=0, dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.PRNGKey(seed + t + hq), 5)
    q = jax.random.normal(keys[0], (1, t, hq, d), dtype)
    k = jax.random.normal(keys[1], (1, t, hkv, d), dtype)
    v = jax.random.normal(keys[2], (1, t, hkv, d), dtype)
    gates = jax.nn.sigmoid(jax.random.normal(keys[3], (1, t, hq, 3))).astype(dtype)
    do = jax.random.normal(keys[4], (1, t, hq, d), dtype)
    return q, k, v, gates, do


def nsa(impl, segment_ids=None):
    return lambda q, k, v, g: ops.nsa_attention(q, k, v, g, CFG, segment_ids=segment_ids,
                                                implementation=impl)


def cudnn(q, k, v, g):
    del g
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def value_and_grads(f, q, k, v, g, do):
    o, vjp = jax.vjp(f, q, k, v, g)
    return (o, *vjp(do.astype(o.dtype)))


def rel(x, y):
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    return float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y))


def check(hq, hkv, packed, t=2048):
    """pallas vs xla: index agreement, then output and gradients on the xla indices' inputs."""
    q, k, v, g, do = problem(t, hq, hkv, seed=1)
    cuts = jnp.asarray([t * 11 // 32 + 5, t * 21 // 32 - 3])  # off the l' grid
    seg = jnp.sum(jnp.arange(t)[:, None] >= cuts, axis=1)[None] if packed else None
    aux = jax.jit(lambda impl, *x: ops.nsa_attention(*x, CFG, segment_ids=seg, implementation=impl,
                                                     return_aux=True)[1], static_argnums=0)
    got, want = aux("pallas", q, k, v, g), aux("xla", q, k, v, g)
    same = float(jnp.mean(jnp.all(got["indices"] == want["indices"], axis=-1)))
    lse_err = rel(jnp.where(jnp.isfinite(want["lse_cmp"]), got["lse_cmp"], 0),
                  jnp.where(jnp.isfinite(want["lse_cmp"]), want["lse_cmp"], 0))
    run = jax.jit(lambda impl, *x: value_and_grads(nsa(impl, seg), *x), static_argnums=0)
    errs = [rel(a, b) for a, b in zip(run("pallas", q, k, v, g, do), run("xla", q, k, v, g, do))]
    ok = same >= 0.99 and lse_err < 1e-2 and all(e < 3e-2 for e in errs)
    print(f"check Hq={hq} Hkv={hkv} packed={packed} T={t}: selections identical in {same:.4f} of "
          f"rows; rel L2 lse {lse_err:.1e}, out/dq/dk/dv/dgates "
          f"{' '.join(f'{e:.1e}' for e in errs)} {'ok' if ok else 'FAIL'}", flush=True)
    return ok


def peak_gib(compiled):
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return total / 2**30


def cudnn_window(q, k, v, g):
    del g
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn",
                                        local_window_size=(CFG.window - 1, 0))


def peer_times(folder, seqs):
    """{(T, name): ms} from MDY's flash_nsa through peer_mdy_nsa.py in a subprocess (names:
    mdy_nsa_fwd, mdy_nsa_fwd_bwd, sdpa_fwd, sdpa_fwd_bwd); {} with a message if it fails."""
    folder = pathlib.Path(folder)
    script = next((p for p in (folder / "peer_mdy_nsa.py",
                               pathlib.Path(__file__).parents[2] / "shared/bench/peer_mdy_nsa.py")
                   if p.exists()), None)
    if script is None:
        print(f"peer: no peer_mdy_nsa.py in {folder} or ../shared/bench", flush=True)
        return {}
    env = {**os.environ, "PYTHONPATH": f"{folder}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run([sys.executable, str(script), *map(str, seqs)], env=env,
                         capture_output=True, text=True)
    times = {}
    for line in run.stdout.splitlines():
        print(f"peer: {line}", flush=True)
        hit = re.match(r"T=(\d+) (\w+) ([\d.]+) ms", line)
        if hit:
            times[(int(hit[1]), hit[2])] = float(hit[3])
    if run.returncode:
        print(f"peer: exit {run.returncode}: {run.stderr[-600:]}", flush=True)
    return times


def time_case(f, t, hq, hkv):
    """(fwd ms, fwd+bwd ms, fwd+bwd peak GiB) of f(q, k, v, gates)."""
    q, k, v, g, do = problem(t, hq, hkv)
    fwd = jax.jit(f).lower(q, k, v, g).compile()
    both = jax.jit(functools.partial(value_and_grads, f)).lower(q, k, v, g, do).compile()
    return (device_ms(fwd, q, k, v, g), device_ms(both, q, k, v, g, do), peak_gib(both))


def four_documents(t):
    """[1, T] segment ids of four documents with boundaries off every tile grid."""
    cuts = jnp.asarray([t // 4 + 7, t // 2 - 5, 3 * t // 4 + 3])
    return jnp.sum(jnp.arange(t)[:, None] >= cuts, axis=1)[None].astype(jnp.int32)


def branches(t, hq, hkv):
    """Forward time (ms) of each pallas-path piece at one shape; a piece that fails to compile or
    run is reported with its error instead."""
    q, k, v, _, _ = problem(t, hq, hkv)
    k_cmp, v_cmp = (ops.compress(x, CFG) for x in (k, v))
    scale = q.shape[-1] ** -0.5
    cmp = jax.jit(lambda *x: ops.compressed_attention(*x, CFG, implementation="pallas"))
    lse = ops.compressed_attention(q, k_cmp, v_cmp, CFG, implementation="xla")[1]
    select = jax.jit(lambda *x: selection.select(*x, CFG, scale=scale, implementation="pallas"))
    idx = jax.jit(lambda *x: selection.select(*x, CFG, scale=scale, implementation="xla"))(
        q, k_cmp, lse)
    compress = jax.jit(lambda x: ops.compress(x, CFG, implementation="pallas"))
    parts = {
        "compress (per tensor)": (compress, (k,)),
        "compressed": (cmp, (q, k_cmp, v_cmp)),
        "select (score+top-n)": (select, (q, k_cmp, lse)),
        "selected": (jax.jit(lambda *x: ops.selected_attention(*x, CFG, implementation="pallas")),
                     (q, k, v, idx)),
        "window (unpacked: cuDNN)": (
            jax.jit(lambda *x: ops.window_attention(*x, CFG, implementation="pallas")),
            (q, k, v)),
        "window (packed, 4 documents)": (
            jax.jit(lambda *x: ops.window_attention(*x[:3], CFG, segment_ids=x[3],
                                                    implementation="pallas")),
            (q, k, v, four_documents(t))),
    }
    out = []
    for name, (f, args) in parts.items():
        try:
            out.append(f"{name} {device_ms(f, *args):.2f}")
        except Exception as err:  # report and go on: the other pieces still get timed
            out.append(f"{name} FAILED {type(err).__name__}: {str(err)[:300]}")
    print(f"forward by piece, Hq={hq} Hkv={hkv} T={t} (ms): "
          + "; ".join(out), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 65536, 32768, 16384])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--budget", type=float, default=1e9, help="seconds for the sweep")
    parser.add_argument("--peer", default=None, help="folder with MDY's flash_nsa (see above)")
    args = parser.parse_args()
    begin = time.time()
    peer = peer_times(args.peer, args.seq) if args.peer else {}
    if jax.default_backend() != "gpu":
        sys.exit("bench_nsa.py needs a GPU")
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, backend "
          f"{ops.backend()}", flush=True)
    branches(8192, *SHAPES["paper"])
    if not all([check(64, 4, False), check(32, 8, True)]):
        sys.exit("pallas path disagrees with xla: no timings taken")
    skipped = []
    print("\n| shape | T | NSA fwd (ms) | cuDNN fwd (ms) | speed-up | NSA fwd+bwd (ms) | cuDNN "
          "fwd+bwd (ms) | speed-up | NSA peak (GiB) | cuDNN peak (GiB) | MDY fwd + cuDNN window "
          "(ms) | speed-up | MDY fwd+bwd + window (ms) | speed-up |\n" + "|---" * 14 + "|")
    for name in args.shapes:
        hq, hkv = SHAPES[name]
        for t in args.seq:
            if time.time() - begin > args.budget:
                skipped.append((name, t))
                continue
            n_fwd, n_both, n_mem = time_case(nsa("pallas"), t, hq, hkv)
            c_fwd, c_both, c_mem = time_case(cudnn, t, hq, hkv)
            peer_cells = "| - | - | - | - |"
            if name == "paper" and (t, "mdy_nsa_fwd") in peer:
                w_fwd, w_both, _ = time_case(cudnn_window, t, hq, hkv)
                m_fwd = peer[(t, "mdy_nsa_fwd")] + w_fwd
                m_both = peer.get((t, "mdy_nsa_fwd_bwd"), float("nan")) + w_both
                peer_cells = (f"| {m_fwd:.2f} | {c_fwd / m_fwd:.2f}x | {m_both:.2f} | "
                              f"{c_both / m_both:.2f}x |")
            print(f"| {name} (Hq={hq}, Hkv={hkv}) | {t} | {n_fwd:.2f} | {c_fwd:.2f} | "
                  f"{c_fwd / n_fwd:.2f}x | {n_both:.2f} | {c_both:.2f} | {c_both / n_both:.2f}x | "
                  f"{n_mem:.2f} | {c_mem:.2f} {peer_cells}", flush=True)
    if skipped:
        print(f"skipped (time budget): {skipped}")
    if time.time() - begin <= args.budget:
        branches(max(args.seq), *SHAPES["paper"])
    print(f"elapsed {time.time() - begin:.0f} s")


if __name__ == "__main__":
    main()
