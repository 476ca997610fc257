"""The HTTP server over real HTTP on 127.0.0.1: sessions, jobs, limits, tokens, the real model.

Each server runs under uvicorn in a background thread on a free port; requests go through
urllib and http.client. The fast tests serve a threshold model (tests/synthetic.py), slowed
where a test needs a job to last; the slow ones serve LiteMedSAM on the bundled example.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

try:
    import fastapi  # noqa: F401
    import uvicorn
except ImportError:  # pragma: no cover - depends on the environment
    pytest.skip("needs the server extra (pip install 'medsam3d[server]': fastapi, uvicorn)", allow_module_level=True)

import medsam3d as m3
from medsam3d.server import ServerSettings, create_app

from conftest import EXAMPLES, shared
from synthetic import ThresholdModel

CASE = EXAMPLES / "sts041_ct"
IMAGE = CASE / "CT_image.nii.gz"
PROMPTS = json.loads((CASE / "prompts.json").read_text())
TOKEN = "test-token-0123456789abcdef"
#: the example's tumour on seven slices: a short job, and a refine whose slices are all encoded
SHORT = {"version": 1, "objects": [{"name": "sarcoma", "slice": 23, "box": [57, 57, 100, 109], "z_range": [20, 26]}]}


class SlowThreshold(ThresholdModel):
    """The threshold model, ``delay`` seconds per encoded batch and ``decode_delay`` per decoded
    image (a job that lasts, to cancel)."""

    delay = 0.0
    decode_delay = 0.0

    def encode(self, images):
        time.sleep(self.delay)
        return super().encode(images)

    def decode(self, image, boxes):
        time.sleep(self.decode_delay)
        return super().decode(image, boxes)


class Client:
    """Requests to one server: (status, headers, body bytes); JSON helpers."""

    def __init__(self, port: int, token: str | None, app=None):
        self.port, self.token, self.app = port, token, app
        self.base = f"http://127.0.0.1:{port}"

    def request(self, method: str, path: str, data: bytes | None = None, headers: dict | None = None,
                token: str | None | bool = True, timeout: float = 120):
        headers = dict(headers or {})
        token = self.token if token is True else token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def json(self, method: str, path: str, body=None, **kwargs):
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if body is not None else {}
        status, _, raw = self.request(method, path, data, headers, **kwargs)
        return status, (json.loads(raw) if raw else None)

    def upload(self, data: bytes, filename: str = "case.nii.gz", query: str = "", **kwargs):
        status, _, raw = self.request("POST", f"/v1/sessions{query}", data,
                                      {"Content-Type": "application/octet-stream", "X-Filename": filename}, **kwargs)
        return status, json.loads(raw) if raw else None

    def wait(self, job_id: str, timeout: float = 300) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            status, job = self.json("GET", f"/v1/jobs/{job_id}")
            assert status == 200, job
            if job["state"] in ("done", "failed", "cancelled"):
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} not finished after {timeout} s")

    def segment(self, sid: str, prompts, options=None, wait: bool = True):
        status, answer = self.json("POST", f"/v1/sessions/{sid}/segment", {"prompts": prompts, "options": options or {}})
        assert status == 202, answer
        return self.wait(answer["job_id"]) if wait else answer["job_id"]

    def labels(self, job_id: str, fmt: str = "nii.gz", tmp: Path | None = None) -> m3.Volume:
        status, _, raw = self.request("GET", f"/v1/jobs/{job_id}/labels?format={fmt}")
        assert status == 200, raw[:200]
        path = Path(tmp) / f"{job_id}.{fmt}"
        path.write_bytes(raw)
        return m3.load_labels(path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(settings: ServerSettings, model):
    """A real uvicorn server of ``create_app(settings, model=model)`` on a free loopback port."""
    port = _free_port()
    settings = ServerSettings(**{**settings.__dict__, "port": port})
    app = create_app(settings, model=model)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < end, "the server did not start"
        time.sleep(0.05)
    try:
        yield Client(port, settings.token, app)
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def slow_model():
    return SlowThreshold()


@pytest.fixture(scope="module")
def fast_server(slow_model, tmp_path_factory):
    """A threshold-model server with a token and small limits (3 MB uploads, 8 MB unzipped)."""
    settings = ServerSettings(token=TOKEN, max_upload_mb=3, max_unzipped_mb=8, max_zip_files=200, max_sessions=4,
                              workdir=tmp_path_factory.mktemp("server"))
    with serving(settings, slow_model) as client:
        yield client


@pytest.fixture
def client(fast_server, slow_model):
    """The fast server's client; every session a test opened is closed after it."""
    client = fast_server
    slow_model.delay = slow_model.decode_delay = 0.0
    yield client
    slow_model.delay = slow_model.decode_delay = 0.0
    store = client.app.state.store
    for sid in list(store._sessions):
        client.request("DELETE", f"/v1/sessions/{sid}")


