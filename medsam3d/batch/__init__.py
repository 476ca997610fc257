"""Batch volumetry: a manifest of studies -> a folder per study, a results database, follow-up, a report.

* :mod:`.manifest`: the manifest (:func:`read_manifest`, :class:`Study`) and each study's prompts;
* :mod:`.cells`: one row's cells, each checked alone (shared with the planner);
* :mod:`.plan`: a manifest from a folder of DICOM files (:func:`plan_manifest`);
* :mod:`.runner`: :func:`run_batch`, the driver's loop;
* :mod:`.keys`: each study's key (what decides it is current) and the order studies run in;
* :mod:`.engines`: where studies run (this process, worker processes, Ray actors);
* :mod:`.worker`: one study as a worker runs it;
* :mod:`.outdir`: the output folder (lock, staging, a study's folder swapped in whole);
* :mod:`.store`: the SQLite results database;
* :mod:`.results`: ``results.json`` with each patient's follow-up, ``results.csv``, the exports;
* :mod:`.html`, :mod:`.plot` and :mod:`.privacy`: ``report.html``, its volume plots and pseudonymisation.
"""

from .manifest import PromptSource, Study, read_manifest, study_prompts
from .plan import plan_manifest
from .runner import EXIT_FAILED_STUDIES, BatchError, BatchSummary, run_batch

__all__ = ["EXIT_FAILED_STUDIES", "BatchError", "BatchSummary", "PromptSource", "Study", "plan_manifest",
           "read_manifest", "run_batch", "study_prompts"]
