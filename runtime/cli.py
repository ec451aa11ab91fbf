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


def sample_image_path() -> str:
    """Path of the bundled sample image (a rendered text line)."""
    from importlib import resources

    return str(resources.files("glmtrt.runtime") / "assets" / SAMPLE_IMAGE)


# ------------------------------------------------------------------------------------ argument groups

def add_model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="an HF checkpoint folder or a preset name (see `glmtrt presets`)")


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-glm-ocr", help="checkpoint folder or preset (default: %(default)s)")
    p.add_argument("--image", default=None, help="image to read (default: the bundled sample)")
    p.add_argument("--engines", default=None, metavar="DIR", help="where to export (default: engines/<model name>)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate (default: %(default)s)")
    p.add_argument("--steps", type=int, default=16, help="decode steps the parity check compares (default: %(default)s)")


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("--out", required=True, metavar="DIR", help="engines folder to write (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing export at --out (only once the new one is complete)")
    p.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset (default: 20)")
    p.add_argument("--precision", default="fp32", help="graph precision (default: %(default)s; only fp32 for now)")
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


def add_parity_arguments(p: argparse.ArgumentParser) -> None:
    add_engines_arguments(p)
    p.add_argument("--model", default=None, metavar="MODEL",
                   help="checkpoint folder or preset the engines came from (default: the manifest's record)")
    p.add_argument("--steps", type=int, default=32, metavar="N", help="decode steps compared (default: %(default)s)")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="use this image (repeatable) "
                   "instead of the built-in cases")
    p.add_argument("--prompt", default=None, metavar="TEXT", help="use this prompt instead of the built-in cases")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")


def add_lint_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="engines folders or .onnx files")
    p.add_argument("--min-trt", default="10.13", metavar="X.Y",
                   help="oldest TensorRT version the graphs must parse in (default: %(default)s)")


def add_presets_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the normalized configs as JSON")


# Each subcommand: (help, argument builder, "module:function" run lazily with the parsed args).
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], str]] = {
    "demo": ("the main job on the built-in default: export it, read the sample image with the runtime, check parity",
             add_demo_arguments, "glmtrt.export.demo:demo_command"),
    "presets": ("list the built-in model presets", add_presets_arguments, "glmtrt.reference.demo:presets_command"),
    "run": ("generate from images and a prompt with an engines folder (torch-free runtime)",
            add_run_arguments, "glmtrt.runtime.pipeline:run_command"),
    "export": ("export a checkpoint or preset to ONNX graphs + manifest (an engines folder)",
               add_export_arguments, "glmtrt.export.cli:export_command"),
    "parity": ("compare an engines folder with the PyTorch reference, stage by stage",
               add_parity_arguments, "glmtrt.export.parity:parity_command"),
    "lint": ("check graphs for TensorRT ONNX-parser compatibility (runs on a CPU)",
             add_lint_arguments, "glmtrt.export.lint:lint_command"),
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
