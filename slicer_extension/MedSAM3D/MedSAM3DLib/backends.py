"""Where the segmentation runs: medsam3d in Slicer's Python, or a ``medsam3d serve`` server.

Both backends take the same inputs (a volume, a medsam3d prompt document, engine options) and
return the same :class:`Outcome`: the case record (medsam3d's ``CaseRecord`` as JSON: volumes,
their range, measurements) and the label map (arrays in-process, ``.seg.nrrd`` bytes from a
server). They keep their session open between calls, so that a refine re-uses the volume's
cached embeddings: a :class:`medsam3d.Session` in-process, a server session otherwise.

No Slicer here: the module's Logic calls a backend from one worker thread and touches the
scene only on the main thread (see ``MedSAM3D.py``). medsam3d is imported by the in-process
backend when it first runs, never at import; the server backend needs only the vendored
standard-library :mod:`client`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

from . import client as http

#: the engine options the module exposes (the server's ``options`` keys, medsam3d's keyword arguments)
OPTIONS = ("fast", "taper", "zoom", "stride", "window", "modality")
#: the modalities medsam3d (and a server's ``options.modality``) accepts; a DICOM modality outside them is not sent
MODALITIES = ("CT", "MR", "PT", "US")


class Cancelled(Exception):
    """The user cancelled the run."""


class Progress:
    """Progress shared between the worker thread and the GUI (thread-safe), and the cancel flag."""

    def __init__(self):
        self._lock = threading.Lock()
        self.done, self.total, self.message = 0, 0, ""
        self._cancel = threading.Event()

    def update(self, done: int, total: int, message: str = "") -> None:
        with self._lock:
            self.done, self.total, self.message = int(done), int(total), str(message)

    def snapshot(self) -> Tuple[int, int, str]:
        with self._lock:
            return self.done, self.total, self.message

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __call__(self, done: int, total: int, message: str = "") -> None:
        """medsam3d's ``progress(done, total, message)`` callback: records, then stops the engine
        (by raising :class:`Cancelled`) when the user asked to."""
        self.update(done, total, message)
        if self.cancelled:
            raise Cancelled("cancelled by the user")


@dataclass
class Outcome:
    """A finished run: the case record (JSON-ready dict) and the label map, either as arrays
    (``labels``: ``(array[i, j, k], ijk_to_ras, segments)``) or as ``.seg.nrrd`` bytes."""

    record: Dict[str, Any]
    labels: Optional[Tuple[Any, Any, Dict[int, Dict[str, Any]]]] = None
    labels_seg_nrrd: Optional[bytes] = None


class InProcessBackend:
    """medsam3d in this Python (:class:`medsam3d.Session`): the model stays loaded between runs
    and volumes; the session (embedding cache) stays open while the volume does not change."""

    name = "in-process"

    def __init__(self, model_name: str = "litemedsam", device: str = "auto", checkpoint: Optional[str] = None):
        self.model_name, self.device, self.checkpoint = model_name, device, checkpoint or None
        self.session = None
        self._key = None
        self._model = None
        self._options: Dict[str, Any] = {}  # the engine options of the last finished segment (a refine re-uses them)

    @property
    def key(self) -> Any:
        """The key of the volume whose session is open (None when none is)."""
        return self._key if self.session is not None else None

    def is_open(self, key: Any) -> bool:
        return key is not None and self.key == key

    def open(self, key: Any, array, ijk_to_ras, meta: Optional[Dict[str, Any]] = None) -> None:
        """Open a session on this volume unless it is the one open (``key`` tells them apart)."""
        if self.is_open(key):
            return
        import medsam3d

        volume = medsam3d.Volume(array, ijk_to_ras, dict(meta or {}))
        self.session = medsam3d.Session(volume, model=self._model, model_name=self.model_name,
                                        checkpoint=self.checkpoint, device=self.device)
        self._model = self.session.model  # a CachedModel: loaded once, re-used for the next volume
        self._key = key

    @staticmethod
    def _engine_options(options: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        options = {k: v for k, v in (options or {}).items() if v is not None}
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise ValueError(f"expected options among {', '.join(OPTIONS)}, found {', '.join(sorted(unknown))}")
        if options.pop("fast", False):
            from medsam3d.propagate import PropagationConfig

            options["config"] = PropagationConfig.fast()
        return options

    def _outcome(self, record) -> Outcome:
        labels = record.labels
        return Outcome(record.to_dict(), labels=(labels.array, labels.affine, labels.segments))

    def segment(self, prompts: Dict[str, Any], options: Optional[Dict[str, Any]], progress: Progress) -> Outcome:
        from medsam3d.prompts import prompts_from

        if self.session is None:
            raise RuntimeError("expected an open session, found none; call open() first")
        engine_options = self._engine_options(options)
        objects = prompts_from(prompts, self.session.volume)  # checked before the engine starts
        record = self.session.run(prompts, progress=progress, **engine_options)
        # only a finished run changes the session: its current prompts (what a refine adds to, as
        # Session.segment would set them) and the options a refine re-uses
        self.session.objects, self._options = objects, engine_options
        return self._outcome(record)

    def refine(self, obj: Any, slice_index: int, box: Sequence[int], progress: Progress) -> Outcome:
        """One engine pass: the session's prompts with the box added (``Session.refined_prompts``,
        nothing segmented), then one ``run_case`` of them for the record and labels (the embeddings
        are cached: a slice encoded before is not encoded again)."""
        if self.session is None or not self.session.objects:
            raise RuntimeError("expected a segmentation to refine, found none; press Segment first")
        options = self._options
        objects = self.session.refined_prompts(obj, slice=int(slice_index), box=[int(v) for v in box], replace=True)
        record = self.session.run(objects, progress=progress, **options)
        self.session.objects = objects  # as Session.refine leaves them; unchanged when the run fails or is cancelled
        return self._outcome(record)

    def close(self) -> None:
        self.session, self._key = None, None


class ServerBackend:
    """A ``medsam3d serve`` server: the volume is uploaded once per session, jobs are polled
    (cancel reaches the server), the labels come back as ``.seg.nrrd``."""

    name = "server"

    def __init__(self, url: str, token: Optional[str] = None, poll_s: float = 0.5, allow_insecure_http: bool = False):
        self.client = http.Client(url, token, allow_insecure_http=allow_insecure_http)
        self.poll_s = poll_s
        self.session_id: Optional[str] = None
        self.session_info: Optional[Dict[str, Any]] = None
        self._key = None

    def health(self) -> Dict[str, Any]:
        return self.client.health()

    @property
    def key(self) -> Any:
        """The key of the volume whose server session is open (None when none is)."""
        return self._key if self.session_id is not None else None

    def is_open(self, key: Any) -> bool:
        return key is not None and self.key == key

    def open(self, key: Any, volume_file: str) -> None:
        """Upload the volume file (``.nrrd``/``.nii.gz`` written from the volume node) unless this
        volume's session is open."""
        if self.is_open(key):
            return
        self.close()
        self.session_info = self.client.create_session_from_file(volume_file)
        self.session_id = self.session_info["session_id"]
        self._key = key

    def _run(self, job_id: str, progress: Progress) -> Outcome:
        def report(job):
            p = job.get("progress") or {}
            progress.update(p.get("done") or 0, p.get("total") or 0, p.get("message") or job.get("state", ""))

        try:
            self.client.wait(job_id, poll_s=self.poll_s, on_progress=report, should_cancel=lambda: progress.cancelled)
        except http.JobCancelled:
            raise Cancelled("cancelled by the user") from None
        except http.JobFailed as exc:
            raise RuntimeError(f"the server could not segment: {exc.job.get('error') or 'no reason given'}") from None
        return Outcome(self.client.record(job_id), labels_seg_nrrd=self.client.labels(job_id, "seg.nrrd"))

    def segment(self, prompts: Dict[str, Any], options: Optional[Dict[str, Any]], progress: Progress) -> Outcome:
        if self.session_id is None:
            raise RuntimeError("expected an open session, found none; call open() first")
        options = {k: v for k, v in (options or {}).items() if v is not None}
        return self._run(self._expired_hint(lambda: self.client.segment(self.session_id, prompts, options=options)),
                         progress)

    def refine(self, obj: Any, slice_index: int, box: Sequence[int], progress: Progress) -> Outcome:
        if self.session_id is None:
            raise RuntimeError("expected a segmentation to refine, found none; press Segment first")
        return self._run(self._expired_hint(lambda: self.client.refine(self.session_id, obj, slice_index, box)),
                         progress)

    def _expired_hint(self, start):
        try:
            return start()
        except http.ServerError as exc:
            if exc.status == 404:  # the server dropped the session (expired, or the server restarted)
                self.session_id, self._key = None, None
                raise RuntimeError(f"the server no longer has this volume's session ({exc.detail}); press Segment "
                                   "again to upload it anew") from None
            raise

    def close(self) -> None:
        if self.session_id is not None:
            try:
                self.client.delete_session(self.session_id)
            except http.ClientError:
                pass  # expired or unreachable: nothing left to free
        self.session_id, self.session_info, self._key = None, None, None
