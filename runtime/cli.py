"""The ``glmtrt`` command.

Subcommands are built from reusable argument groups and import their heavy modules (torch, onnx,
onnxruntime, tensorrt) only when they run, so ``glmtrt --help`` is instant and the runtime commands
work without PyTorch. A user's mistake (a :class:`GlmTrtError`) prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .errors import GlmTrtError

SAMPLE_IMAGE = "sample.png"
# What the bundled sample image shows: glmtrt.reference.ocr_data.render_line(np.random.default_rng(0), SAMPLE_TEXT),
# a line as the trained OCR model saw in training (289 x 59 px).
SAMPLE_TEXT = "Invoice 2026-11"
# What `glmtrt export --precision` / `glmtrt quantize --precision` take (glmtrt.export.folder.PRECISIONS; kept here
# so that the parser needs no export import).
PRECISIONS = ("fp32", "fp16", "int8", "cpu-int8", "cpu-int4")


def sample_image_path() -> str:
    """Path of the bundled sample image (a rendered text line)."""
    from importlib import resources

    return str(resources.files("glmtrt.runtime") / "assets" / SAMPLE_IMAGE)


# ------------------------------------------------------------------------------------ argument groups

def add_model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="an HF checkpoint folder or a preset name (see `glmtrt presets`)")


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="glm-ocr-lines",
                   help="checkpoint folder, shipped model or preset (default: %(default)s, the small GLM-OCR trained on "
                        "rendered text lines)")
    p.add_argument("--image", default=None, help="image to read (default: the bundled sample, a rendered line)")
    p.add_argument("--engines", default=None, metavar="DIR", help="where to export (default: engines/<model name>)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate (default: %(default)s)")
    p.add_argument("--steps", type=int, default=16, help="decode steps the parity check compares (default: %(default)s)")


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("--out", required=True, metavar="DIR", help="engines folder to write (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing export at --out (only once the new one is complete)")
    p.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset (default: 20)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32 (default), or a plan derived from it: fp16 / int8 (TensorRT input), cpu-int8 / cpu-int4 "
                   "(ONNX Runtime only); see `glmtrt quantize`")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-graph lines; print only the result")


def add_engines_arguments(p: argparse.ArgumentParser) -> None:
    """The engines folder and how to run it (shared by run, parity, bench)."""
    p.add_argument("--engines", required=True, metavar="DIR", help="engines folder written by `glmtrt export`")
    p.add_argument("--provider", choices=("cpu", "cuda", "tensorrt"), default="cpu",
                   help="ONNX Runtime execution provider (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="ONNX Runtime intra-op threads")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    add_engines_arguments(p)
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image to put before the prompt (repeat for several)")
    p.add_argument("--video", default=None, metavar="FILE_OR_FRAME_GLOB",
                   help="a video before the prompt: a video file (decoded with PyAV: pip install av), sampled at 2 "
                   "frames a second, or a quoted glob of frame images such as 'frames/*.png' (sorted, taken as 2 a "
                   "second)")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the user's text")
    p.add_argument("--system", default=None, metavar="TEXT", help="an optional system prompt")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="tokens to generate at most (default: the manifest's, else 256)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, prompt_token_ids, "
                   "stop_reason, timings, thinking, answer")
    p.add_argument("--temperature", type=float, default=None, metavar="T", help="0 = greedy (the default)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K likeliest (0 = off)")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=None, metavar="R", help="1 = off")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="seed of the sampler (reproducible draws)")
    p.add_argument("--ignore-eos", action="store_true", help="never stop before --max-new-tokens")
    p.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of the engine files")
    p.add_argument("--share-weights", action="store_true",
                   help="cpu provider: hold the prefill and decode weights once (memory-mapped, -2.2 GB for GLM-OCR "
                        "in fp32) at some decode speed (ONNX Runtime's weight prepacking is off for them)")
    add_image_generation_arguments(p)


def add_image_generation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("GLM-Image engines folders (token grids for the diffusion decoder; sampled by default, "
                             "--temperature 0 for greedy; --image gives the source images of image-to-image)")
    g.add_argument("--target-size", default=None, metavar="HxW",
                   help="size in pixels of the image to generate, e.g. 1152x768 (the default): sets the large and "
                   "preview token grids, one token per 32 px")
    g.add_argument("--out", default=None, metavar="PATH",
                   help="write the grids as JSON (tokens.json), atomically (default: print the JSON)")


def add_parity_arguments(p: argparse.ArgumentParser) -> None:
    add_engines_arguments(p)
    p.add_argument("--model", default=None, metavar="MODEL",
                   help="checkpoint folder or preset the engines came from (default: the manifest's record)")
    p.add_argument("--steps", type=int, default=32, metavar="N", help="decode steps compared (default: %(default)s)")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="use this image (repeatable) "
                   "instead of the built-in cases")
    p.add_argument("--prompt", default=None, metavar="TEXT", help="use this prompt instead of the built-in cases")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    p.add_argument("--backend", choices=("onnxruntime", "trt"), default="onnxruntime",
                   help="run the engines folder's ONNX graphs with ONNX Runtime (--provider) or its TensorRT plans "
                   "built by `glmtrt build` (default: %(default)s)")


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", required=True, metavar="DIR", help="engines folder written by `glmtrt export`; the "
                   ".plan files are written beside its graphs and recorded in its manifest")
    p.add_argument("--profile", action="append", default=[], metavar="NAME=MIN:OPT:MAX",
                   help="optimization-profile range of a dimension (batch, seq, capacity, num_patches, ...) in every "
                   "graph that has it, or GRAPH.NAME for one graph (e.g. decode.capacity=2:512:8192); repeatable")
    p.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="most positions (prompt + generated) the engines take: caps max_position_embeddings for the "
                   "sequence and cache defaults (default: 4096)")
    p.add_argument("--timing-cache", default=None, metavar="DIR", help="directory of TensorRT timing caches, one file "
                   "per GPU + compute capability + TensorRT version (default: ~/.cache/glmtrt/timing-caches; '' = none)")
    p.add_argument("--workspace", type=float, default=None, metavar="GB", help="TensorRT workspace pool limit in GiB "
                   "(default: TensorRT's, the GPU's memory)")
    p.add_argument("--tf32", action="store_true", help="let fp32 matmuls use TF32 (faster, ~1e-3 relative error; "
                   "default off: fp32 engines compute in IEEE fp32)")
    p.add_argument("--device", type=int, default=0, metavar="N", help="CUDA device to build for (default: 0)")


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", required=True, metavar="FP32_DIR", help="fp32 engines folder written by `glmtrt export`")
    p.add_argument("--precision", required=True, choices=PRECISIONS[1:],
                   help="fp16 / int8: TensorRT input (standard ops, precision in the graph); cpu-int8 / cpu-int4: "
                   "ONNX Runtime CPU plans (dynamic int8 / weight-only int4 MatMulNBits)")
    p.add_argument("--out", required=True, metavar="DIR", help="plan folder to write (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing folder at --out (once the new one is complete)")
    p.add_argument("--calibration-steps", type=int, default=None, metavar="N",
                   help="int8: greedy decode steps per calibration case (default: 16)")
    p.add_argument("--int8-base", choices=("fp16", "fp32"), default=None,
                   help="int8: precision of the unquantized layers (default: fp16, the fp16 plan with Q/DQ added)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="ONNX Runtime intra-op threads")
    p.add_argument("--quiet", action="store_true", help="print only the result")


def add_accuracy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", required=True, action="append", metavar="DIR",
                   help="engines folder of any precision (repeat to compare plans in one table)")
    p.add_argument("--model", default=None, metavar="MODEL",
                   help="checkpoint folder or preset the engines came from (default: the manifest's record)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="teacher-forced steps per case (default: enough for 256 over all cases)")
    p.add_argument("--provider", choices=("cpu", "cuda", "tensorrt"), default="cpu",
                   help="ONNX Runtime execution provider (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="ONNX Runtime intra-op threads")
    p.add_argument("--no-ocr", action="store_true", help="skip the OCR character error rate of the trained OCR model")
    p.add_argument("--ocr-lines", type=int, default=200, metavar="N",
                   help="held-out lines for the CER (default: %(default)s, the whole held-out set)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report(s) as JSON")


def add_lint_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="engines folders or .onnx files")
    p.add_argument("--min-trt", default="10.13", metavar="X.Y",
                   help="oldest TensorRT version the graphs must parse in (default: %(default)s)")


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="glm-ocr", metavar="NAME",
                   help="model preset with seeded random weights (default: %(default)s, the real-size 1.1B GLM-OCR; "
                        "tiny-glm-ocr for a quick run)")
    p.add_argument("--engines", action="append", default=[], metavar="DIR",
                   help="an engines folder exported from --preset (repeatable; default: the preset exported once to "
                        "CACHE/bench-PRESET)")
    p.add_argument("--cache", default="engines", metavar="DIR", help="where the default export goes (default: %(default)s)")
    p.add_argument("--roads", default=None, metavar="LIST",
                   help="comma-separated subset of transformers-fp32,transformers-bf16,reference,onnxruntime,"
                        "onnxruntime-shared (each folder again with --share-weights) (default: all)")
    p.add_argument("--threads", type=int, default=2, metavar="N", help="threads of every road (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, metavar="N", help="runs per road; medians are reported "
                   "(default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=64, metavar="N", help="greedy tokens per run (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=896, metavar="PX", help="side of the square page image "
                   "(default: %(default)s: 4096 patches, 1024 image tokens)")
    p.add_argument("--prompt", default="Text Recognition:", metavar="TEXT", help="the instruction (default: %(default)r)")
    p.add_argument("--context", default=None, metavar="N[,N...]",
                   help="also time decode steps over a synthetic past of these lengths, e.g. 64,1024,4096")
    # 32 steps: the 4k/64 step ratio of 8-step medians wandered by +-0.1 between runs on a 2-core machine.
    p.add_argument("--context-steps", type=int, default=32, metavar="N", help="timed steps per --context length, "
                   "the lengths taking turns step by step (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")


def add_presets_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the normalized configs as JSON")


# Each subcommand: (help, argument builder, "module:function" run lazily with the parsed args).
def add_train_ocr_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder to write (HF layout)")
    p.add_argument("--steps", type=int, default=3400, help="step budget (default: %(default)s, ~27 min on 2 cores)")
    p.add_argument("--minutes", type=float, default=30.0,
                   help="wall-clock cap (default: %(default)s); the schedule follows max(step/steps, time/cap)")
    p.add_argument("--seed", type=int, default=0, help="model init and training-data seed (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak AdamW learning rate (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads (default: %(default)s); 0: 1 or 2, re-chosen every 100 steps by timing both "
                        "(2 threads slow down several-fold when other processes share the 2 cores)")
    p.add_argument("--data-workers", type=int, default=0,
                   help="processes rendering batches ahead (default: 0, inline: on 2 cores a worker slows torch's threads)")
    p.add_argument("--aux-weight", type=float, default=1.0,
                   help="weight of the training-only per-image-token character loss (decays to 0 at 80%% of training)")
    p.add_argument("--eval-every", type=int, default=500, help="validation CER every N steps (0: never)")
    p.add_argument("--log-every", type=int, default=100, help="progress line every N steps")
    p.add_argument("--save-every", type=int, default=100, help="save the training state every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from the training state saved beside --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation at the end")


def add_eval_ocr_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="DIR|NAME",
                   help="evaluate the PyTorch reference of a checkpoint folder or shipped model (e.g. glm-ocr-lines)")
    p.add_argument("--engines", action="append", default=None, metavar="DIR",
                   help="evaluate an engines folder through the runtime (repeat for several plans)")
    p.add_argument("--provider", choices=("cpu", "cuda", "tensorrt"), default="cpu",
                   help="ONNX Runtime execution provider for --engines (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="ONNX Runtime intra-op threads")
    p.add_argument("--n", type=int, default=200, help="held-out lines to read (default: %(default)s)")
    p.add_argument("--seed", type=int, default=20240917, help="held-out set seed (default: %(default)s, the fixed set)")
    p.add_argument("--show", type=int, default=5, metavar="N", help="print up to N misread lines per row")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], str]] = {
    "demo": ("the main job on the built-in default: export it, read the sample image with the runtime, check parity",
             add_demo_arguments, "glmtrt.export.demo:demo_command"),
    "presets": ("list the built-in model presets", add_presets_arguments, "glmtrt.reference.demo:presets_command"),
    "run": ("generate from images and a prompt with an engines folder (torch-free runtime)",
            add_run_arguments, "glmtrt.runtime.image_generation:run_command"),  # GLM-Image or -> pipeline
    "export": ("export a checkpoint or preset to ONNX graphs + manifest (an engines folder)",
               add_export_arguments, "glmtrt.export.cli:export_command"),
    "parity": ("compare an engines folder with the PyTorch reference, stage by stage",
               add_parity_arguments, "glmtrt.export.parity:parity_command"),
    "lint": ("check graphs for TensorRT ONNX-parser compatibility (runs on a CPU)",
             add_lint_arguments, "glmtrt.export.lint:lint_command"),
    "bench": ("time one OCR workload through transformers, the reference and ONNX Runtime folders (same weights)",
              add_bench_arguments, "glmtrt.export.bench:bench_command"),
    "quantize": ("derive a precision plan (fp16, int8, cpu-int8, cpu-int4) from an fp32 engines folder",
                 add_quantize_arguments, "glmtrt.export.plans:quantize_command"),
    "accuracy": ("accuracy report of engines folders (plans) against the fp32 reference, one row per folder",
                 add_accuracy_arguments, "glmtrt.export.accuracy:accuracy_command"),
    "train-ocr": ("train the small GLM-OCR model on rendered text lines (PyTorch, 2 cores, <= 30 min)",
                  add_train_ocr_arguments, "glmtrt.reference.train_ocr:train_command"),
    "eval-ocr": ("character error rate of the reference and/or engines folders on 200 held-out rendered text lines",
                 add_eval_ocr_arguments, "glmtrt.reference.eval_ocr:eval_ocr_command"),
    "build": ("build TensorRT engines (.plan) for an engines folder's graphs (needs TensorRT and a GPU)",
              add_build_arguments, "glmtrt.export.tensorrt:build_command"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmtrt", description="Export GLM vision-language models to ONNX / TensorRT "
                                     "and run them from a torch-free runtime.")
    parser.add_argument("--version", action="version", version=f"glmtrt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, function_name = COMMANDS[args.command][2].split(":")
    try:
        command = getattr(importlib.import_module(module_name), function_name)
        return int(command(args) or 0)
    except GlmTrtError as e:
        print(f"glmtrt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name in ("torch", "onnx", "onnxscript", "safetensors", "tensorrt"):
            print(f"glmtrt {args.command}: error: this command needs {e.name}; install the matching extra, "
                  f"e.g. pip install 'glmtrt[export]'", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print(f"glmtrt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
