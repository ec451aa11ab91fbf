"""The cost of the MoE formulations the graphs can use, on one MoE layer of a preset (default: real-size GLM-4.5V).

    python -m glmtrt.export.moe_cost [--preset glm-4.5v] [--tokens 1,256,2048] [--formulations dense,grouped,gathered]
                                     [--threads 2] [--repeats 3] [--budget 120] [--work DIR] [--json PATH]

One MoE layer of the preset (router, routed experts, shared expert; seeded random weights, fp32) is exported once per
formulation of ``glmtrt.export.graphs`` ("dense": the reference's every-expert MoE; "grouped": each expert on the
tokens that chose it; "gathered": each (token, slot) pair's expert weight slices gathered), by the exporter the
engines use (``export_graph``: dynamo, opset 20, optimized, checked), as ``hidden_states`` (1, tokens, H) ->
``mlp_out``, and run in ONNX Runtime on the CPU with ``--threads`` intra-op threads over seeded random hidden states
of each token count. Printed per formulation and token count: the median wall seconds and CPU seconds (all threads
of the process: the cost on a shared machine, where wall time also counts the wait for a core) over ``--repeats``
runs after a warm-up (fewer once ``--budget`` seconds are spent; at least one), the resident-set high-water mark of
the runs (ONNX Runtime memory-maps the weights: the pages they touch count), and the largest difference from the
reference MoE in PyTorch on the first 16 tokens. ONNX Runtime's CPU arena is off (exact-size allocations).

A run whose working set cannot fit is not attempted and says why: "gathered" copies T * k weight slices (at
GLM-4.5V's size 69 MB each in fp32: 138 GiB at 256 tokens), and "dense" holds (T, E, H) intermediates (4.3 GB at
2048 tokens), so above ``--dense-chunk`` tokens dense runs in chunks of that many tokens (exact, since the tokens of
an MoE layer do not interact, and its best case: smaller intermediates only help it); the report says so.
The ONNX files (8.9 GB per formulation at GLM-4.5V's size) go to ``--work`` (kept and reused by a later run with the
same preset and seed) or to a temporary folder that is removed. Each formulation is measured in its own process
(ONNX Runtime memory-maps the weights; the exporting process's PyTorch copy of them would count in its memory).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from glmtrt.runtime.errors import GlmTrtError

FORMULATIONS = ("dense", "grouped", "gathered")
DEFAULT_PRESET = "glm-4.5v"
CHECK_TOKENS = 16  # tokens of each input compared with the reference (which runs every expert on them)
_GATHER_LIMIT = 8 << 30  # bytes of gathered weight slices (T * k * one expert) above which "gathered" is not run


def random_moe(preset: str, seed: int = 0):
    """One MoE layer of ``preset`` (the reference :class:`~glmtrt.reference.decoder.MoE`) with seeded random weights
    drawn as ``reference.weights.init_random_weights`` draws them. Returns (moe, text config)."""
    import torch

    from glmtrt.reference.config import preset as preset_config
    from glmtrt.reference.decoder import MoE

    text = preset_config(preset).text
    if text.moe is None:
        raise GlmTrtError(f"preset {preset!r} has no MoE layers; use glm-4.5v or tiny-glm-4.5v")
    moe = MoE(text)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in moe.state_dict().items():
            scale = 0.1 if name.endswith("e_score_correction_bias") else 0.02
            tensor.normal_(0.0, scale, generator=gen)
    return moe.eval(), text


def layer_graph(moe, text, formulation: str, seed: int = 0):
    """The GraphDef of one MoE layer run by ``formulation``: ``hidden_states`` float32 (1, tokens, H) -> ``mlp_out``
    float32 (1, tokens, H). Shares ``moe``'s parameters."""
    import torch
    from torch import nn

    from .graphs import MOE_EXPERTS, GraphDef, SparseMoE

    if formulation == "dense":
        mlp = moe
    elif formulation in MOE_EXPERTS:
        mlp = SparseMoE(moe, MOE_EXPERTS[formulation](moe.experts))
    else:
        raise GlmTrtError(f"unknown MoE formulation {formulation!r}; choose from {', '.join(FORMULATIONS)}")

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = mlp

        def forward(self, hidden_states):
            return self.mlp(hidden_states)

    h = text.hidden_size
    example = torch.randn(1, 7, h, generator=torch.Generator().manual_seed(seed + 1))
    return GraphDef(name=f"moe_{formulation}", module=Layer().eval(), input_names=["hidden_states"],
                    input_shapes=[[1, "tokens", h]], input_dtypes=["float32"], output_names=["mlp_out"],
                    output_shapes=[[1, "tokens", h]], output_dtypes=["float32"], example_args=(example,),
                    dynamic_shapes=({1: torch.export.Dim("tokens", min=1)},))


