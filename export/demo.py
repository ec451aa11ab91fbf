"""``glmtrt demo``: the main job on the built-in default — export, run the torch-free runtime, check parity."""

from __future__ import annotations

import time
from pathlib import Path

from glmtrt.runtime.cli import SAMPLE_TEXT, sample_image_path
from glmtrt.runtime.errors import InputError
from glmtrt.runtime.manifest import Manifest, ManifestError

DEMO_PROMPT = "Text Recognition:"


def _reusable(folder: Path, source: str) -> bool:
    """An earlier demo export of the same model can be reused (it is complete and records that source)."""
    try:
        manifest = Manifest.load(folder, verify_hashes=False)
    except ManifestError:
        return False
    from .assets import resolve_source

    wanted = resolve_source(source)  # what the export records: a preset's name or the checkpoint's resolved folder
    return manifest.extra.get("source") == (wanted.name if wanted.is_preset else str(wanted.folder.resolve()))


def demo_command(args) -> int:
    from glmtrt.runtime.pipeline import Pipeline

    from . import export_folder
    from .parity import ParityCase, format_table, run_parity

    if args.max_new_tokens <= 0:
        raise InputError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    image = args.image or sample_image_path()
    if not Path(image).is_file():
        raise InputError(f"image {image!r} does not exist; pass an existing image file")
    model = args.model
    engines = Path(args.engines or Path("engines") / Path(model).name)

    print(f"== export  {model} -> {engines}")
    if _reusable(engines, model):
        print("   (reusing the finished export already there)")
    else:
        result = export_folder(model, engines, force=engines.exists(), progress=False,
                               log=lambda line: print(f"   {line}"))
        print(f"   done in {result.seconds:.1f} s")

    from PIL import Image

    with Image.open(image) as shown:
        size = f"{shown.width} x {shown.height} px"
    truth = SAMPLE_TEXT if args.image is None else None
    print(f"== run     {image} ({size}" + (f", showing the line {truth!r})" if truth else ")"))
    with Pipeline.from_engines(engines) as pipe:
        out = pipe.generate(DEMO_PROMPT, [image], max_new_tokens=args.max_new_tokens)
    random_weights = Manifest.load(engines, verify_hashes=False).extra.get("random_weights")
    t = out.timings
    print(f"   prompt  : {DEMO_PROMPT!r} + the image ({len(out.prompt_token_ids)} prompt tokens)")
    verdict = ""
    if random_weights:
        verdict = "   (random weights: not meant to be meaningful)"
    elif truth is not None:
        verdict = "   (correct)" if out.text == truth else f"   (the image shows {truth!r})"
    print(f"   read    : {out.text!r}{verdict}")
    print(f"   tokens  : {out.token_ids} (stop: {out.stop_reason})")
    print(f"   timings : preprocess {t['preprocess_s'] * 1e3:.0f} ms, vision {t['vision_s'] * 1e3:.0f} ms, "
          f"prefill {t['prefill_s'] * 1e3:.0f} ms, first token {t['ttft_s'] * 1e3:.0f} ms, "
          f"decode {t['decode_tokens_per_s']:.0f} tok/s (ONNX Runtime CPU)")

    print("== parity  (the same road through the PyTorch reference)")
    start = time.perf_counter()
    report = run_parity(engines, cases=[ParityCase("demo image", DEMO_PROMPT, [image])], steps=args.steps)
    print("   " + format_table(report).replace("\n", "\n   "))
    print(f"   ({time.perf_counter() - start:.1f} s)")
    return 0 if report["passed"] else 1
