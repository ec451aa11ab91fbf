"""Character error rate and exact match of an OCR reader on the held-out synthetic lines.

    glmtrt eval-ocr [--model DIR|glm-ocr-lines] [--engines DIR ...] [--n 200] [--show 10] [--json]

The core is engine-agnostic: :func:`evaluate` takes any ``read_line(image) -> text`` callable: the PyTorch
reference (:func:`reference_reader`) or an engines folder of any plan driven by the torch-free runtime
(:func:`engines_reader`). Lines are read one at a time (no batch padding), greedy, up to the model's
``max_new_tokens``. CER is the summed Levenshtein distance over the summed length of the true lines.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from .ocr_data import HELDOUT_SEED, heldout_lines

__all__ = ["OCR_PROMPT", "levenshtein", "score", "truncate_at_eos", "evaluate", "reference_reader", "engines_reader",
           "evaluate_reference", "evaluate_engines", "eval_ocr_command"]

OCR_PROMPT = "Text Recognition:"  # GLM-OCR's instruction for plain text


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def score(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """cer (sum of edit distances / sum of reference lengths), exact_match rate, counts and the wrong lines."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    edits = [levenshtein(p, r) for p, r in zip(predictions, references)]
    chars = sum(len(r) for r in references)
    return {
        "cer": sum(edits) / max(chars, 1),
        "exact_match": sum(e == 0 for e in edits) / max(len(references), 1),
        "lines": len(references),
        "chars": chars,
        "edits": sum(edits),
        "errors": [{"index": i, "reference": r, "prediction": p, "edits": e}
                   for i, (p, r, e) in enumerate(zip(predictions, references, edits)) if e],
    }


def truncate_at_eos(ids: Iterable[int], eos_ids: Iterable[int]) -> list[int]:
    """The generated ids before the first EOS id."""
    eos = set(int(e) for e in eos_ids)
    out = []
    for token in ids:
        if int(token) in eos:
            break
        out.append(int(token))
    return out


def evaluate(read_line: Callable, lines: Sequence[tuple] | None = None, n: int = 200, seed: int = HELDOUT_SEED) -> dict:
    """Score ``read_line(PIL image) -> str`` on ``lines`` ((image, text) pairs; default: ``heldout_lines(n, seed)``)."""
    lines = heldout_lines(n, seed) if lines is None else lines
    t0 = time.perf_counter()
    predictions = [read_line(image) for image, _ in lines]
    result = score(predictions, [text for _, text in lines])
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def reference_reader(model_dir: str | Path, max_new_tokens: int | None = None) -> Callable:
    """``read_line(image) -> text`` with the PyTorch reference in fp32: preprocess, GLM-OCR prompt,
    ``greedy_generate``, truncate at the first EOS id, decode."""
    import torch
    from tokenizers import Tokenizer

    from glmtrt.runtime.preprocess import ImageProcessorConfig, preprocess_images

    from .demo import ocr_prompt_ids
    from .generate import PromptBatch, greedy_generate
    from .tokenizer import TINY_GLM4V_SPECIALS
    from .weights import load_reference

    from .config import builtin_model_dir

    folder = Path(model_dir)
    if not folder.exists() and builtin_model_dir(str(model_dir)) is not None:
        folder = builtin_model_dir(str(model_dir))
    model = load_reference(folder, dtype=torch.float32)
    proc = ImageProcessorConfig.from_dict(json.loads((folder / "preprocessor_config.json").read_text()))
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.encode_special_tokens = True
    specials = {name: tokenizer.token_to_id(name) for name in TINY_GLM4V_SPECIALS}
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    eos = model.config.text.eos_token_ids
    steps = max_new_tokens or int(gen.get("max_new_tokens", 32))
    merge = model.config.vision.spatial_merge_size

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    def read_line(image) -> str:
        vis = preprocess_images([image], proc)
        ids = ocr_prompt_ids(specials, encode, int(vis.grid_thw[0].prod()) // merge**2, OCR_PROMPT)
        batch = PromptBatch(input_ids=np.array([ids]), pixel_values=vis.pixel_values, image_grid_thw=vis.grid_thw)
        tokens = greedy_generate(model, batch, steps)[0]
        return tokenizer.decode(truncate_at_eos(tokens.tolist(), eos), skip_special_tokens=True)

    return read_line


def engines_reader(engines: str | Path, provider: str = "cpu", threads: int | None = None,
                   max_new_tokens: int | None = None) -> tuple[Callable, Callable]:
    """``read_line(image) -> text`` through the torch-free runtime on an engines folder (any plan), with the
    manifest's generation defaults (greedy for the shipped OCR model), and a ``close()`` for the pipeline."""
    from glmtrt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_engines(engines, provider=provider, threads=threads)
    options = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}

    def read_line(image) -> str:
        return pipe.generate(OCR_PROMPT, [image], **options).text

    return read_line, pipe.close