def export_layer(moe, text, formulation: str, folder: Path, seed: int = 0, reuse: bool = False) -> Path:
    """Export one MoE layer to ``folder/moe_<formulation>.onnx`` (skipped when ``reuse`` and the file is there)."""
    from .folder import _quiet_exporter_logs
    from .onnx import export_graph

    graph = layer_graph(moe, text, formulation, seed)
    path = Path(folder) / graph.file
    if not (reuse and path.is_file()):
        path.parent.mkdir(parents=True, exist_ok=True)
        with _quiet_exporter_logs():
            export_graph(graph, path.parent)
    return path


def inputs(text, tokens: int, seed: int = 0) -> np.ndarray:
    """The measured input of ``tokens`` tokens: float32 (1, tokens, H), standard normal."""
    return np.random.default_rng(seed + tokens).standard_normal((1, tokens, text.hidden_size)).astype(np.float32)


def reference_outputs(moe, text, tokens: list[int], seed: int = 0) -> dict[int, np.ndarray]:
    """The reference MoE on the first ``CHECK_TOKENS`` tokens of each input: {tokens: (1, min(tokens, 16), H)}."""
    import torch

    with torch.no_grad():
        return {n: moe(torch.from_numpy(inputs(text, n, seed)[:, :CHECK_TOKENS])).numpy() for n in tokens}


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Exact-size allocations: the arena would round the dense formulation's 5.9 GB Einsum buffer (a transposed copy
    # of the stacked expert weights, per call) up to its next extension, and the peak would measure the arena.
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def skip_reason(formulation: str, tokens: int, text) -> str | None:
    """Why a run is not attempted (its working set), or None."""
    m = text.moe
    if formulation == "gathered":
        need = tokens * m.experts_per_token * 3 * m.moe_intermediate_size * text.hidden_size * 4
        if need > _GATHER_LIMIT:
            return f"not run: gathers {tokens} x {m.experts_per_token} expert weight slices = {need / 2**30:.0f} GiB"
    return None


def measure(path: Path, formulation: str, text, wants: dict[int, np.ndarray], threads: int = 2, repeats: int = 3,
            budget: float = 120.0, dense_chunk: int = 256, seed: int = 0, log=print) -> list[dict]:
    """Run the exported layer at each token count of ``wants`` (reference outputs from :func:`reference_outputs`).
    Returns one record per token count: formulation, tokens, seconds / cpu_seconds (medians), times, peak_rss_gib,
    max_abs_vs_reference, chunk (or skipped: the reason)."""
    from .bench import PeakMemory

    session = _session(path, threads)
    memory = PeakMemory()
    records = []
    for n, want in wants.items():
        record = {"formulation": formulation, "tokens": n}
        reason = skip_reason(formulation, n, text)
        if reason:
            record["skipped"] = reason
            records.append(record)
            log(f"  {formulation:9s} {n:5d} tokens  {reason}")
            continue
        x = inputs(text, n, seed)
        chunk = dense_chunk if formulation == "dense" and n > dense_chunk else n

        def run(upto: int = n) -> np.ndarray:
            return np.concatenate([session.run(None, {"hidden_states": x[:, i:i + chunk]})[0]
                                   for i in range(0, upto, chunk)], axis=1)

        run(chunk)  # warm-up: one call of the measured shape
        memory.reset()
        times, cpu, out = [], [], None
        start = time.perf_counter()
        while len(times) < repeats and (not times or time.perf_counter() - start < budget):
            t, c = time.perf_counter(), time.process_time()
            out = run()
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        peak = memory.peak_gib()
        record.update(seconds=statistics.median(times), cpu_seconds=statistics.median(cpu), times=times,
                      peak_rss_gib=peak, max_abs_vs_reference=float(np.abs(out[:, :want.shape[1]] - want).max()),
                      chunk=chunk if chunk != n else None)
        records.append(record)
        note = f"  (in chunks of {chunk} tokens)" if chunk != n else ""
        log(f"  {formulation:9s} {n:5d} tokens  {_seconds(record['seconds']):>9s} wall  "
            f"{_seconds(record['cpu_seconds']):>9s} CPU  ({len(times)} runs)  peak RSS {peak:5.1f} GiB  "
            f"max abs vs reference {record['max_abs_vs_reference']:.1e}{note}")
    del session
    gc.collect()
    return records


def _seconds(s: float) -> str:
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.1f} ms"