def _example_bytes() -> bytes:
    return IMAGE.read_bytes()


# --- the service: health, schema, tokens ----------------------------------------------------------

def test_health_and_openapi_need_no_token(client):
    status, health = client.json("GET", "/health", token=None)
    assert status == 200 and health["status"] == "ok" and health["token_required"] is True
    assert health["model"]["name"] == "threshold" and health["max_sessions"] == 4
    assert {"python", "numpy", "torch"} <= set(health["versions"]) and health["medsam3d_version"] == m3.__version__
    status, schema = client.json("GET", "/openapi.json", token=None)
    assert status == 200
    assert {"/v1/sessions", "/v1/sessions/{sid}/segment", "/v1/sessions/{sid}/refine", "/v1/jobs/{jid}/events",
            "/v1/jobs/{jid}/labels", "/v1/jobs/{jid}/mesh", "/health"} <= set(schema["paths"])


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789abcdef", ""])
def test_a_missing_or_wrong_token_is_refused(client, token):
    status, answer = client.upload(_example_bytes(), token=token)
    assert status == 401 and "Bearer" in answer["detail"]
    status, answer = client.json("GET", "/v1/jobs/nothing", token=token)
    assert status == 401
    assert client.json("GET", "/v1/jobs/nothing")[0] == 404  # the right token: past the door, no such job
    status, _, _ = client.request("GET", "/v1/sessions/x", headers={"Authorization": f"Basic {TOKEN}"}, token=None)
    assert status == 401
    # the token is checked before the body is parsed: a malformed body gets 401, not 422
    for body in (b"{not json", b'{"prompts": 1, "extra": true}'):
        status, headers, raw = client.request("POST", "/v1/sessions/x/segment", body,
                                              {"Content-Type": "application/json"}, token=token)
        assert status == 401 and {k.lower(): v for k, v in headers.items()}.get("www-authenticate") == "Bearer", raw


# --- uploads ---------------------------------------------------------------------------------

def _raw(client: Client, headers: dict, chunks=None, length: int | None = None) -> tuple[int, dict]:
    """A POST /v1/sessions through http.client: with ``length`` and no ``chunks``, only the headers are sent."""
    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=60)
    conn.putrequest("POST", "/v1/sessions")
    for key, value in {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream",
                       **headers}.items():
        conn.putheader(key, value)
    if length is not None:
        conn.putheader("Content-Length", str(length))
    else:
        conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    for chunk in chunks or ():
        conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    if chunks is not None and length is None:
        conn.send(b"0\r\n\r\n")
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    return response.status, body


