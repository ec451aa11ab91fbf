"""``glmtrt accuracy``: the accuracy report of precision plans against the fp32 reference.

    glmtrt accuracy --engines engines/glm-ocr-fp16 [--engines engines/glm-ocr-int8 ...] [--steps N] [--json PATH]

Each engines folder (any precision; fp32 too, as the baseline) runs through ONNX Runtime CPU and walks the same
cases as the PyTorch reference in fp32, with :mod:`glmtrt.export.parity`'s machinery (stage by stage, same host
code): vision-embedding cosine, prefill logit error, teacher-forced decode (both fed the reference's greedy tokens)
with top-1 agreement and mean KL(reference || plan) accumulated over at least ``MIN_STEPS`` steps of all cases,
and free-running greedy generation through the runtime against the reference's tokens. A folder exported from the
trained OCR model (``reference/models/glm-ocr-lines``) also gets the character error rate of the plan and of the
fp32 reference on held-out rendered lines (:func:`ocr_cer`). Prints one row per folder; ``--json`` keeps all.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from glmtrt.runtime.errors import GlmTrtError

from .parity import ParityCase, builtin_cases, run_parity, summarize

MIN_STEPS = 256  # teacher-forced decode steps per report, accumulated over the cases
OCR_MODEL = "glm-ocr-lines"  # the trained OCR model's folder under glmtrt.reference's models/
OCR_LINES = 200  # held-out lines for the CER: the whole held-out set
OCR_CASE_LINES = 30  # held-out lines teacher-forced (about 11 tokens each with EOS: >= MIN_STEPS in all)


def accuracy_cases() -> list[ParityCase]:
    """:func:`glmtrt.export.parity.builtin_cases` (sample image, two synthetic images, text only) plus a rendered
    text line and a small page whose texts are not in the int8 calibration set."""
    from .plans import render_page, render_text_line

    return [
        *builtin_cases(),
        ParityCase("rendered line", "Text Recognition:", [render_text_line("Shipment 4471-B, due 09/12", seed=11)]),
        ParityCase("page", "Text Recognition:", [render_page(["Minutes of the meeting", "Present: 7 members",
                                                             "Budget approved: yes"])]),
    ]


def ocr_accuracy_cases(lines: int = OCR_CASE_LINES) -> list[ParityCase]:
    """The trained OCR model's cases: the first ``lines`` held-out rendered lines with the OCR prompt, each
    compared up to the reference's end of line (its first EOS)."""
    from glmtrt.reference.eval_ocr import OCR_PROMPT
    from glmtrt.reference.ocr_data import heldout_lines

    return [ParityCase(f"held-out line {i}", OCR_PROMPT, [image], stop_at_eos=True)
            for i, (image, _) in enumerate(heldout_lines(lines))]


def ocr_model_dir() -> Path | None:
    """The trained OCR model folder shipped with glmtrt.reference, when it exists."""
    from glmtrt.reference.config import builtin_model_dir

    return builtin_model_dir(OCR_MODEL)


def _same_model(source: str | None, folder: Path | None) -> bool:
    if source is None or folder is None:
        return False
    if source == OCR_MODEL:  # exported by name
        return True
    try:
        return Path(source).resolve() == folder.resolve()
    except OSError:
        return False


def ocr_cer(engines: str | Path, model_dir: str | Path, lines: int = OCR_LINES, threads: int | None = None) -> dict:
    """Character error rate of the engines folder (read through the torch-free runtime) and of the fp32 PyTorch
    reference of ``model_dir`` on the first ``lines`` held-out rendered lines (greedy, the model's length limit:
    :mod:`glmtrt.reference.eval_ocr`).

    Returns {"lines", "cer_plan", "cer_fp32", "cer_delta_points", "exact_match_plan", "exact_match_fp32",
    "lines_differing"} (lines the plan reads differently from the fp32 reference).
    """
    from glmtrt.reference.eval_ocr import evaluate_engines, evaluate_reference

    plan = evaluate_engines(engines, n=lines, threads=threads)
    fp32 = evaluate_reference(model_dir, n=lines)
    read = [{e["index"]: e["prediction"] for e in r["errors"]} for r in (plan, fp32)]
    return {"lines": lines, "cer_plan": plan["cer"], "cer_fp32": fp32["cer"],
            "cer_delta_points": 100.0 * (plan["cer"] - fp32["cer"]),
            "exact_match_plan": plan["exact_match"], "exact_match_fp32": fp32["exact_match"],
            "lines_differing": sum(read[0].get(i) != read[1].get(i) for i in set(read[0]) | set(read[1]))}