def format_table(records: list[dict], tokens: list[int]) -> str:
    """A markdown table: one row per formulation, one column per token count (median wall seconds / median CPU
    seconds of the process, peak RSS)."""
    by = {(r["formulation"], r["tokens"]): r for r in records}
    formulations = list(dict.fromkeys(r["formulation"] for r in records))
    lines = ["| formulation | " + " | ".join(f"{n} tokens" for n in tokens) + " |",
             "|---|" + "---|" * len(tokens)]
    for f in formulations:
        cells = []
        for n in tokens:
            r = by.get((f, n))
            if r is None:
                cells.append("")
            elif "skipped" in r:
                cells.append(r["skipped"].replace("not run: ", "not run (") + ")")
            else:
                chunk = f", {-(-n // r['chunk'])} chunks of {r['chunk']}" if r.get("chunk") else ""
                cells.append(f"{_seconds(r['seconds'])} / {_seconds(r['cpu_seconds'])} CPU "
                             f"({r['peak_rss_gib']:.1f} GiB{chunk})")
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glmtrt.export.moe_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--tokens", default="1,256,2048", help="comma-separated token counts")
    parser.add_argument("--formulations", default=",".join(FORMULATIONS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=120.0,
                        help="seconds after which no further repeat starts (at least one run)")
    parser.add_argument("--dense-chunk", type=int, default=256,
                        help="dense runs longer inputs in chunks of this many tokens (its intermediates are (T, E, H))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="folder for the ONNX files (kept, and reused by a later run); default: a "
                        "temporary folder, removed")
    parser.add_argument("--json", help="write the records to this JSON file")
    parser.add_argument("--measure-only", help=argparse.SUPPRESS)  # internal: the child process of one formulation
    args = parser.parse_args(argv)
    try:
        tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    except ValueError:
        raise GlmTrtError(f"--tokens takes comma-separated integers, got {args.tokens!r}") from None
    formulations = [f.strip() for f in args.formulations.split(",") if f.strip()]
    bad = [f for f in formulations if f not in FORMULATIONS]
    if bad or not tokens or min(tokens) < 1 or args.repeats < 1 or args.threads < 1 or args.dense_chunk < 1:
        raise GlmTrtError(f"bad options: formulations {formulations} (choose from {', '.join(FORMULATIONS)}), tokens "
                          f"{tokens}, repeats {args.repeats}, threads {args.threads}, dense chunk {args.dense_chunk}")
    import onnxruntime as ort

    if args.measure_only:  # the child: one formulation's exported file and the reference outputs from the parent
        from glmtrt.reference.config import preset as preset_config

        work = Path(args.work)
        saved = np.load(work / "reference_outputs.npz")
        wants = {n: saved[str(n)] for n in tokens}
        records = measure(work / f"moe_{args.measure_only}.onnx", args.measure_only, preset_config(args.preset).text,
                          wants, args.threads, args.repeats, args.budget, args.dense_chunk, args.seed)
        Path(args.json).write_text(json.dumps(records))
        return 0

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="glmtrt-moe-cost-"))
    print(f"MoE layer of {args.preset}, ONNX Runtime {ort.__version__} CPU, {args.threads} threads, "
          f"median of up to {args.repeats} runs")
    records = []
    try:
        t = time.perf_counter()
        moe, text = random_moe(args.preset, args.seed)
        wants = reference_outputs(moe, text, tokens, args.seed)
        m = text.moe
        print(f"weights and reference outputs in {time.perf_counter() - t:.0f} s (H {text.hidden_size}, "
              f"E {m.num_experts}, k {m.experts_per_token}, I {m.moe_intermediate_size})")
        paths = {}
        for f in formulations:
            t = time.perf_counter()
            paths[f] = export_layer(moe, text, f, work, args.seed, reuse=bool(args.work))
            print(f"{f}: exported in {time.perf_counter() - t:.0f} s")
        del moe
        gc.collect()
        np.savez(work / "reference_outputs.npz", **{str(n): w for n, w in wants.items()})
        for f in formulations:
            out = work / f"records_{f}.json"
            child = [sys.executable, "-m", "glmtrt.export.moe_cost", "--measure-only", f, "--work", str(work),
                     "--json", str(out), "--preset", args.preset, "--tokens", args.tokens, "--threads",
                     str(args.threads), "--repeats", str(args.repeats), "--budget", str(args.budget),
                     "--dense-chunk", str(args.dense_chunk), "--seed", str(args.seed)]
            proc = subprocess.run(child, capture_output=True, text=True)
            print(proc.stdout, end="", flush=True)
            if proc.returncode:
                print(f"  {f}: the measurement failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
                records += [{"formulation": f, "tokens": n, "skipped": "failed: " + (proc.stderr.strip().splitlines()
                                                                                      or ["?"])[-1]} for n in tokens]
                continue
            records += json.loads(out.read_text())
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(format_table(records, tokens))
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "threads": args.threads, "repeats": args.repeats,
                                               "onnxruntime": ort.__version__, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    import sys

    try:
        sys.exit(main())
    except GlmTrtError as e:
        print(f"moe_cost: error: {e}", file=sys.stderr)
        sys.exit(2)
