"""``glmtrt export MODEL --out DIR``: the command-line face of :func:`glmtrt.export.export_model`."""

from __future__ import annotations

import sys


def export_command(args) -> int:
    from .folder import export_folder

    def log(line: str) -> None:
        print(f"  {line}", flush=True)

    if not args.quiet:
        print(f"exporting {args.model} -> {args.out} ({args.precision})", flush=True)
    result = export_folder(args.model, args.out, precision=args.precision, force=args.force, opset=args.opset,
                           progress=not args.quiet and sys.stderr.isatty(), log=None if args.quiet else log)
    timings = ", ".join(f"{g.name} {g.seconds:.1f} s" for g in result.graphs)
    print(f"exported {result.family} to {result.folder} in {result.seconds:.1f} s ({timings})")
    return 0