def run_accuracy(engines: str | Path, model: str | Path | None = None, *, steps: int | None = None,
                 cases: list[ParityCase] | None = None, min_steps: int = MIN_STEPS, provider: str = "cpu",
                 threads: int | None = None, ocr: bool | None = None, ocr_lines: int = OCR_LINES) -> dict[str, Any]:
    """The accuracy report of one engines folder against the fp32 reference of the model it came from.

    steps: teacher-forced (and free-running) steps per case; default: enough for ``min_steps`` over all cases.
    ocr: add the OCR character error rate (default: when the folder's source is the trained OCR model).
    Returns the parity report with ``summary`` (:func:`glmtrt.export.parity.summarize`), ``plan`` (the manifest's
    plan record), and ``ocr`` (a dict, or ``{"skipped": reason}``).
    """
    from glmtrt.runtime.manifest import Manifest

    manifest = Manifest.load(engines, verify_hashes=False)
    trained = ocr_model_dir()
    is_ocr_model = _same_model(str(model) if model is not None else manifest.extra.get("source"), trained)
    if cases is None:
        cases = ocr_accuracy_cases() if is_ocr_model else accuracy_cases()
    if steps is None and is_ocr_model:
        steps = int(manifest.generation.get("max_new_tokens") or 32)  # each line stops at the reference's EOS
    if steps is None:
        steps = max(1, math.ceil(min_steps / len(cases)))
    if steps < 1:
        raise GlmTrtError(f"--steps must be at least 1, got {steps}")
    report = run_parity(engines, model, cases, steps=steps, provider=provider, threads=threads)
    report["summary"] = summarize(report["cases"])
    plan = manifest.extra.get("plan") or {}
    report["plan"] = {"precision": manifest.precision, "tool": plan.get("tool", "torch.onnx.export (fp32)"),
                      "tensorrt_input": plan.get("tensorrt_input", True),
                      "graphs": {role: g.get("precision") for role, g in (plan.get("graphs") or {}).items()}
                      or {role: manifest.precision for role in manifest.graphs}}
    source = report["model"]
    if ocr is None:
        ocr = is_ocr_model
    if not ocr:
        reason = ("no trained OCR model in glmtrt.reference (reference/models/" + OCR_MODEL + ")" if trained is None
                  else f"the folder was exported from {source}, not the trained OCR model")
        report["ocr"] = {"skipped": reason}
    else:
        report["ocr"] = ocr_cer(engines, source, lines=ocr_lines, threads=threads)
    return report


def format_accuracy(reports: list[dict[str, Any]]) -> str:
    """One markdown row per report (plan)."""
    def num(x, fmt=".1e"):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    models = sorted({r["model"] for r in reports})
    lines = [f"accuracy vs the fp32 reference of {', '.join(models)} (ONNX Runtime CPU)", "",
             "| plan | graphs | vision cos (min) | prefill logits cos (min) | prefill max abs | TF top-1 | TF mean KL "
             "| TF max KL | greedy match | OCR CER plan / fp32 | bounds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        s, ocr = r["summary"], r.get("ocr") or {}
        graphs = ", ".join(f"{k} {v}" for k, v in r["plan"]["graphs"].items())
        cer = f"{ocr['cer_plan']:.2%} / {ocr['cer_fp32']:.2%}" if "cer_plan" in ocr else "-"
        lines.append(
            f"| {r['precision']} | {graphs} | {num(s['vision_cosine_min'], '.6f')} | {num(s['prefill_logits_cosine_min'], '.6f')} "
            f"| {num(s['prefill_logits_max_abs'])} | {s['teacher_forced_top1']:.2%} ({s['teacher_forced_steps']} steps) "
            f"| {num(s['teacher_forced_mean_kl'])} | {num(s['teacher_forced_max_kl'])} "
            f"| {s['greedy_match_prefix']}/{s['greedy_tokens']} ({s['greedy_identical_cases']}/{s['cases']} identical) "
            f"| {cer} | {'passed' if r['passed'] else 'FAILED'} |")
    skipped = {r["ocr"]["skipped"] for r in reports if "skipped" in (r.get("ocr") or {})}
    if skipped:
        lines += ["", "OCR CER: " + "; ".join(sorted(skipped))]
    return "\n".join(lines)


def accuracy_command(args) -> int:
    import gc

    reports = []
    for folder in args.engines:
        reports.append(run_accuracy(folder, args.model, steps=args.steps, threads=args.threads, provider=args.provider,
                                    ocr=False if args.no_ocr else None, ocr_lines=args.ocr_lines))
        gc.collect()  # the reference and the sessions of a real-size model are gigabytes: free them between folders
        if args.json and len(args.engines) > 1:  # keep what is done if a long run is stopped
            Path(args.json).write_text(json.dumps(reports, indent=2) + "\n")
    print(format_accuracy(reports))
    if args.json:
        Path(args.json).write_text(json.dumps(reports if len(reports) > 1 else reports[0], indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(r["passed"] for r in reports) else 1
