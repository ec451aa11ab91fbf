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
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate (default: %(default)s)")


def add_presets_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the normalized configs as JSON")


# Each subcommand: (help, argument builder, "module:function" run lazily with the parsed args).
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], str]] = {
    "demo": ("run the reference on the built-in default and print the generated tokens",
             add_demo_arguments, "glmtrt.reference.demo:demo_command"),
    "presets": ("list the built-in model presets", add_presets_arguments, "glmtrt.reference.demo:presets_command"),
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
