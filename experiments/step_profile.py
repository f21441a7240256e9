"""Where one training step's device time goes: a jax.profiler trace of a few already-compiled
steps of the trainer's own train step, its kernels summed by category.

    profile = profile_train_step(config, steps=3, trace_dir=...)   # {category: ms per step, ...}

Each kernel event of the trace (perfetto JSON) carries the HLO instruction it runs (`hlo_op`).
The compiled module's text gives that instruction's metadata: op_name and the Python
file:function it came from (a fusion: those of every op it fuses). The first CATEGORIES rule
whose words occur in the kernel name, the HLO op or that metadata names the category; the rest is
"other" (embedding, norms, loss, ...). A backward kernel keeps its forward's source, so each
category is forward + backward. On a GPU the kernels are the device streams' events; on a CPU (tests, --smoke)
the thunks the CPU client runs, leaves only (a while loop's thunk holds its body's).
"""
from __future__ import annotations

import gzip
import json
import pathlib
import re
import tempfile
import time

import jax

# (category, words): first match wins, so the specific names come before the ones they contain
# ("selected_attention" before "select", "compressed_attention" before "compress").
CATEGORIES = (
    ("optimizer", ("optax", "nnx/training/optimizer")),
    ("window branch", ("window_attention",)),
    ("selected branch", ("selected_attention", "nsa_selected")),
    ("compressed branch", ("compressed_attention", "nsa_compressed")),
    # the Mosaic range kernel serves both branches; its frames may not say which
    ("compressed or window branch", ("range_attention",)),
    ("selection/scoring", ("ops/selection.py", "selection_rule", "block_scores", "select_blocks",
                           "nsa_select")),  # not bare "select": XLA's select op names fusions
    ("compressor", ("compress",)),
    ("full attention", ("dense_attention", "dot_product_attention")),
    # the xla branches' query chunks, the dense oracle ("reference", tiny.py's implementation)
    ("attention, branch unknown", ("chunking.py", "ops/reference.py")),
    ("MLP/matmuls", ("layers/mlp.py", "nn/linear.py", "gemm", "cublas", "nvjet", "xmma",
                     "cutlass")),  # the projections' and MLP's dense layers
    ("attention gates/combine", ("nsa_attention.py",)),
)
OTHER = "other"
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{([^}]*)\}")
COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")


def categorize(text: str) -> str:
    """The category of a kernel described by `text` (kernel name, op_name, source chain)."""
    lowered = text.lower()
    for category, words in CATEGORIES:
        if any(word in lowered for word in words):
            return category
    return OTHER


def _table(hlo_text: str, title: str) -> dict[int, str]:
    """A `title` section of an HLO module's text: {id: rest of the line}."""
    rows, inside = {}, False
    for line in hlo_text.splitlines():
        if line == title:
            inside = True
        elif inside and not line.strip():
            break
        elif inside:
            key, _, rest = line.partition(" ")
            rows[int(key)] = rest
    return rows


def instruction_sources(hlo_text: str) -> dict[str, str]:
    """Compiled HLO module text -> {instruction name: the op_name and "file:function" of its
    metadata, and of every instruction of the computation it calls (a fusion's body)}. XLA keeps
    the innermost Python frame of each op (often a flax or jnp helper that names no layer), so a
    fusion is named by all that it fuses."""
    field = lambda text, key: int(re.search(key + r"=(\d+)", text)[1])
    files = {k: v.strip('"') for k, v in _table(hlo_text, "FileNames").items()}
    functions = {k: v.strip('"') for k, v in _table(hlo_text, "FunctionNames").items()}
    where = {k: f"{files.get(field(v, 'file_name_id'), '?')}:"
                f"{functions.get(field(v, 'function_name_id'), '?')}"
             for k, v in _table(hlo_text, "FileLocations").items()}
    frames = {k: where.get(field(v, "file_location_id"), "?")
              for k, v in _table(hlo_text, "StackFrames").items()}
    own, calls, bodies, computation = {}, {}, {}, None
    for line in hlo_text.splitlines():
        header = COMPUTATION.match(line)
        if header:
            computation = header[1]
            continue
        match = INSTRUCTION.match(line)
        if not match:
            continue
        frame = re.search(r"stack_frame_id=(\d+)", match[2])
        own[match[1]] = match[2] + " " + (frames.get(int(frame[1]), "") if frame else "")
        bodies.setdefault(computation, []).append(own[match[1]])
        called = re.search(r"calls=%?([\w.\-]+)", line)
        if called:
            calls[match[1]] = called[1]
    return {name: " ".join([text, *bodies.get(calls.get(name), [])]) for name, text in own.items()}


