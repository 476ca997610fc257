"""``medsam3d batch-plan``: a manifest CSV planned from a PACS export (one row per image series)."""

from __future__ import annotations

import argparse


def _cmd_batch_plan(args: argparse.Namespace) -> int:
    from ..batch.plan import plan_manifest

    rows = plan_manifest(args.root, output=args.output, overwrite=bool(getattr(args, "force", False)))
    patients = len({r["patient_id"] for r in rows})
    with_prompts = sum(1 for r in rows if r["prompts"])
    same_time: dict[tuple[str, str, str], int] = {}
    for r in rows:
        key = (r["patient_id"], r["modality"], r["timepoint"])
        same_time[key] = same_time.get(key, 0) + 1
    crowded = sum(1 for n in same_time.values() if n > 1)
    todo = []
    if with_prompts < len(rows):
        todo.append(f"fill in the prompts of {len(rows) - with_prompts} row(s)")
    if crowded:
        todo.append(f"keep one series per modality and date in {crowded} case(s) of several (see the warnings)")
    undated = sum(1 for r in rows if not r["timepoint"])
    if undated:
        todo.append(f"fill in {undated} timepoint(s)")
    print(f"{args.output}: {len(rows)} series of {patients} patient(s), {with_prompts} with prompts from an "
          f"RTSTRUCT or SEG" + (f"; before running: {'; '.join(todo)}" if todo else ""))
    return 0
