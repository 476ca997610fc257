"""``medsam3d batch``: a manifest of studies -> :func:`medsam3d.batch.run_batch`.

Exit codes: 0 every study done (or unchanged); 2 the batch could not start (bad manifest or
options, nothing run); 3 the batch finished but some studies failed (see ``results.csv`` and
``report.html``).
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("medsam3d")


def _cmd_batch(args: argparse.Namespace) -> int:
    from ..batch.runner import run_batch

    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=1, unit="study", desc="batch", file=sys.stderr)

    def progress(done: int, total: int, message: str) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.set_postfix_str(message[:60], refresh=True)
        else:
            log.warning("[%d/%d] %s", done, total, message)

    options = {"fast": args.fast, "taper": args.taper}
    if args.no_zoom:
        options["zoom"] = None
    if args.stride is not None:
        options["stride"] = args.stride
    if args.detector is not None:
        options["detector"] = args.detector
    try:
        summary = run_batch(args.manifest, args.output, engine=args.engine, workers=args.workers,
                            ray_address=args.ray_address, force=args.force, retry_failed=args.retry_failed,
                            model_name=args.model, checkpoint=args.checkpoint, device=args.device,
                            threads=args.threads, rtstruct=args.rtstruct, register=not args.no_register,
                            pseudonymise=args.pseudonymise, progress=progress, **options)
    finally:
        if bar is not None:
            bar.close()
    for failure in summary.failures:
        print(f"failed: {failure['case_id']} (row {failure['row']}, {failure['stage']}): {failure['error']}")
    print(summary.line())
    return summary.exit_code


def _cmd_batch_plan(args: argparse.Namespace) -> int:
    from .batch_plan import _cmd_batch_plan as plan

    return plan(args)