def kernel_events(trace: dict, module: str) -> list[dict]:
    """The X events of HLO module `module` (or a name starting with it) that ran on a device:
    those of the GPU processes (their stream threads when named so, not the derived "XLA Ops"
    lines) when the trace has a GPU, else the CPU thunks; leaves only (nothing counted twice)."""
    events = trace["traceEvents"]
    names = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name")}
    ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})
           and str(e["args"].get("hlo_module", "")).startswith(module)]
    gpu = [e for e in ops if names.get((e["pid"], None), "").startswith("/device:GPU")]
    streams = [e for e in gpu if "stream" in names.get((e["pid"], e.get("tid")), "").lower()]
    return _leaves(streams or gpu or ops)


def _leaves(events: list[dict]) -> list[dict]:
    by_thread = {}
    for e in events:
        by_thread.setdefault((e["pid"], e.get("tid")), []).append(e)
    leaves = []
    for thread in by_thread.values():
        thread.sort(key=lambda e: (e["ts"], -e["dur"]))
        leaves += [e for e, after in zip(thread, thread[1:] + [None])
                   if after is None or after["ts"] >= e["ts"] + e["dur"]]
    return leaves


def read_perfetto(trace_dir: pathlib.Path) -> dict:
    """The newest perfetto_trace.json.gz jax.profiler wrote under `trace_dir`."""
    found = sorted(pathlib.Path(trace_dir).rglob("perfetto_trace.json.gz"),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(found[-1], "rt") as f:
        return json.load(f)


def summarize(trace: dict, hlo_text: str, steps: int) -> dict:
    """-> {"ms_per_step": {category: device ms per step}, "kernel_ms_per_step": their sum,
    "kernels": number of kernel events, "top": the 15 costliest (category, kernel, hlo_op, ms per
    step)}, of the kernels of the module `hlo_text` (its compiled text) over `steps` traced steps.
    Raises ValueError if the trace holds no kernel of that module."""
    module = re.match(r"HloModule ([\w.\-]+)", hlo_text)[1]
    sources = instruction_sources(hlo_text)
    events = kernel_events(trace, module)
    if not events:
        raise ValueError(f"the trace holds no kernel event of HLO module {module!r}")
    per_category, per_kernel = {name: 0.0 for name, _ in CATEGORIES + ((OTHER, ()),)}, {}
    for e in events:
        op = e["args"]["hlo_op"]
        category = categorize(f"{e['name']} {op} {sources.get(op, '')}")
        ms = e["dur"] / 1e3 / steps  # trace durations are microseconds
        per_category[category] += ms
        key = (category, e["name"], op)
        per_kernel[key] = per_kernel.get(key, 0.0) + ms
    top = sorted(per_kernel.items(), key=lambda item: -item[1])[:15]
    return {"ms_per_step": per_category, "kernel_ms_per_step": sum(per_category.values()),
            "kernels": len(events), "top": [[*key, ms] for key, ms in top]}


def profile_train_step(config, steps: int = 3, trace_dir: pathlib.Path | None = None) -> dict:
    """Builds the trainer for `config` (a ConfigDict, as nsa_jax.train.train takes it) in a
    scratch workdir, compiles and runs its train step twice, traces `steps` more -> summarize()'s
    dict plus "wall_ms_per_step" (host clock over the traced steps) and "trace_dir"."""
    from nsa_jax.data import make_train_batch
    from nsa_jax.train import resolve
    from nsa_jax.train.loop import Trainer

    run = resolve(config)
    trace_dir = pathlib.Path(trace_dir or tempfile.mkdtemp(prefix="step_profile_"))
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(run, pathlib.Path(workdir))
        batches = [trainer._global(make_train_batch(run.data, run.train.seed, step,
                                                    rows=trainer.rows)) for step in range(2)]
        with jax.set_mesh(trainer.mesh):
            # called directly, the compiled step is the one executable whose text names the ops
            compiled = trainer.train_step.lower(trainer.model_state, trainer.opt_state,
                                                batches[0]).compile()
            state = (trainer.model_state, trainer.opt_state)
            for step in range(2 + steps):
                if step == 2:
                    jax.block_until_ready(state)
                    jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=True)
                    started = time.perf_counter()
                *state, metrics = compiled(*state, batches[step % 2])
            jax.block_until_ready((state, metrics))
            wall_ms = (time.perf_counter() - started) * 1e3 / steps
            jax.profiler.stop_trace()
        trainer.checkpointer.close()
    summary = summarize(read_perfetto(trace_dir), compiled.as_text(), steps)
    return {**summary, "wall_ms_per_step": wall_ms, "trace_dir": str(trace_dir)}


def profile_table(profile: dict) -> str:
    """Markdown: device ms per step and share of the kernel time, by category."""
    total = profile["kernel_ms_per_step"]
    lines = ["| category | ms per step | share |", "|---|---|---|"]
    for category, ms in sorted(profile["ms_per_step"].items(), key=lambda item: -item[1]):
        lines.append(f"| {category} | {ms:.2f} | {ms / total:.1%} |")
    lines.append(f"| all kernels | {total:.2f} | 100% |")
    lines.append(f"| (host wall clock per step) | {profile['wall_ms_per_step']:.2f} | |")
    return "\n".join(lines)
