"""``glmtrt parity``: walk the same road through the reference and through an engines folder, stage by stage.

For each case (an image set and a prompt): each vision call's embeddings, the prefill logits and KV cache,
teacher-forced decode steps (both roads fed the reference's greedy tokens: top-1 agreement and logit error),
and free-running greedy generation (the runtime's tokens against the reference's). Prints a table and
writes it as JSON. Needs torch (the reference); the runtime side is the torch-free Pipeline.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from glmtrt.runtime.errors import GlmTrtError

# Bounds a plan must meet to pass, per precision (fp32: the graphs are the reference's own computation).
BOUNDS = {"fp32": {"max_abs": 1e-4, "top1": 1.0, "greedy_identical": True}}


@dataclass
class ParityCase:
    name: str
    prompt: str
    images: list[Any] = field(default_factory=list)


@dataclass
class CaseReport:
    name: str
    prompt_tokens: int
    vision_max_abs: float | None
    vision_cosine: float | None
    prefill_logits_max_abs: float
    prefill_logits_cosine: float
    prefill_cache_max_abs: float
    teacher_forced_steps: int
    teacher_forced_top1: float
    teacher_forced_max_logit_error: float
    greedy_tokens: int
    greedy_match_prefix: int
    greedy_identical: bool


def builtin_cases() -> list[ParityCase]:
    """The bundled sample image (a text line), two synthetic images of other aspect ratios, and text only."""
    from PIL import Image

    from glmtrt.runtime.cli import sample_image_path

    rng = np.random.default_rng(0)
    tall = Image.fromarray(rng.integers(0, 256, (150, 70, 3), dtype=np.uint8))
    wide = Image.fromarray(np.tile(np.linspace(0, 255, 200, dtype=np.uint8)[None, :, None], (60, 1, 3)))
    return [
        ParityCase("sample image", "Text Recognition:", [sample_image_path()]),
        ParityCase("two images", "Compare the two images.", [tall, wide]),
        ParityCase("text only", "Write one sentence about the sea."),
    ]


def _stats(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    a, b = np.asarray(ours, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(np.abs(a - b).max(initial=0.0)), float(a @ b / denom) if denom else 1.0


def _case_report(pipe, model, case: ParityCase, steps: int) -> CaseReport:
    import torch

    from glmtrt.reference.generate import PromptBatch, greedy_generate, host_plan, prepare_prefill

    vision_inputs = pipe.preprocess(case.images)
    ids = pipe.prompt_ids(case.prompt, case.images, vision_inputs=vision_inputs)
    batch = PromptBatch(input_ids=np.array([ids]),
                        pixel_values=None if vision_inputs is None else vision_inputs.pixel_values,
                        image_grid_thw=None if vision_inputs is None else vision_inputs.grid_thw)
    backend = pipe.backend
    vision_names = pipe.manifest.graphs["vision"].input_names()

    # Vision: each call through the graph and through the reference tower, on the same host tables.
    plan = host_plan(model, batch)
    errors, cosines = [], []
    for call in plan.vision_calls:
        inputs = plan.vision_inputs(call)
        graph_out = next(iter(backend.run("vision", {k: inputs[k] for k in vision_names}).values()))
        ref_inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}
        ref_out = model.vision(ref_inputs.pop("pixel_values"), **ref_inputs).float().numpy()
        err, cos = _stats(graph_out, ref_out)
        errors.append(err)
        cosines.append(cos)

    # Prefill: the graph fed the reference's merged embeddings.
    embeds, positions, decode_positions = prepare_prefill(model, batch)
    mask = np.ones_like(batch.input_ids)
    feed = {"inputs_embeds": embeds.float().numpy(), "position_ids": positions, "attention_mask": mask}
    graph_prefill = backend.run("prefill", feed)
    with torch.no_grad():
        ref_logits, ref_keys, ref_values = model.prefill(embeds, torch.from_numpy(positions), torch.from_numpy(mask))
    logit_err, logit_cos = _stats(graph_prefill["logits"], ref_logits.float().numpy())
    ref_cache = {f"present.{i}.{kind}": t.float().numpy() for kind, ts in (("key", ref_keys), ("value", ref_values))
                 for i, t in enumerate(ts)}
    cache_err = max(_stats(graph_prefill[name], ref)[0] for name, ref in ref_cache.items())

    # Teacher-forced decode: both roads fed the reference's greedy tokens, each keeping its own cache.
    reference_tokens = greedy_generate(model, batch, steps + 1)[0]
    graph_cache = {k.replace("present.", "past_key_values.", 1): v for k, v in graph_prefill.items() if k != "logits"}
    agree, worst = 0, 0.0
    step_mask = mask
    for step in range(steps):
        token = reference_tokens[step:step + 1][None]
        step_mask = np.concatenate([step_mask, np.ones((1, 1), np.int64)], axis=1)
        step_positions = decode_positions(step)
        step_embeds = model.embed(torch.from_numpy(token))
        out = backend.run("decode", {"inputs_embeds": step_embeds.float().numpy(), "position_ids": step_positions,
                                     "attention_mask": step_mask, **graph_cache})
        graph_cache = {k.replace("present.", "past_key_values.", 1): v for k, v in out.items() if k != "logits"}
        with torch.no_grad():
            ref_logits, ref_keys, ref_values = model.decode_step(step_embeds, torch.from_numpy(step_positions),
                                                                 torch.from_numpy(step_mask), ref_keys, ref_values)
        ref_np = ref_logits.float().numpy()
        agree += int(out["logits"].argmax(-1)[0] == ref_np.argmax(-1)[0])
        worst = max(worst, _stats(out["logits"], ref_np)[0])

    # Free-running greedy: the torch-free runtime against the reference.
    result = pipe.generate_ids(np.array(ids), batch.pixel_values, batch.image_grid_thw, max_new_tokens=steps,
                               eos_token_ids=(), temperature=0.0, repetition_penalty=1.0)
    ours, ref = np.array(result.token_ids), reference_tokens[:steps]
    prefix = int(np.argmin(ours == ref)) if not (ours == ref).all() else len(ref)
    return CaseReport(
        name=case.name, prompt_tokens=len(ids),
        vision_max_abs=max(errors) if errors else None, vision_cosine=min(cosines) if cosines else None,
        prefill_logits_max_abs=logit_err, prefill_logits_cosine=logit_cos, prefill_cache_max_abs=cache_err,
        teacher_forced_steps=steps, teacher_forced_top1=agree / steps if steps else 1.0,
        teacher_forced_max_logit_error=worst, greedy_tokens=steps, greedy_match_prefix=prefix,
        greedy_identical=prefix == steps,
    )


def run_parity(engines: str | Path, model: str | Path | None = None, cases: list[ParityCase] | None = None,
               steps: int = 32, provider: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """Compare an engines folder with the reference on ``cases`` (default: :func:`builtin_cases`).

    model: the checkpoint folder or preset the folder was exported from (default: the manifest's record).
    Returns a JSON-ready report: per-case figures, the bounds for the folder's precision, and ``passed``.
    """
    from glmtrt.reference import load_reference
    from glmtrt.runtime.pipeline import Pipeline

    if steps < 1:
        raise GlmTrtError(f"--steps must be at least 1, got {steps}")
    pipe = Pipeline.from_engines(engines, provider=provider, threads=threads)
    source = model if model is not None else pipe.manifest.extra.get("source")
    if source is None:
        raise GlmTrtError(f"{str(engines)!r} does not record what it was exported from; pass --model")
    reference = load_reference(source)
    if json.loads(json.dumps(reference.config.to_dict())) != pipe.manifest.config:
        raise GlmTrtError(f"the model {str(source)!r} has another config than {str(engines)!r}; pass the model it was "
                          "exported from with --model")
    reports = [_case_report(pipe, reference, case, steps) for case in (cases or builtin_cases())]
    precision = pipe.manifest.precision
    bounds = BOUNDS.get(precision, BOUNDS["fp32"])
    passed = all(
        max(r.vision_max_abs or 0.0, r.prefill_logits_max_abs, r.prefill_cache_max_abs,
            r.teacher_forced_max_logit_error) <= bounds["max_abs"]
        and r.teacher_forced_top1 >= bounds["top1"] and (r.greedy_identical or not bounds["greedy_identical"])
        for r in reports)
    return {"engines": str(engines), "model": str(source), "precision": precision, "backend": pipe.backend.name,
            "bounds": bounds, "passed": passed, "cases": [asdict(r) for r in reports]}


def format_table(report: dict[str, Any]) -> str:
    """The report as a markdown table."""
    def num(x, fmt=".1e"):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    lines = [f"parity: {report['engines']} ({report['precision']}, {report['backend']}) vs reference {report['model']}",
             "",
             "| case | prompt tok | vision max abs | vision cos | prefill logits max abs | prefill cos | KV max abs "
             "| TF top-1 | TF max logit err | greedy match |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["cases"]:
        lines.append(
            f"| {c['name']} | {c['prompt_tokens']} | {num(c['vision_max_abs'])} | {num(c['vision_cosine'], '.6f')} "
            f"| {num(c['prefill_logits_max_abs'])} | {num(c['prefill_logits_cosine'], '.6f')} | {num(c['prefill_cache_max_abs'])} "
            f"| {c['teacher_forced_top1']:.1%} ({c['teacher_forced_steps']} steps) | {num(c['teacher_forced_max_logit_error'])} "
            f"| {c['greedy_match_prefix']}/{c['greedy_tokens']}{' identical' if c['greedy_identical'] else ''} |")
    bounds = report["bounds"]
    lines += ["", f"bounds: max abs <= {bounds['max_abs']:g}, teacher-forced top-1 >= {bounds['top1']:.0%}"
                  f"{', greedy identical' if bounds['greedy_identical'] else ''} -> {'PASSED' if report['passed'] else 'FAILED'}"]
    return "\n".join(lines)


def parity_command(args) -> int:
    cases = None
    if args.prompt is not None or args.image:
        cases = [ParityCase("given", args.prompt or "Describe the image.", list(args.image or []))]
        for image in args.image or []:
            if not Path(image).is_file():
                raise GlmTrtError(f"image {image!r} does not exist; pass an existing image file")
    report = run_parity(args.engines, args.model, cases, steps=args.steps, provider=args.provider, threads=args.threads)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if report["passed"] else 1