def evaluate_reference(model_dir: str | Path, n: int = 200, seed: int = HELDOUT_SEED,
                       max_new_tokens: int | None = None) -> dict:
    """CER / exact match of the PyTorch reference of ``model_dir`` on the first ``n`` held-out lines.
    Remembered per (folder, weights' mtime, n, seed, length) in this process: plans compare against it again and again."""
    import torch

    from .config import builtin_model_dir

    folder = Path(model_dir) if Path(model_dir).exists() else builtin_model_dir(str(model_dir)) or Path(model_dir)
    weights = sorted((p.name, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors")) if folder.is_dir() else []
    key = (str(folder.resolve()), tuple(weights), n, seed, max_new_tokens)
    if key not in _REFERENCE_RESULTS:
        threads = torch.get_num_threads()
        torch.set_num_threads(min(threads, 2))
        try:
            _REFERENCE_RESULTS[key] = evaluate(reference_reader(model_dir, max_new_tokens), n=n, seed=seed)
        finally:
            torch.set_num_threads(threads)
    return copy.deepcopy(_REFERENCE_RESULTS[key])


_REFERENCE_RESULTS: dict[tuple, dict] = {}


def evaluate_engines(engines: str | Path, n: int = 200, seed: int = HELDOUT_SEED, provider: str = "cpu",
                     threads: int | None = None, max_new_tokens: int | None = None) -> dict:
    """CER / exact match of an engines folder (fp32 export or any plan) on the first ``n`` held-out lines."""
    read_line, close = engines_reader(engines, provider, threads, max_new_tokens)
    try:
        return evaluate(read_line, n=n, seed=seed)
    finally:
        close()


def _summary(name: str, result: dict) -> str:
    return (f"{name}: CER {100 * result['cer']:.2f} % ({result['edits']} edits / {result['chars']} characters), "
            f"exact match {100 * result['exact_match']:.1f} % of {result['lines']} lines, {result['seconds']:.1f} s")


def eval_ocr_command(args) -> int:
    """``glmtrt eval-ocr``: CER and exact match of the reference (--model) and/or engines folders (--engines) on
    the held-out rendered lines; with both, also how many lines each folder reads differently from the reference."""
    from glmtrt.runtime.errors import InputError

    if not args.model and not args.engines:
        raise InputError("nothing to evaluate: pass --model DIR|NAME (the PyTorch reference) and/or --engines DIR")
    if args.n <= 0:
        raise InputError(f"--n must be positive, got {args.n}")
    rows: dict[str, dict] = {}
    if args.model:
        rows[f"reference {args.model}"] = evaluate_reference(args.model, n=args.n, seed=args.seed)
    for folder in args.engines or []:
        rows[f"engines {folder}"] = evaluate_engines(folder, n=args.n, seed=args.seed, provider=args.provider,
                                                     threads=args.threads)
    reference = rows.get(f"reference {args.model}") if args.model else None
    if reference is not None:
        wrong = {e["index"]: e["prediction"] for e in reference["errors"]}
        for name, result in rows.items():
            if name.startswith("engines "):
                theirs = {e["index"]: e["prediction"] for e in result["errors"]}
                result["lines_differing_from_reference"] = sum(
                    wrong.get(i) != theirs.get(i) for i in set(wrong) | set(theirs))
    if args.json:
        print(json.dumps({name: {k: v for k, v in r.items() if k != "errors" or args.show} for name, r in rows.items()},
                         indent=2))
        return 0
    for name, result in rows.items():
        print(_summary(name, result) + (f", {result['lines_differing_from_reference']} lines read differently from "
                                        "the reference" if "lines_differing_from_reference" in result else ""))
        for e in result["errors"][: args.show]:
            print(f"    #{e['index']:3d}  truth {e['reference']!r:22s} read {e['prediction']!r}")
    return 0


def main(argv=None) -> int:
    from glmtrt.runtime.cli import add_eval_ocr_arguments

    p = argparse.ArgumentParser(prog="python -m glmtrt.reference.eval_ocr", description=__doc__.split("\n\n")[0])
    add_eval_ocr_arguments(p)
    return eval_ocr_command(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