def test_bad_uploads_are_refused_and_the_server_keeps_serving(client, caplog):
    caplog.set_level(logging.INFO)
    data = _example_bytes()
    # too large, said by Content-Length: refused before the body is read
    status, answer = _raw(client, {"X-Filename": "big.nii.gz"}, length=4 << 20)
    assert status == 413 and "at most 3 MB" in answer["detail"]
    # too large, streamed (chunked, no length): stopped at the limit
    status, answer = _raw(client, {"X-Filename": "big.nii.gz"}, chunks=[os.urandom(1 << 20) for _ in range(4)])
    assert status == 413 and "at most 3 MB" in answer["detail"]
    for body, name, expected in [
        (data[: len(data) // 2], "case.nii.gz", "complete"),               # truncated
        (b"not an image at all" * 100, "case.nii.gz", "cannot read"),      # not an image
        (data, "case.txt", "X-Filename ending in"),                       # a name that is no format
        (data, "case.seg.nrrd", "Slicer segmentation"),
        (b"", "case.nii.gz", "empty body"),
    ]:
        status, answer = client.upload(body, name)
        assert status == 400, answer
        assert expected in answer["detail"] and "\n" not in answer["detail"]
    status, _, raw = client.request("POST", "/v1/sessions", data, {"Content-Type": "application/octet-stream"})
    assert status == 400 and b"X-Filename" in raw
    status, _, raw = client.request("POST", "/v1/sessions", data, {"Content-Type": "text/plain",
                                                                   "X-Filename": "case.nii.gz"})
    assert status == 400 and b"octet-stream" in raw
    status, answer = client.upload(data, "case.nii.gz", query="?series_uid=../../etc")
    assert status == 422
    # nothing of the refused uploads stays behind, and the next good request is served
    store = client_store(client)
    assert store.count() == 0 and store._pending == 0 and not list(store.root.iterdir())
    status, session = client.upload(data, "Doe^John_1234.nii.gz")
    assert status == 201 and session["shape"] == [153, 163, 53] and session["axcodes"] == "LPS"
    volume = m3.load(IMAGE)
    np.testing.assert_allclose(session["affine"], volume.affine)
    assert session["modality"] == "CT" and 0 < session["expires_in_s"] <= 1800
    folder = next(store.root.iterdir())
    assert [p.name for p in folder.iterdir()] == ["upload.nii.gz"]  # the server's name: the client's is not used
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("medsam3d"))
    assert "Doe" not in ours and "../../" not in ours  # nor is it logged, nor the query
    assert f"session {session['session_id']} opened: shape [153, 163, 53]" in ours


def client_store(client: Client):
    return client.app.state.store


def test_an_upload_naming_another_file_is_refused_before_it_is_read(client, tmp_path):
    """A NRRD 'data file' or a MetaImage ElementDataFile other than LOCAL would make ITK read a file
    of the server's disk: refused before any reader opens the upload; detached headers too."""
    secret = tmp_path / "secret.raw"
    secret.write_bytes(bytes(range(64)))  # 4 x 4 x 4 uchar: a valid volume, were it read
    head = "NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n"
    nrrds = [f"{head}data file: {secret}\n\n", f"{head}datafile: {secret}\n\n",
             f"{head}data file: LIST\n{secret}\n", f"{head}DATA FILE: {secret}\n\n",
             f"{head}data file: {tmp_path}/secret.%d.raw 0 0 1\n\n"]
    for text in nrrds:
        status, answer = client.upload(text.encode(), "case.nrrd")
        assert status == 400 and "data file" in answer["detail"] and str(tmp_path) not in answer["detail"], text
    meta = "ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\n"
    for value in (str(secret), "LIST", "secret.raw", f"{tmp_path}/secret.%d.raw 0 0 1"):
        for name in ("case.mha", "case.nrrd"):
            status, answer = client.upload(f"{meta}ElementDataFile = {value}\n".encode(), name)
            assert status == 400, (value, name, answer)
    status, answer = client.upload(f"{meta}ElementDataFile = {secret}\n".encode(), "case.mha")
    assert "ElementDataFile = LOCAL" in answer["detail"]
    for name in ("case.mhd", "case.nhdr", "case.hdr", "case.img", "case.raw"):
        status, answer = client.upload(f"{meta}ElementDataFile = {secret}\n".encode(), name)
        assert status == 400 and "detached" in answer["detail"], name
    store = client_store(client)
    assert store.count() == 0 and store._pending == 0 and not list(store.root.iterdir())
    # the same volume with its voxels inside the upload opens a session
    status, session = client.upload(f"{meta}ElementDataFile = LOCAL\n".encode() + secret.read_bytes(), "case.mha")
    assert status == 201 and session["shape"] == [4, 4, 4], session


def test_a_header_claiming_too_many_voxels_is_refused_before_loading(client, tmp_path):
    meta = "ObjectType = Image\nNDims = 3\nDimSize = 4000 4000 4000\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    status, answer = client.upload(meta.encode() + bytes(1024), "case.mha")
    assert status == 413 and "voxels" in answer["detail"], answer
    import nibabel as nib

    nib.save(nib.MGHImage(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "small.mgh")
    data = bytearray((tmp_path / "small.mgh").read_bytes())
    data[4:16] = np.array([4000, 4000, 4000], ">i4").tobytes()  # width, height, depth of the MGH header
    status, answer = client.upload(bytes(data), "case.mgh")
    assert status == 413 and "voxels" in answer["detail"], answer
    store = client_store(client)
    assert store.count() == 0 and store._pending == 0


def test_errors_never_show_the_server_s_folder(client):
    store = client_store(client)
    for body, name in ((b"not an image at all" * 100, "case.nii.gz"), (b"NRRD0004\nsizes: 2 2 2\n\nxx", "c.nrrd")):
        status, answer = client.upload(body, name)
        assert status == 400 and "<upload>" in answer["detail"], answer
        assert str(store.root) not in answer["detail"] and "medsam3d-server-" not in answer["detail"]


def test_a_stalled_upload_is_refused_and_gives_its_slot_back(tmp_path):
    settings = ServerSettings(max_sessions=1, upload_idle_s=0.5, workdir=tmp_path)
    with serving(settings, SlowThreshold()) as client:
        store = client_store(client)
        with socket.create_connection(("127.0.0.1", client.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream"
                         b"\r\nX-Filename: case.nii.gz\r\nContent-Length: 100000\r\n\r\n" + b"\x1f\x8b" * 8)
            t0 = time.monotonic()
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        detail = json.loads(answer.split(b"\r\n\r\n", 1)[1])["detail"]
        assert "0.5 s" in detail and "\n" not in detail and time.monotonic() - t0 < 15
        assert store.count() == 0 and store._pending == 0 and not list(store.root.iterdir())
        assert client.upload(_example_bytes())[0] == 201  # the one slot is free again


def test_stale_server_folders_of_dead_processes_are_removed_at_startup(tmp_path):
    dead = 4_000_000
    while True:
        try:
            os.kill(dead, 0)
        except ProcessLookupError:
            break
        except PermissionError:
            pass
        dead += 1
    stale = tmp_path / f"medsam3d-server-{dead}-abc123"
    (stale / "s-x").mkdir(parents=True)
    (stale / "s-x" / "upload.nii.gz").write_bytes(b"old")
    alive = tmp_path / f"medsam3d-server-{os.getppid()}-def456"
    alive.mkdir()
    other = tmp_path / "medsam3d-server-old"  # no process id in the name: left alone
    other.mkdir()
    with serving(ServerSettings(workdir=tmp_path), SlowThreshold()) as client:
        root = client_store(client).root
        assert root.name.startswith(f"medsam3d-server-{os.getpid()}-")
        assert not stale.exists() and alive.exists() and other.exists()
    assert not root.exists()


def _zip(entries: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_zip_bombs_and_climbing_names_are_refused_before_extraction(client, tmp_path):
    store = client_store(client)
    bomb = _zip({f"slice{n}.dcm": bytes(3 << 20) for n in range(4)})  # 12 MB of zeros in a few kB
    assert len(bomb) < 100_000
    status, answer = client.upload(bomb, "series.zip")
    assert status == 413 and "unzipped" in answer["detail"]
    for name in ("../../escaped.dcm", "/etc/escaped.dcm", "C:/escaped.dcm", "a/../../escaped.dcm",
                 "..\\escaped.dcm"):
        status, answer = client.upload(_zip({"ok.dcm": b"x", name: b"payload"}), "series.zip")
        assert status == 400 and "absolute or climbing" in answer["detail"], name
    many = _zip({f"{n}.dcm": b"" for n in range(201)}, zipfile.ZIP_STORED)
    status, answer = client.upload(many, "series.zip")
    assert status == 413 and "entries" in answer["detail"]
    link = zipfile.ZipInfo("link.dcm")
    link.external_attr = (0o120777 << 16)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(link, "/etc/passwd")
    status, answer = client.upload(buffer.getvalue(), "series.zip")
    assert status == 400 and "symbolic link" in answer["detail"]
    status, answer = client.upload(b"PK\x03\x04 broken", "series.zip")
    assert status == 400 and "zip" in answer["detail"]
    status, answer = client.upload(_zip({"notes.txt": b"no DICOM here"}), "series.zip")
    assert status == 400
    assert not list(store.root.iterdir()) and not any(Path(store.root).parent.glob("**/escaped.dcm"))
    assert client.upload(_example_bytes())[0] == 201


@pytest.mark.shared_data
def test_a_zipped_dicom_series_opens_a_session(client):
    folder = shared("ibsi_sts_041/dicom/CT/image")
    data = _zip({f"CT/{p.name}": p.read_bytes() for p in sorted(folder.iterdir())})
    status, session = client.upload(data, "series.zip")
    assert status == 201, session
    volume = m3.load(folder)
    assert session["shape"] == list(volume.shape) and session["modality"] == "CT"
    status, answer = client.upload(data, "series.zip", query="?series_uid=1.2.3")
    assert status == 400 and ("1.2.3" in answer["detail"] or "series" in answer["detail"])


# --- prompts, jobs, progress, cancel -----------------------------------------------------------

def test_bad_prompts_and_bodies_get_a_422_with_one_line(client):
    status, session = client.upload(_example_bytes())
    sid = session["session_id"]
    bad = [
        ({"prompts": {"version": 1, "objects": [{"name": "x", "slice": 99, "box": [1, 2, 30, 40]}]}}, "within 0..52"),
        ({"prompts": {"version": 1, "objects": [{"name": "x", "slice": 3, "box": [1, 2, 300, 40]}]}}, "box"),
        ({"prompts": "/etc/passwd"}, "body.prompts"),
        ({"prompts": PROMPTS, "options": {"checkpoint": "/tmp/evil.pth"}}, "checkpoint"),
        ({"prompts": PROMPTS, "options": {"stride": 0}}, "stride"),
        ({"prompts": PROMPTS, "options": {"window": "sideways"}}, "window"),
        ({"prompts": PROMPTS, "options": {"modality": "XR"}}, "modality"),
        ({"prompts": PROMPTS, "options": {"taper": 11}}, "taper"),
    ]
    for body, expected in bad:
        status, answer = client.json("POST", f"/v1/sessions/{sid}/segment", body)
        assert status == 422 and expected in answer["detail"] and "\n" not in answer["detail"], (body, answer)
    status, answer = client.json("POST", f"/v1/sessions/{sid}/refine", {"object": "sarcoma", "slice": 23,
                                                                        "box": [57, 57, 100, 109]})
    assert status == 422 and "segment first" in answer["detail"]
    status, _, _ = client.request("POST", f"/v1/sessions/{sid}/segment", b"{not json",
                                    {"Content-Type": "application/json"})
    assert status == 422
    for raw in (b'{"prompts": %s, "options": {"taper": NaN}}' % json.dumps(SHORT).encode(),
                b'{"prompts": %s, "options": {"taper": Infinity}}' % json.dumps(SHORT).encode(),
                b'{"prompts": {"version": 1, "objects": [{"name": "x", "slice": 23, "box": [1, 2, 30, NaN]}]}}'):
        status, _, answer = client.request("POST", f"/v1/sessions/{sid}/segment", raw,
                                           {"Content-Type": "application/json"})
        assert status == 422 and b"\\n" not in answer, answer
    status, answer = client.json("POST", "/v1/sessions/nope/segment", {"prompts": PROMPTS})
    assert status == 404
    status, answer = client.json("POST", f"/v1/sessions/{sid}/segment", {"prompts": PROMPTS, "pad": "x" * (2 << 20)})
    assert status == 413


def test_a_job_reports_progress_streams_its_events_and_gives_its_results(client, tmp_path):
    status, session = client.upload(_example_bytes())
    sid = session["session_id"]
    job_id = client.segment(sid, SHORT, wait=False)
    events = []
    with urllib.request.urlopen(urllib.request.Request(
            f"{client.base}/v1/jobs/{job_id}/events", headers={"Authorization": f"Bearer {TOKEN}"}), timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        for line in r:  # the stream ends (the server closes it) at a final state
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
    assert events and events[-1]["state"] == "done" and events[-1]["progress"]["done"] > 0
    assert all(e["job_id"] == job_id and e["kind"] == "segment" for e in events)
    job = client.wait(job_id)
    assert job["state"] == "done" and job["error"] is None
    status, record = client.json("GET", f"/v1/jobs/{job_id}/record")
    assert status == 200 and record["schema_version"] and record["objects"][0]["name"] == "sarcoma"
    assert record["input"]["path"] == "upload.nii.gz"  # the server's name, never its temporary folder
    from medsam3d.record import validate_report

    validate_report(record)
    labels = client.labels(job_id, "seg.nrrd", tmp_path)
    assert int((labels.array == 1).sum()) == record["objects"][0]["voxels"] > 0
    np.testing.assert_allclose(labels.affine, m3.load(IMAGE).affine, atol=1e-6)
    status, _, stl = client.request("GET", f"/v1/jobs/{job_id}/mesh?label=1&format=stl")
    assert status == 200 and len(stl) > 84
    assert client.request("GET", f"/v1/jobs/{job_id}/mesh?label=7")[0] == 422
    assert client.request("GET", f"/v1/jobs/{job_id}/labels?format=../../x")[0] == 422
    status, info = client.json("GET", f"/v1/sessions/{sid}")
    assert info["objects"] == [{"label": 1, "name": "sarcoma"}] and info["cache"]["misses"] > 0


def test_cancel_stops_a_running_job_and_a_queued_one(client, slow_model):
    status, session = client.upload(_example_bytes())
    sid = session["session_id"]
    slow_model.delay = 0.25  # the whole example: dozens of encodings, seconds each few
    running = client.segment(sid, PROMPTS, wait=False)
    queued = client.segment(sid, SHORT, wait=False)
    end = time.monotonic() + 30
    while client.json("GET", f"/v1/jobs/{running}")[1]["progress"]["done"] < 2:
        assert time.monotonic() < end
        time.sleep(0.05)
    assert client.json("GET", f"/v1/jobs/{running}/labels")[0] == 409  # not finished
    status, answer = client.json("DELETE", f"/v1/jobs/{queued}")
    assert status == 202 and answer["state"] == "cancelled"  # at once: it had not started
    status, answer = client.json("DELETE", f"/v1/jobs/{running}")
    assert status == 202
    job = client.wait(running, timeout=30)
    assert job["state"] == "cancelled" and job["progress"]["done"] < 40
    assert client.json("GET", f"/v1/jobs/{running}/record")[0] == 409
    assert client.json("GET", f"/v1/sessions/{sid}")[1]["objects"] == []  # the session is as before the job
    slow_model.delay = 0.0
    assert client.segment(sid, SHORT)["state"] == "done"  # and keeps serving


def test_a_cancel_after_the_last_progress_report_publishes_nothing(client, slow_model):
    """The cancel flag is checked after the engine returns: a job cancelled while the engine decoded,
    fused or measured ends cancelled, and the session keeps its previous results."""
    from medsam3d.server.jobs import _Cancelled

    sid = client.upload(_example_bytes())[1]["session_id"]
    first = client.segment(sid, SHORT)
    store = client_store(client)
    session = store.get(sid)
    before = session.engine.record
    assert before is store._jobs[first["job_id"]].result
    calls = []

    def check():  # passes before the engine starts, stops it after it returned
        calls.append(1)
        if len(calls) > 1:
            raise _Cancelled()

    with pytest.raises(_Cancelled):
        session.engine.refine("sarcoma", slice=23, box=[60, 60, 98, 104], check=check)
    assert len(calls) == 2 and session.engine.record is before
    assert session.engine.objects[0].boxes[0].box == (57, 57, 100, 109)
    # over HTTP: a refine that encodes nothing (its slices cached), slowed in the decoder, cancelled
    slow_model.decode_delay = 0.1
    status, answer = client.json("POST", f"/v1/sessions/{sid}/refine", {"object": "sarcoma", "slice": 23,
                                                                        "box": [60, 60, 98, 104]})
    assert status == 202
    end = time.monotonic() + 30
    while client.json("GET", f"/v1/jobs/{answer['job_id']}")[1]["state"] == "queued":
        assert time.monotonic() < end
        time.sleep(0.02)
    client.json("DELETE", f"/v1/jobs/{answer['job_id']}")
    job = client.wait(answer["job_id"], timeout=60)
    assert job["state"] == "cancelled" and session.engine.record is before
    slow_model.decode_delay = 0.0


def test_a_refine_keeps_the_mesh_and_closed_sessions_take_no_more_work(client):
    sid = client.upload(_example_bytes())[1]["session_id"]
    status, answer = client.json("POST", f"/v1/sessions/{sid}/segment", {"prompts": SHORT, "mesh": True})
    first = client.wait(answer["job_id"])
    record = client.json("GET", f"/v1/jobs/{first['job_id']}/record")[1]
    assert record["objects"][0]["mesh"] is not None
    status, answer = client.json("POST", f"/v1/sessions/{sid}/refine", {"object": 1, "slice": 23,
                                                                        "box": [58, 58, 99, 108]})
    refined = client.wait(answer["job_id"])
    assert refined["state"] == "done", refined
    record = client.json("GET", f"/v1/jobs/{refined['job_id']}/record")[1]
    assert record["objects"][0]["mesh"] is not None and record["objects"][0]["mesh"]["triangles"] > 0
    status, answer = client.json("POST", f"/v1/sessions/{sid}/refine", {"object": 1, "slice": 23, "mesh": False,
                                                                        "box": [58, 58, 99, 108]})
    record = client.json("GET", f"/v1/jobs/{client.wait(answer['job_id'])['job_id']}/record")[1]
    assert record["objects"][0]["mesh"] is None
    # a session closing between finding a job and writing its files: 404, nothing written
    store = client_store(client)
    job, session = store.job(refined["job_id"])
    session.closed = True
    try:
        assert client.request("GET", f"/v1/jobs/{job.job_id}/labels")[0] == 404
        assert client.request("GET", f"/v1/jobs/{job.job_id}/mesh")[0] == 404
        assert not [p for p in session.folder.iterdir() if p.name.startswith(job.job_id)]
    finally:
        session.closed = False
    # a job attached to a session deleted meanwhile is refused; a queued one is cancelled with it
    from medsam3d.server.jobs import Job, NotFoundError

    store.delete(sid)
    with pytest.raises(NotFoundError):
        store.add_job(session, Job(sid, "segment", lambda progress: None))
    assert session.closed and not session.folder.exists()


def test_cancelled_queued_jobs_leave_room_in_the_queue(tmp_path):
    model = SlowThreshold()
    with serving(ServerSettings(max_queue=1, workdir=tmp_path), model) as client:
        sid = client.upload(_example_bytes())[1]["session_id"]
        model.delay = 0.3
        running = client.segment(sid, PROMPTS, wait=False)
        end = time.monotonic() + 30
        while client.json("GET", f"/v1/jobs/{running}")[1]["state"] != "running":
            assert time.monotonic() < end
            time.sleep(0.05)
        queued = client.segment(sid, SHORT, wait=False)
        assert client.json("POST", f"/v1/sessions/{sid}/segment", {"prompts": SHORT})[0] == 429
        assert client.json("DELETE", f"/v1/jobs/{queued}")[1]["state"] == "cancelled"
        again = client.segment(sid, SHORT, wait=False)  # the cancelled one no longer counts
        client.json("DELETE", f"/v1/jobs/{running}")
        model.delay = 0.0
        assert client.wait(again)["state"] == "done"
        assert client.app.state.runner.waiting() == 0


def test_sessions_are_bounded_and_idle_ones_expire_with_their_files(tmp_path):
    settings = ServerSettings(max_sessions=2, session_ttl_s=1.0, sweep_s=0.2, max_queue=1, workdir=tmp_path)
    model = SlowThreshold()
    with serving(settings, model) as client:
        store = client.app.state.store
        data = _example_bytes()
        first = client.upload(data)[1]["session_id"]
        second = client.upload(data)[1]["session_id"]
        status, answer = client.upload(data)
        assert status == 429 and "at most 2 open sessions" in answer["detail"]
        # the queue: one job running, one waiting, the next refused
        model.delay = 0.3
        running = client.segment(first, PROMPTS, wait=False)
        end = time.monotonic() + 30
        while client.json("GET", f"/v1/jobs/{running}")[1]["state"] != "running":
            assert time.monotonic() < end
            time.sleep(0.05)
        client.segment(second, SHORT, wait=False)
        status, answer = client.json("POST", f"/v1/sessions/{second}/segment", {"prompts": SHORT})
        assert status == 429 and "queue" in answer["detail"]
        client.request("DELETE", f"/v1/sessions/{first}")  # cancels its job
        model.delay = 0.0
        assert client.json("GET", f"/v1/jobs/{running}")[0] == 404
        folders = list(store.root.iterdir())
        assert len(folders) == 1
        time.sleep(2.5)  # idle for longer than the TTL: the sweeper closes it
        assert client.json("GET", f"/v1/sessions/{second}")[0] == 404
        assert not folders[0].exists() and store.count() == 0
        assert client.upload(data)[0] == 201
        # without a token, only loopback names are answered (no DNS rebinding)
        status, _, raw = client.request("GET", "/health", headers={"Host": "attacker.example:80"})
        assert status == 400 and b"loopback" in raw
    assert not store.root.exists()  # the server's folder goes with it


# --- the command line -------------------------------------------------------------------------

def _serve_args(argv: list[str]) -> argparse.Namespace:
    from medsam3d.cli.serve import add_serve_arguments

    parser = argparse.ArgumentParser(prog="medsam3d serve")
    add_serve_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("argv, message", [
    (["--host", "0.0.0.0"], "expected --token-file (or --token) when listening beyond loopback"),
    (["--host", "192.168.1.20", "--token", "short"], "at least 16 characters"),
    (["--host", "0.0.0.0", "--token", TOKEN], "expected TLS"),
    (["--host", "::", "--token", TOKEN, "--ssl-keyfile", "key.pem"], "both --ssl-keyfile and --ssl-certfile"),
    (["--token", "   "], "printable characters"),
    (["--token", "t\u00f6ken-0123456789abcdef"], "ASCII"),
])
def test_serve_refuses_to_start_unsafely(argv, message, capsys):
    from medsam3d.cli.serve import _cmd_serve

    assert _cmd_serve(_serve_args(argv)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("medsam3d: error: ")


def test_serve_settings_read_the_token_file_and_allow_a_tls_proxy(tmp_path):
    from medsam3d.cli.serve import settings_from_args

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    settings = settings_from_args(_serve_args(["--host", "0.0.0.0", "--token-file", str(token_file),
                                               "--allow-insecure-http", "--max-sessions", "3", "--cache-mb", "256"]))
    assert settings.token == TOKEN and not settings.loopback and settings.memory_bound_mb() == 768
    assert "token" not in settings.as_dict()
    assert settings_from_args(_serve_args([])).token is None  # loopback: a token is optional


# --- the real model ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_server(litemedsam, tmp_path_factory):
    settings = ServerSettings(token=TOKEN, max_sessions=4, workdir=tmp_path_factory.mktemp("real"))
    with serving(settings, litemedsam) as client:
        yield client


@pytest.mark.slow
def test_the_label_map_equals_the_cli_s(real_server, litemedsam, tmp_path):
    """The server's labels for the example's prompt file are the CLI's (run_case: what `medsam3d segment` runs)."""
    client = real_server
    status, session = client.upload(_example_bytes())
    job = client.segment(session["session_id"], PROMPTS)
    assert job["state"] == "done", job
    served = client.labels(job["job_id"], "nii.gz", tmp_path)
    served_seg = client.labels(job["job_id"], "seg.nrrd", tmp_path)
    reference = m3.run_case(IMAGE, CASE / "prompts.json", model=litemedsam, outputs={"labels": tmp_path / "cli.nii.gz"})
    assert np.array_equal(served.array, reference.labels.array) and served.array.any()
    assert np.array_equal(served_seg.array, reference.labels.array)
    assert served.affine.tolist() == m3.load(tmp_path / "cli.nii.gz").affine.tolist()
    status, record = client.json("GET", f"/v1/jobs/{job['job_id']}/record")
    assert status == 200 and record["objects"][0]["volume_ml"] == reference.objects[0].volume_ml
    assert record["input"]["sha256"] == reference.input["sha256"]
    client.request("DELETE", f"/v1/sessions/{session['session_id']}")


@pytest.mark.slow
def test_a_refine_on_an_encoded_slice_encodes_nothing(real_server):
    client = real_server
    sid = client.upload(_example_bytes())[1]["session_id"]
    first = client.segment(sid, SHORT)
    status, record = client.json("GET", f"/v1/jobs/{first['job_id']}/record")
    before = client.json("GET", f"/v1/sessions/{sid}")[1]["cache"]
    assert before["misses"] > 0
    walked = [k for k in range(20, 27) if k != 23 and k not in record["objects"][0]["interpolated_slices"]]
    status, answer = client.json("POST", f"/v1/sessions/{sid}/refine",
                                 {"object": "sarcoma", "slice": walked[0], "box": [62, 60, 96, 104]})
    assert status == 202
    job = client.wait(answer["job_id"])
    assert job["state"] == "done" and job["kind"] == "refine"
    after = client.json("GET", f"/v1/sessions/{sid}")[1]["cache"]
    assert after["misses"] == before["misses"] and after["hits"] > before["hits"]
    status, refined = client.json("GET", f"/v1/jobs/{answer['job_id']}/record")
    boxes = refined["prompts"]["resolved"][0]["boxes"]
    assert sorted(b["slice"] for b in boxes) == sorted([23, walked[0]])
    client.request("DELETE", f"/v1/sessions/{sid}")


@pytest.mark.slow
def test_two_clients_at_once_get_their_own_results(real_server, tmp_path):
    client = real_server
    asks = {
        "a": {"version": 1, "objects": [{"name": "tumour a", "slice": 23, "box": [57, 57, 100, 109],
                                         "z_range": [21, 25]}]},
        "b": {"version": 1, "objects": [{"name": "tumour b", "slice": 30, "box": [60, 60, 98, 104],
                                         "z_range": [29, 31]}]},
    }
    results: dict[str, tuple] = {}

    def one(key: str) -> None:
        other = Client(client.port, TOKEN)  # its own connection
        sid = other.upload(_example_bytes())[1]["session_id"]
        job = other.segment(sid, asks[key], {"fast": True})
        record = other.json("GET", f"/v1/jobs/{job['job_id']}/record")[1]
        results[key] = (sid, job, record, other.labels(job["job_id"], "nii.gz", tmp_path))

    threads = [threading.Thread(target=one, args=(key,)) for key in asks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert set(results) == {"a", "b"}
    for key, (sid, job, record, labels) in results.items():
        obj = record["objects"][0]
        z0, z1 = asks[key]["objects"][0]["z_range"]
        assert job["state"] == "done" and job["session_id"] == sid
        assert obj["name"] == asks[key]["objects"][0]["name"] and obj["voxels"] == int((labels.array > 0).sum()) > 0
        ks = np.flatnonzero(labels.array.any(axis=(0, 1)))
        assert z0 <= ks.min() and ks.max() <= z1
        client.request("DELETE", f"/v1/sessions/{sid}")
    assert results["a"][0] != results["b"][0]
