"""``tools/fatezero_run.py`` against a fake ComfyUI (stdlib HTTP server + websocket) on 127.0.0.1.

The fake speaks the parts of ComfyUI's API the runner uses, as ComfyUI 0.3.64 does:
``POST /upload/image`` (multipart, renames a different file of the same name to ``name (1).ext``),
``POST /prompt`` (``prompt_id`` or 400 with ``node_errors``), ``GET /history/<id>``, ``GET /view``,
``POST /queue`` / ``/interrupt`` and ``/ws?clientId=``: a websocket whose frames are built and
parsed by websocket-client's own ``ABNF`` / ``frame_buffer`` (it sends progress, a binary preview,
a ping and a fragmented text message, and can close or go quiet). The real server is exercised by
``tests/host/test_runner_host.py``.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import websocket

from repo_scripts import load_script

REPO = Path(__file__).resolve().parent.parent
STYLE_API = REPO / "workflows" / "api" / "style_watercolor.json"
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3: the server's handshake answer


runner = load_script("tools/fatezero_run.py")


# ------------------------------------------------------------------------------------------------
# The server's side of the websocket, framed by websocket-client
# ------------------------------------------------------------------------------------------------

TEXT, CONT, BINARY = websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_CONT, websocket.ABNF.OPCODE_BINARY
CLOSE, PING, PONG = websocket.ABNF.OPCODE_CLOSE, websocket.ABNF.OPCODE_PING, websocket.ABNF.OPCODE_PONG


def server_frame(payload: bytes, opcode: int, fin: bool = True) -> bytes:
    """One frame as a server sends it (unmasked, RFC 6455 section 5.1)."""
    return websocket.ABNF(fin=int(fin), opcode=opcode, mask_value=0, data=payload).format()


def client_frames(rfile):
    """The frames the client sends, as ``(opcode, payload, masked)``, until it closes."""

    def read(n: int) -> bytes:
        data = rfile.read1(n)
        if not data:
            raise ConnectionError("the client went away")
        return data

    frames = websocket.frame_buffer(read, skip_utf8_validation=True)
    while True:
        frame = frames.recv_frame()
        yield frame.opcode, frame.data, bool(frame.mask_value)


# ------------------------------------------------------------------------------------------------
# Fake ComfyUI
# ------------------------------------------------------------------------------------------------


class FakeComfy:
    def __init__(self, websocket: bool = True, close_websocket: bool = False, finish: bool = True):
        self.websocket = websocket
        self.close_websocket = close_websocket  # the server closes the websocket as a run starts
        self.finish = finish  # False: runs never end
        self.uploads: dict[str, bytes] = {}
        self.prompts: list[dict] = []
        self.history: dict[str, dict] = {}
        self.files: dict[tuple[str, str, str], bytes] = {}
        self.refusal: dict | None = None
        self.failure: dict | None = None
        self.fail_only: set[int] = set()  # 1-based prompt numbers that fail (empty: all, when set)
        self.argv: list[str] | None = ["main.py"]  # the command line /system_stats reports (None: none)
        self.extra_outputs: list[str] = []  # names of more output files each run reports
        self.queue_calls: list = []
        self.client_frames: list[tuple[int, bytes, bool]] = []
        self.ws_clients: dict[str, tuple] = {}
        self.ws_query: list[str] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status: int, body, content_type="application/json"):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                if url.path == "/ws":
                    if not fake.websocket:
                        return self.reply(404, {"error": "no websocket here"})
                    return self.websocket(query.get("clientId", ""))
                if url.path == "/system_stats":
                    system = {"comfyui_version": "0.3.64"}
                    if fake.argv is not None:
                        system["argv"] = fake.argv
                    return self.reply(200, {"system": system, "devices": []})
                if url.path.startswith("/history/"):
                    prompt_id = url.path.rsplit("/", 1)[1]
                    entry = fake.history.get(prompt_id)
                    return self.reply(200, {prompt_id: entry} if entry else {})
                if url.path == "/view":
                    key = (query.get("filename"), query.get("subfolder", ""), query.get("type", "output"))
                    if key not in fake.files:
                        return self.reply(404, {"error": "not found"})
                    return self.reply(200, fake.files[key], "application/octet-stream")
                self.reply(404, {"error": "unknown"})

            def websocket(self, client_id: str):
                fake.ws_query.append(client_id)
                key = self.headers["Sec-WebSocket-Key"]
                accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
                lock = threading.Lock()
                fake.ws_clients[client_id] = (self.wfile, lock)
                with lock:
                    self.send_response(101, "Switching Protocols")
                    self.send_header("Upgrade", "websocket")
                    self.send_header("Connection", "Upgrade")
                    self.send_header("Sec-WebSocket-Accept", accept)
                    self.end_headers()
                    self.wfile.write(server_frame(json.dumps(
                        {"type": "status", "data": {"sid": client_id}}).encode(), TEXT))
                    self.wfile.flush()
                try:
                    for frame in client_frames(self.rfile):
                        fake.client_frames.append(frame)
                        if frame[0] == CLOSE:
                            with lock:  # the closing handshake: answer with a close frame
                                self.wfile.write(server_frame(frame[1][:2], CLOSE))
                                self.wfile.flush()
                            return
                except (websocket.WebSocketException, OSError):
                    return

            def do_POST(self):
                path = urllib.parse.urlsplit(self.path).path
                if path == "/upload/image":
                    return self.reply(200, fake.upload(self.headers["Content-Type"], self.body()))
                if path == "/prompt":
                    body = json.loads(self.body())
                    if fake.refusal is not None:
                        return self.reply(400, fake.refusal)
                    with fake.lock:
                        fake.prompts.append(body)
                        number = len(fake.prompts)
                    prompt_id = f"prompt-{number}"
                    self.reply(200, {"prompt_id": prompt_id, "number": number, "node_errors": {}})
                    threading.Thread(target=fake.play, args=(prompt_id, number, body), daemon=True).start()
                    return
                if path in ("/queue", "/interrupt"):
                    fake.queue_calls.append((path, json.loads(self.body() or b"{}")))
                    return self.reply(200, {})
                self.reply(404, {"error": "unknown"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    # -------------------------------------------------------------- behaviour
    def upload(self, content_type: str, body: bytes) -> dict:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
        fields, name, data = {}, None, None
        for part in message.iter_parts():
            field = part.get_param("name", header="content-disposition")
            if part.get_filename():
                name, data = part.get_filename(), part.get_payload(decode=True)
            else:
                fields[field] = part.get_content().strip()
        assert fields.get("type") == "input" and name and data is not None
        stem, dot, ext = name.rpartition(".")
        candidate, i = name, 1
        while candidate in self.uploads and self.uploads[candidate] != data:
            candidate, i = f"{stem} ({i}).{ext}", i + 1
        self.uploads[candidate] = data
        return {"name": candidate, "subfolder": "", "type": "input"}

    def send(self, client_id: str, frame: bytes) -> None:
        wfile, lock = self.ws_clients[client_id]
        with lock:
            wfile.write(frame)
            wfile.flush()

    def send_json(self, client_id: str, kind: str, data: dict, fragmented: bool = False) -> None:
        payload = json.dumps({"type": kind, "data": data}).encode()
        if fragmented:
            third = len(payload) // 3
            self.send(client_id, server_frame(payload[:third], TEXT, fin=False))
            self.send(client_id, server_frame(b"", PING))  # a control frame between fragments is allowed
            self.send(client_id, server_frame(payload[third:2 * third], CONT, fin=False))
            self.send(client_id, server_frame(payload[2 * third:], CONT, fin=True))
        else:
            self.send(client_id, server_frame(payload, TEXT))

    def play(self, prompt_id: str, number: int, body: dict) -> None:
        """What ComfyUI sends while it runs a prompt: progress, previews, then success or error."""
        client = body.get("client_id")
        ws = client in self.ws_clients
        graph = body["prompt"]
        sample = next(i for i, n in graph.items() if n["class_type"] == "FateZero_Sample")
        video = graph[next(i for i, n in graph.items() if n["class_type"] == "FateZero_LoadVideoFrames")]["inputs"]["video"]
        stem = video.rsplit(".", 1)[0].replace(" ", "_")
        if ws:
            self.send_json(client, "execution_start", {"prompt_id": prompt_id})
            if self.close_websocket:
                self.send(client, server_frame(b"\x03\xe9", CLOSE))  # 1001: going away
                ws = False
        if ws:
            self.send_json(client, "executing", {"node": sample, "prompt_id": prompt_id})
            self.send(client, server_frame(b"\x00\x00\x00\x01" + b"\x89PNG" + b"\0" * 70_000, BINARY))
            self.send(client, server_frame(b"are you there", PING))
            for value in range(1, 4):
                self.send_json(client, "progress", {"value": value, "max": 3, "prompt_id": prompt_id,
                                                    "node": sample}, fragmented=value == 2)
        if not self.finish:
            return
        failing = self.failure is not None and (not self.fail_only or number in self.fail_only)
        if failing:
            data = dict(self.failure, prompt_id=prompt_id)
            self.history[prompt_id] = {"outputs": {}, "status": {
                "status_str": "error", "completed": False, "messages": [["execution_error", data]]}}
            if ws:
                self.send_json(client, "execution_error", data)
            return
        video_name, mask_name = f"{stem}_00001_.mp4", f"{stem}_mask_00001_.png"
        self.files[(video_name, "fatezero", "output")] = b"VIDEO:" + video.encode()
        self.files[(mask_name, "", "temp")] = b"PNG:" + video.encode()
        self.history[prompt_id] = {
            "outputs": {
                "10": {"images": [{"filename": video_name, "subfolder": "fatezero", "type": "output"}],
                       "animated": [True]},
                "11": {"images": [{"filename": mask_name, "subfolder": "", "type": "temp"}]},
            },
            "status": {"status_str": "success", "completed": True, "messages": []},
        }
        for name in self.extra_outputs:
            self.files[(name, "", "output")] = b"EXTRA:" + name.encode()
            self.history[prompt_id]["outputs"].setdefault("12", {"images": []})["images"].append(
                {"filename": name, "subfolder": "", "type": "output"})
        if ws:
            self.send_json(client, "executed", {"node": "10", "prompt_id": prompt_id, "output": {}})
            self.send_json(client, "execution_success", {"prompt_id": prompt_id})
            self.send_json(client, "executing", {"node": None, "prompt_id": prompt_id})

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    with FakeComfy() as server:
        yield server


def write_video_file(folder: Path, name: str, content: bytes | None = None) -> Path:
    path = folder / name
    path.write_bytes(content if content is not None else f"not really a video: {name}".encode())
    return path


def run(argv: list[str]) -> tuple[int, str]:
    stream = io.StringIO()
    code = runner.main([str(a) for a in argv], stream=stream)
    return code, stream.getvalue()


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------


def test_one_clip_is_uploaded_edited_and_downloaded(fake, tmp_path, capsys):
    clip = write_video_file(tmp_path, "jeep.mp4")
    out = tmp_path / "out"
    code, err = run([STYLE_API, "--video", clip, "--server", fake.address, "--out", out,
                     "--source", "a red bus", "--target", "a yellow bus", "--steps", 3, "--frames", 4])
    assert code == 0, err
    assert fake.uploads == {"jeep.mp4": clip.read_bytes()}
    body = fake.prompts[0]
    assert body["client_id"] == fake.ws_query[0]  # progress reaches this client only
    graph = body["prompt"]
    shipped = json.loads(STYLE_API.read_text())
    assert graph["2"]["inputs"]["video"] == "jeep.mp4" and graph["2"]["inputs"]["frame_load_cap"] == 4
    assert graph["13"]["class_type"] == "FateZero_SourcePrompt"
    assert graph["13"]["inputs"]["source_prompt"] == "a red bus"
    assert graph["3"]["inputs"]["target_prompt"] == "a yellow bus"
    assert graph["5"]["inputs"]["steps"] == 3
    assert {k: v for k, v in graph["3"]["inputs"].items() if "prompt" not in k} == {
        k: v for k, v in shipped["3"]["inputs"].items() if "prompt" not in k}
    assert (out / "jeep_00001_.mp4").read_bytes() == b"VIDEO:jeep.mp4"
    assert (out / "previews" / "jeep_mask_00001_.png").read_bytes() == b"PNG:jeep.mp4"
    assert "FateZero Sample (#7) [##############################] 3/3" in err
    assert "0/3" not in err and "1/3" in err  # one line per step change when not on a terminal
    assert "done: 2 file(s)" in err
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted([str(out / "jeep_00001_.mp4"), str(out / "previews" / "jeep_mask_00001_.png")])
    assert (PONG, b"are you there") in [f[:2] for f in fake.client_frames]
    assert fake.client_frames[-1][0] == CLOSE  # the runner closes the websocket when it is done


def test_a_folder_queues_every_video_in_it(fake, tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    for name in ("b.mov", "a.mp4", "clip10.mp4", "clip9.webm", "notes.txt", ".hidden.mp4"):
        write_video_file(folder, name)
    (folder / "sub.mp4").mkdir()
    out = tmp_path / "out"
    code, err = run([STYLE_API, "--video", folder, "--server", fake.address, "--out", out])
    assert code == 0, err
    videos = [p["prompt"]["2"]["inputs"]["video"] for p in fake.prompts]
    assert videos == ["a.mp4", "b.mov", "clip9.webm", "clip10.mp4"]  # natural order
    for stem in ("a", "b", "clip9", "clip10"):
        assert (out / stem / f"{stem}_00001_.mp4").exists()
        assert (out / stem / "previews" / f"{stem}_mask_00001_.png").exists()
    assert len({p["client_id"] for p in fake.prompts}) == 1


def test_an_upload_renamed_by_the_server_is_what_the_loader_gets(fake, tmp_path):
    fake.uploads["jeep.mp4"] = b"someone else's clip"
    clip = write_video_file(tmp_path, "jeep.mp4")
    code, err = run([STYLE_API, "--video", clip, "--server", fake.address, "--out", tmp_path / "o"])
    assert code == 0, err
    assert fake.prompts[0]["prompt"]["2"]["inputs"]["video"] == "jeep (1).mp4"


def test_set_overrides_any_input_by_id_or_class(fake, tmp_path):
    clip = write_video_file(tmp_path, "jeep.mp4")
    code, err = run([STYLE_API, "--video", clip, "--server", fake.address, "--out", tmp_path / "o",
                     "--set", "CheckpointLoaderSimple.ckpt_name=tiny.ckpt", "--set", "7.cfg=6.5",
                     "--set", "FateZero_EditSettings.local_latent_blend=true",
                     "--set", "3.reweight=watercolor: 5"])
    assert code == 0, err
    graph = fake.prompts[0]["prompt"]
    assert graph["1"]["inputs"]["ckpt_name"] == "tiny.ckpt"
    assert graph["7"]["inputs"]["cfg"] == 6.5
    assert graph["3"]["inputs"]["local_latent_blend"] is True
    assert graph["3"]["inputs"]["reweight"] == "watercolor: 5"


# ------------------------------------------------------------------------------------------------
# Failures carry the server's words
# ------------------------------------------------------------------------------------------------


def test_a_refused_workflow_exits_1_with_the_node_errors(fake, tmp_path):
    fake.refusal = {
        "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                  "details": "", "extra_info": {}},
        "node_errors": {"1": {"class_type": "CheckpointLoaderSimple", "dependent_outputs": ["10"], "errors": [
            {"type": "value_not_in_list", "message": "Value not in list",
             "details": "ckpt_name: 'v1-5-pruned-emaonly.safetensors' not in []", "extra_info": {}}]}},
    }
    clip = write_video_file(tmp_path, "jeep.mp4")
    code, err = run([STYLE_API, "--video", clip, "--server", fake.address, "--out", tmp_path / "o"])
    assert code == 1
    assert "ComfyUI refused the workflow" in err and "Prompt outputs failed validation" in err
    assert ("node 1 (CheckpointLoaderSimple): Value not in list: ckpt_name: "
            "'v1-5-pruned-emaonly.safetensors' not in []") in err


def test_an_execution_error_exits_1_with_the_exception(fake, tmp_path):
    fake.failure = {"node_id": "3", "node_type": "FateZero_EditSettings",
                    "exception_type": "comfyui_fatezero.nodes.user_errors.FateZeroNodeError",
                    "exception_message": "blend word 'car' is not in the prompt 'a silver jeep'",
                    "traceback": ["  File \"blend_settings.py\", line 1\n"]}
    clip = write_video_file(tmp_path, "jeep.mp4")
    code, err = run([STYLE_API, "--video", clip, "--server", fake.address, "--out", tmp_path / "o"])
    assert code == 1
    assert ("node 3 (FateZero_EditSettings): FateZeroNodeError: blend word 'car' is not in "
            "the prompt 'a silver jeep'") in err
    assert "blend_settings.py" not in err
    code, err = run([STYLE_API, "--video", clip, "--server", fake.address, "--out", tmp_path / "o", "--verbose"])
    assert code == 1 and "blend_settings.py" in err


def test_one_failing_clip_of_a_folder_does_not_stop_the_others(fake, tmp_path):
    fake.failure = {"node_id": "2", "node_type": "FateZero_LoadVideoFrames",
                    "exception_type": "FateZeroNodeError", "exception_message": "No frames left to load"}
    fake.fail_only = {1}
    folder = tmp_path / "clips"
    folder.mkdir()
    write_video_file(folder, "a.mp4")
    write_video_file(folder, "b.mp4")
    code, err = run([STYLE_API, "--video", folder, "--server", fake.address, "--out", tmp_path / "o"])
    assert code == 1
    assert "a.mp4 | ComfyUI could not run the workflow: node 2 (FateZero_LoadVideoFrames)" in err
    assert (tmp_path / "o" / "b" / "b_00001_.mp4").exists()


def test_local_problems_exit_2_before_anything_is_sent(fake, tmp_path):
    clip = write_video_file(tmp_path, "jeep.mp4")
    ui = REPO / "workflows" / "style_watercolor.json"
    code, err = run([ui, "--video", clip, "--server", fake.address])
    assert code == 2 and "UI workflow" in err
    code, err = run([STYLE_API, "--video", tmp_path / "missing.mp4", "--server", fake.address])
    assert code == 2 and "does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run([STYLE_API, "--video", empty, "--server", fake.address])
    assert code == 2 and "no video files" in err
    code, err = run([STYLE_API, "--video", clip, "--server", fake.address, "--set", "nonsense"])
    assert code == 2 and "NODE.INPUT=VALUE" in err
    code, err = run([STYLE_API, "--video", clip, "--server", fake.address, "--set", "KSampler.cfg=1"])
    assert code == 2 and "no node" in err
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"1": {"class_type": "CheckpointLoaderSimple", "inputs": {}}}))
    code, err = run([broken, "--video", clip, "--server", fake.address])
    assert code == 2 and "FateZero_LoadVideoFrames" in err
    assert not fake.uploads and not fake.prompts


def test_an_unreachable_server_is_reported(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clip = write_video_file(tmp_path, "jeep.mp4")
    code, err = run([STYLE_API, "--video", clip, "--server", f"127.0.0.1:{port}"])
    assert code == 1 and "cannot reach ComfyUI at http://127.0.0.1:" in err


def test_bad_numbers_are_refused_by_the_argument_parser(tmp_path):
    with pytest.raises(SystemExit) as info:
        runner.parse_args([str(STYLE_API), "--video", "x.mp4", "--steps", "0"])
    assert info.value.code == 2


# ------------------------------------------------------------------------------------------------
# The websocket: closed, quiet, or its client missing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, said", [
    ({"websocket": False}, "no websocket (Handshake status 404"),
    ({"close_websocket": True}, "jeep.mp4 | websocket lost (the server closed it); polling instead"),
])
def test_progress_falls_back_to_polling_without_a_websocket(tmp_path, monkeypatch, options, said):
    monkeypatch.setattr(runner, "POLL_EVERY_S", 0.2)
    with FakeComfy(**options) as fake:
        clip = write_video_file(tmp_path, "jeep.mp4")
        code, err = run([STYLE_API, "--video", clip, "--server", fake.address, "--out", tmp_path / "o"])
    assert code == 0, err
    assert said in err
    assert (tmp_path / "o" / "jeep_00001_.mp4").exists()
    assert [op for op, _, _ in fake.client_frames[-1:]] in ([], [CLOSE])  # a server's close is answered


def test_a_quiet_websocket_waits_until_the_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "POLL_EVERY_S", 0.2)
    with FakeComfy(finish=False) as fake:
        clip = write_video_file(tmp_path, "jeep.mp4")
        started = time.monotonic()
        code, err = run([STYLE_API, "--video", clip, "--server", fake.address, "--out", tmp_path / "o",
                         "--timeout", "1.5"])
    assert code == 1
    assert "jeep.mp4: no result within 1.5 s (prompt prompt-1)" in err
    assert "websocket lost" not in err  # silence is waited out, not taken for a broken connection
    assert 1.5 <= time.monotonic() - started < 1.5 + runner.RECV_WAIT_S + 5


def test_a_missing_websocket_client_says_how_to_install_it(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "websocket", None)
    code, err = run([STYLE_API, "--video", write_video_file(tmp_path, "jeep.mp4"), "--server", fake.address])
    assert code == 2
    assert "websocket-client package is missing" in err and "-m pip install websocket-client" in err
    assert not fake.uploads and not fake.prompts


def test_progress_bar_redraws_in_place_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = runner.ProgressBar("clip.mp4", stream, width=10)
    for value in range(0, 5):
        bar.update("FateZero Sample (#7)", value, 4)
    bar.message("done")
    text = stream.getvalue()
    assert text.count("\r") == 5 and text.count("\n") == 2  # redrawn in place, then closed
    assert "\rclip.mp4 | FateZero Sample (#7) [##########] 4/4" in text
    assert text.endswith("clip.mp4 | done\n")


# ------------------------------------------------------------------------------------------------
# Outputs named after the clip
# ------------------------------------------------------------------------------------------------


def test_saved_files_are_named_after_the_clip_and_the_workflow(fake, tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    write_video_file(folder, "bear.mp4")
    write_video_file(folder, "my jeep.mov")
    code, err = run([STYLE_API, "--video", folder, "--server", fake.address, "--out", tmp_path / "o"])
    assert code == 0, err
    prefixes = [p["prompt"]["10"]["inputs"]["filename_prefix"] for p in fake.prompts]
    assert prefixes == ["fatezero/bear_style_watercolor", "fatezero/my jeep_style_watercolor"]


def test_naming_rule_for_several_or_folderless_save_nodes(tmp_path):
    graph = {"1": {"class_type": "SaveVideo", "inputs": {"filename_prefix": "edits/a/jeep"}},
             "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "jeep_frames"}},
             "3": {"class_type": "PreviewImage", "inputs": {}}}
    runner.name_outputs(graph, "bear", "attribute_edit")
    assert graph["1"]["inputs"]["filename_prefix"] == "edits/a/bear_attribute_edit_1"
    assert graph["2"]["inputs"]["filename_prefix"] == "bear_attribute_edit_2"
    assert graph["3"]["inputs"] == {}


def test_set_still_overrides_the_prefix(fake, tmp_path):
    clip = write_video_file(tmp_path, "jeep.mp4")
    code, err = run([STYLE_API, "--video", clip, "--server", fake.address, "--out", tmp_path / "o",
                     "--set", "SaveVideo.filename_prefix=mine/fixed"])
    assert code == 0, err
    assert fake.prompts[0]["prompt"]["10"]["inputs"]["filename_prefix"] == "mine/fixed"


# ------------------------------------------------------------------------------------------------
# --comfyui: a server started for the run (a stand-in main.py here; the real one in the host tier)
# ------------------------------------------------------------------------------------------------

STAND_IN_MAIN = """
import json, os, signal, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer

args = sys.argv[1:]
if os.environ.get("STAND_IN_FAIL"):
    print("cannot start: no such module 'torch'", flush=True)
    sys.exit(3)
with open("started.json", "w") as f:
    json.dump({"argv": args, "python": sys.executable, "pid": os.getpid()}, f)
with open(f"started_{args[args.index('--port') + 1]}.json", "w") as f:  # one per server when several start
    json.dump({"pid": os.getpid(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}, f)


def on_signal(signum, frame):
    with open("signals.txt", "a") as f:
        f.write(signal.Signals(signum).name + "\\n")
    if signum == signal.SIGTERM:  # as in ComfyUI, which has no SIGTERM handler: gone, no clean-up
        os._exit(1)
    if not os.environ.get("STAND_IN_IGNORE_INT"):
        raise KeyboardInterrupt


signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGTERM, on_signal)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"{}" if self.path == "/system_stats" else b""
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # an upload that takes its time, so the runner can be signalled meanwhile
        open("uploading", "w").close()
        time.sleep(120)

    def log_message(self, *a):
        pass


time.sleep(float(os.environ.get("STAND_IN_DELAY", "0")))
try:
    HTTPServer((args[args.index("--listen") + 1], int(args[args.index("--port") + 1])), Handler).serve_forever()
except KeyboardInterrupt:  # ComfyUI's main.py: "Stopped server", then it empties its temp folder
    open("cleaned_up", "w").close()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_stand_in(folder: Path) -> Path:
    """``folder`` with a main.py that answers /system_stats, and a venv/bin/python (this Python)."""
    (folder / "venv" / "bin").mkdir(parents=True)
    (folder / "main.py").write_text(STAND_IN_MAIN)
    (folder / "venv" / "bin" / "python").symlink_to(sys.executable)
    return folder


@pytest.fixture
def stand_in(tmp_path):
    return make_stand_in(tmp_path / "ComfyUI")


def alive(pid: int) -> bool:
    """True while process ``pid`` runs (an exited one whose parent has not reaped it is gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def signals_received(folder: Path) -> list[str]:
    path = folder / "signals.txt"
    return path.read_text().split() if path.exists() else []


def test_comfyui_python_prefers_the_folders_own_environment(tmp_path):
    folder = tmp_path / "ComfyUI"
    folder.mkdir()
    assert runner.comfyui_python(folder) == sys.executable
    for env in (".venv", "venv"):  # venv wins over .venv when both exist
        (folder / env / "bin").mkdir(parents=True)
        (folder / env / "bin" / "python").symlink_to(sys.executable)
        assert runner.comfyui_python(folder) == str(folder / env / "bin" / "python")


def test_started_server_gets_the_address_cpu_and_extra_args_and_is_stopped_on_ctrl_c(stand_in, tmp_path, monkeypatch):
    def interrupted_upload(self, path):
        assert json.loads((stand_in / "started.json").read_text())  # the server is up by now
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.Client, "upload", interrupted_upload)
    port = free_port()
    clip = write_video_file(tmp_path, "jeep.mp4")
    code, err = run([STYLE_API, "--video", clip, "--server", f"127.0.0.1:{port}", "--comfyui", stand_in,
                     "--cpu", "--comfyui-args", "--lowvram --preview-method none"])
    assert code == 130, err
    started = json.loads((stand_in / "started.json").read_text())
    assert started["python"] == str(stand_in / "venv" / "bin" / "python")
    assert started["argv"] == ["--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch", "--cpu",
                               "--lowvram", "--preview-method", "none"]
    assert not alive(started["pid"])
    assert signals_received(stand_in) == ["SIGINT"] and (stand_in / "cleaned_up").exists()
    assert "starting ComfyUI" in err and "stopped the ComfyUI it started" in err
    assert "the server's log is in" in err


def test_started_server_is_stopped_after_an_error(stand_in, tmp_path, monkeypatch):
    def refused(self, path):
        raise runner.RunnerError("uploading failed (500)")

    monkeypatch.setattr(runner.Client, "upload", refused)
    monkeypatch.setenv("STAND_IN_DELAY", "1.0")  # the runner waits for it to answer
    code, err = run([STYLE_API, "--video", write_video_file(tmp_path, "jeep.mp4"), "--server",
                     f"127.0.0.1:{free_port()}", "--comfyui", stand_in])
    assert code == 1 and "uploading failed" in err
    started = json.loads((stand_in / "started.json").read_text())
    assert "--cpu" not in started["argv"] and not alive(started["pid"])


def test_a_server_that_does_not_start_is_reported_with_its_log(stand_in, tmp_path, monkeypatch):
    monkeypatch.setenv("STAND_IN_FAIL", "1")
    code, err = run([STYLE_API, "--video", write_video_file(tmp_path, "jeep.mp4"), "--server",
                     f"127.0.0.1:{free_port()}", "--comfyui", stand_in])
    assert code == 2
    assert "ComfyUI exited with code 3 while starting" in err and "no such module 'torch'" in err


def test_a_running_server_is_used_and_left_running(fake, stand_in, tmp_path):
    fake.argv = ["main.py", "--listen", "127.0.0.1", "--cpu", "--preview-method=auto", "--lowvram"]
    clip = write_video_file(tmp_path, "jeep.mp4")
    for asked in ([], ["--cpu"], ["--cpu", "--comfyui-args", "--lowvram --preview-method auto"]):
        code, err = run([STYLE_API, "--video", clip, "--server", fake.address, "--out", tmp_path / "o",
                         "--comfyui", stand_in, *asked])
        assert code == 0, err
        assert "using the ComfyUI already running" in err and "left running" in err
    assert not (stand_in / "started.json").exists()
    assert len(fake.prompts) == 3


@pytest.mark.parametrize("argv, said", [
    (["main.py", "--listen", "127.0.0.1", "--lowvram"], "without --cpu --preview-method none"),
    (["main.py", "--cpu", "--preview-method", "auto"], "without --preview-method none"),
    (None, "does not report its options"),
])
def test_a_running_server_without_the_asked_options_is_refused(fake, stand_in, tmp_path, argv, said):
    """One left by a killed run, or started by hand: --cpu/--comfyui-args cannot apply to it."""
    fake.argv = argv
    code, err = run([STYLE_API, "--video", write_video_file(tmp_path, "jeep.mp4"), "--server", fake.address,
                     "--out", tmp_path / "o", "--comfyui", stand_in, "--cpu", "--comfyui-args", "--preview-method none"])
    assert code == 2
    assert err.startswith("fatezero_run: a ComfyUI this run did not start is running at ")
    assert said in err and err.count("\n") == 1  # one line
    assert not fake.uploads and not fake.prompts and not (stand_in / "started.json").exists()


def test_a_server_that_ignores_ctrl_c_is_killed_after_a_while(stand_in, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "STOP_WAIT_S", 1.0)
    monkeypatch.setenv("STAND_IN_IGNORE_INT", "1")
    monkeypatch.setattr(runner.Client, "upload", lambda self, path: (_ for _ in ()).throw(KeyboardInterrupt))
    code, err = run([STYLE_API, "--video", write_video_file(tmp_path, "jeep.mp4"), "--server",
                     f"127.0.0.1:{free_port()}", "--comfyui", stand_in])
    assert code == 130, err
    started = json.loads((stand_in / "started.json").read_text())
    assert not alive(started["pid"])
    assert signals_received(stand_in) == ["SIGINT"]  # then SIGKILL, which no process sees
    assert "killed the ComfyUI it started (it was still running 1 s after Ctrl-C)" in err


def start_runner_uploading_to(folder: Path, tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """The runner as a process with ``--comfyui folder``, stopped in its upload; with the
    started server's pid."""
    cmd = [sys.executable, str(REPO / "tools" / "fatezero_run.py"), str(STYLE_API),
           "--video", str(write_video_file(tmp_path, "jeep.mp4")), "--server", f"127.0.0.1:{free_port()}",
           "--comfyui", str(folder), "--out", str(tmp_path / "o")]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (folder / "uploading").exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "the runner never started uploading"
        time.sleep(0.1)
    return process, json.loads((folder / "started.json").read_text())["pid"]


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this system")
def test_a_closed_terminal_stops_the_started_server_with_sigint(stand_in, tmp_path):
    process, pid = start_runner_uploading_to(stand_in, tmp_path)
    try:
        process.send_signal(signal.SIGHUP)
        err = process.communicate(timeout=60)[1]
        assert process.returncode == 130, err
        assert wait_gone(pid)
        assert signals_received(stand_in) == ["SIGINT"] and (stand_in / "cleaned_up").exists()
        assert "stopped the ComfyUI it started" in err
    finally:
        process.kill()
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_a_killed_runner_still_stops_the_started_server_with_sigint(stand_in, tmp_path):
    process, pid = start_runner_uploading_to(stand_in, tmp_path)
    try:
        process.kill()  # SIGKILL: the runner runs no clean-up at all
        process.communicate(timeout=60)
        assert wait_gone(pid)
        assert signals_received(stand_in) == ["SIGINT"] and (stand_in / "cleaned_up").exists()
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_comfyui_options_are_checked(tmp_path, stand_in):
    clip = write_video_file(tmp_path, "jeep.mp4")
    with pytest.raises(SystemExit):
        runner.parse_args([str(STYLE_API), "--video", str(clip), "--cpu"])
    code, err = run([STYLE_API, "--video", clip, "--comfyui", tmp_path, "--server", f"127.0.0.1:{free_port()}"])
    assert code == 2
    assert err == (f"fatezero_run: --comfyui: {tmp_path} is not a ComfyUI folder (it has no main.py); "
                   f"did you mean {stand_in}?\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run([STYLE_API, "--video", clip, "--comfyui", empty, "--server", f"127.0.0.1:{free_port()}"])
    assert code == 2 and err == (f"fatezero_run: --comfyui: {empty} is not a ComfyUI folder (it has no main.py); "
                                 "give the folder that holds ComfyUI's main.py\n")
    code, err = run([STYLE_API, "--video", clip, "--comfyui", tmp_path / "nope", "--server", f"127.0.0.1:{free_port()}"])
    assert code == 2 and err == (f"fatezero_run: --comfyui: there is no folder {tmp_path / 'nope'}; "
                                 "give the folder that holds ComfyUI's main.py\n")
    code, err = run([STYLE_API, "--video", clip, "--comfyui", stand_in, "--server", "192.0.2.1:8188"])
    assert code == 2 and "starts ComfyUI on this machine" in err


@pytest.mark.parametrize("typed", ["Comfy UI", "./apps/../Comfy UI", "~/Comfy UI"])
def test_comfyui_folder_as_a_user_types_it(tmp_path, monkeypatch, typed):
    """From the folder that holds ComfyUI: relative, with '..', with '~', with a space."""
    folder = make_stand_in(tmp_path / "Comfy UI")
    (tmp_path / "apps").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(runner.Client, "upload", lambda self, path: (_ for _ in ()).throw(KeyboardInterrupt))
    code, err = run([STYLE_API, "--video", write_video_file(tmp_path, "jeep.mp4"), "--server",
                     f"127.0.0.1:{free_port()}", "--comfyui", typed])
    assert code == 130, err
    started = json.loads((folder / "started.json").read_text())
    assert started["python"] == str(folder / "venv" / "bin" / "python")
    assert f"(in {folder}; log" in err and not alive(started["pid"])


# ------------------------------------------------------------------------------------------------
# Downloads
# ------------------------------------------------------------------------------------------------


def test_downloads_never_overwrite_a_file_in_out(fake, tmp_path, capsys):
    clip = write_video_file(tmp_path, "jeep.mp4")
    out = tmp_path / "out"
    out.mkdir()
    (out / "jeep_00001_.mp4").write_bytes(b"my own edit")
    (out / "jeep_00001__1.mp4").mkdir()  # a folder takes a name too
    code, err = run([STYLE_API, "--video", clip, "--server", fake.address, "--out", out])
    assert code == 0, err
    assert (out / "jeep_00001_.mp4").read_bytes() == b"my own edit"
    assert (out / "jeep_00001__2.mp4").read_bytes() == b"VIDEO:jeep.mp4"
    assert f"{out / 'jeep_00001_.mp4'} already exists: saved as jeep_00001__2.mp4" in err
    assert str(out / "jeep_00001__2.mp4") in capsys.readouterr().out.split("\n")

    code, err = run([STYLE_API, "--video", clip, "--server", fake.address, "--out", out])  # the same again
    assert code == 0, err
    assert (out / "jeep_00001__3.mp4").read_bytes() == b"VIDEO:jeep.mp4"
    assert (out / "previews" / "jeep_mask_00001_.png").read_bytes() == b"PNG:jeep.mp4"
    assert (out / "previews" / "jeep_mask_00001__1.png").read_bytes() == b"PNG:jeep.mp4"


def test_output_names_that_are_not_plain_file_names_are_refused(fake, tmp_path):
    fake.extra_outputs = ["..", ".", "sub/x.mp4", "..\\x.mp4", "ok.png"]
    out = tmp_path / "nested" / "out"
    code, err = run([STYLE_API, "--video", write_video_file(tmp_path, "jeep.mp4"), "--server", fake.address,
                     "--out", out])
    assert code == 1
    for name in ("..", ".", "sub/x.mp4", "..\\x.mp4"):
        assert f"the server named an output file {name!r}, which is not a plain file name; it was not saved" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["jeep_00001_.mp4", "ok.png", "previews"]
    assert sorted(p.name for p in (tmp_path / "nested").iterdir()) == ["out"]


def test_frames_above_the_class_batch_raise_it_for_the_training_workflow():
    """shape_edit_train makes its class images as a batch of 16; each class step of the trainer
    needs as many as the clip has frames, so --frames 24 makes 48 (and says so); --frames 8 keeps 16."""
    graph = json.loads((REPO / "workflows" / "api" / "shape_edit_train.json").read_text())
    (empty,) = runner.class_image_batches(graph)
    assert graph[empty]["class_type"] == "EmptyLatentImage" and graph[empty]["inputs"]["batch_size"] == 16
    for frames, batch in ((8, 16), (24, 48)):
        args = runner.parse_args([str(REPO / "workflows" / "api" / "shape_edit_train.json"), "--video", "x.mp4",
                                  "--frames", str(frames)])
        said = io.StringIO()
        prepared = runner.prepare(graph, "x.mp4", args, stream=said)
        assert prepared[empty]["inputs"]["batch_size"] == batch
        assert ("now a batch of 48" in said.getvalue()) == (frames == 24)
    assert graph[empty]["inputs"]["batch_size"] == 16  # the loaded workflow itself is not changed


# ------------------------------------------------------------------------------------------------
# Several servers
# ------------------------------------------------------------------------------------------------


def clip_folder(tmp_path: Path, count: int = 4) -> Path:
    folder = tmp_path / "clips"
    folder.mkdir()
    for k in range(count):
        write_video_file(folder, f"clip_{k}.mp4")
    return folder


def test_a_folder_is_spread_over_two_servers(tmp_path, capsys):
    """One job in flight per server: both servers run clips, each clip is uploaded only to the
    server that runs it, and the results are named as with one server."""
    with FakeComfy() as one, FakeComfy() as two:
        out = tmp_path / "out"
        code, err = run([STYLE_API, "--video", clip_folder(tmp_path), "--server", one.address,
                         "--server", two.address, "--out", out])
        assert code == 0, err
        ran = {fake.address: [p["prompt"]["2"]["inputs"]["video"] for p in fake.prompts] for fake in (one, two)}
        assert all(ran.values()), ran
        assert sorted(ran[one.address] + ran[two.address]) == [f"clip_{k}.mp4" for k in range(4)]
        for fake in (one, two):
            assert sorted(fake.uploads) == sorted(ran[fake.address])
        for k in range(4):
            assert (out / f"clip_{k}" / f"clip_{k}_00001_.mp4").read_bytes() == f"VIDEO:clip_{k}.mp4".encode()
        assert f"clip_0.mp4 @ {one.address} | " in err or f"clip_0.mp4 @ {two.address} | " in err
        assert f"{one.address} ran {len(ran[one.address])} job(s)" in err
        printed = capsys.readouterr().out.split()
        assert len([p for p in printed if p.endswith(".mp4")]) == 4


def test_a_job_that_fails_on_one_server_runs_on_the_other(tmp_path):
    with FakeComfy() as good, FakeComfy() as bad:
        bad.failure = {"node_id": "7", "node_type": "FateZero_Sample", "exception_type": "torch.OutOfMemoryError",
                       "exception_message": "CUDA out of memory"}
        out = tmp_path / "out"
        code, err = run([STYLE_API, "--video", clip_folder(tmp_path, 2), "--server", bad.address,
                         "--server", good.address, "--out", out])
        assert code == 0, err
        assert "CUDA out of memory" in err and "it goes to another server" in err
        assert (out / "clip_0" / "clip_0_00001_.mp4").exists() and (out / "clip_1" / "clip_1_00001_.mp4").exists()


def test_an_input_error_is_not_retried_elsewhere(tmp_path):
    """FateZero's own node errors say what to change in the inputs: every server would say it."""
    with FakeComfy() as one, FakeComfy() as two:
        for fake in (one, two):
            fake.failure = {"node_id": "3", "node_type": "FateZero_EditSettings",
                            "exception_type": "FateZeroNodeError", "exception_message": "blend word 'car' is not in the prompt"}
        code, err = run([STYLE_API, "--video", clip_folder(tmp_path, 1), "--server", one.address,
                         "--server", two.address, "--out", tmp_path / "out"])
        assert code == 1
        assert len(one.prompts) + len(two.prompts) == 1
        assert "blend word 'car' is not in the prompt" in err


def test_a_server_that_is_gone_leaves_its_jobs_to_the_others(tmp_path):
    with FakeComfy() as good:
        gone = f"127.0.0.1:{free_port()}"
        out = tmp_path / "out"
        code, err = run([STYLE_API, "--video", clip_folder(tmp_path, 3), "--server", gone,
                         "--server", good.address, "--out", out])
        assert code == 0, err
        assert f"{gone} is gone (cannot reach ComfyUI at http://{gone}" in err
        assert len(good.prompts) == 3 and f"{gone} ran 0 job(s) (gone)" in err


def test_no_server_left_is_a_clear_error(tmp_path):
    gone = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    code, err = run([STYLE_API, "--video", clip_folder(tmp_path, 2), "--server", gone[0], "--server", gone[1],
                     "--out", tmp_path / "out"])
    assert code == 1
    assert "clip_0.mp4 | failed: no server left to run it" in err
    assert not (tmp_path / "out").exists()


def test_servers_from_a_file_and_gpus_from_one_port(tmp_path):
    listing = tmp_path / "servers.txt"
    listing.write_text("# the render boxes\ngpu1:8188\n\ngpu2:8188  # the new one\ngpu1:8188\n")
    args = runner.parse_args([str(STYLE_API), "--video", "x.mp4", "--server", "local:9000",
                              "--servers-file", str(listing)])
    assert runner.read_servers(args) == ["local:9000", "gpu1:8188", "gpu2:8188"]
    args = runner.parse_args([str(STYLE_API), "--video", "x.mp4", "--comfyui", "c", "--gpus", "3",
                              "--server", "127.0.0.1:8200"])
    assert runner.read_servers(args) == ["127.0.0.1:8200", "127.0.0.1:8201", "127.0.0.1:8202"]
    args = runner.parse_args([str(STYLE_API), "--video", "x.mp4", "--comfyui", "c", "--gpus", "3",
                              "--server", "a:1", "--server", "b:1"])
    with pytest.raises(runner.RunnerError, match="--gpus 3 with 2 --server addresses"):
        runner.read_servers(args)


@pytest.mark.parametrize("argv, said", [
    (["--gpus", "2"], "--gpus N starts N servers: it needs --comfyui DIR"),
    (["--segments", "1"], "K must be at least 2"),
])
def test_bad_server_options_are_refused(tmp_path, capsys, argv, said):
    with pytest.raises(SystemExit):
        runner.parse_args([str(STYLE_API), "--video", "x.mp4", *argv])
    assert said in capsys.readouterr().err


def test_a_segment_graph_loads_the_anchors_and_saves_the_segment_frames():
    graph = json.loads(STYLE_API.read_text())
    graph["5"]["inputs"]["key_frames"] = "anchors/16"
    seg = runner.segment_graph(graph, 1, 3, "long_1234")
    assert seg["2"]["inputs"] | {"segments": 3, "segment_index": 1, "anchor_frames": "anchors/16"} == seg["2"]["inputs"]
    assert seg["5"]["inputs"]["frame_positions"] == ["2", 4]
    assert seg["fz_span"] == {"class_type": "ImageFromBatch", "_meta": {"title": "segment frames"},
                              "inputs": {"image": ["8", 0], "batch_index": ["2", 5], "length": ["2", 6]}}
    assert seg["fz_save"]["inputs"] == {"images": ["fz_span", 0], "filename_prefix": "fatezero_segments/long_1234_001"}
    assert not {"10", "11"} & set(seg)  # the workflow's own outputs do not run
    join = runner.join_graph(graph, "fatezero_join_long", "long.mp4")
    assert join["1"]["inputs"]["video"] == "fatezero_join_long/" and join["1"]["inputs"]["resize_mode"] == "none"
    assert join["2"]["inputs"]["video"] == "long.mp4" and join["2"]["inputs"]["frame_load_cap"] == 8
    assert join["3"]["inputs"] == {"images": ["1", 0], "fps": ["2", 2], "audio": ["2", 3]}
    assert join["4"]["inputs"]["filename_prefix"] == graph["10"]["inputs"]["filename_prefix"]


def test_segments_need_a_named_key_rule(fake, tmp_path):
    code, err = run([STYLE_API, "--video", write_video_file(tmp_path, "long.mp4"), "--server", fake.address,
                     "--segments", "2", "--out", tmp_path / "out"])
    assert code == 2
    assert "--set FateZero_DDIMInvert.key_frames=anchors/16" in err
    assert not fake.prompts and not fake.uploads


def test_segment_frames_counts_the_clip_on_a_server_first():
    graph = json.loads(STYLE_API.read_text())
    count = runner.count_graph(graph)
    assert count["1"]["inputs"]["frame_load_cap"] == 8 and count["1"]["inputs"]["size"] == 8
    assert count["2"] == {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}
    assert runner.counted_frames({"outputs": {"2": {"text": ["32"]}}}) == 32
    with pytest.raises(runner.RunnerError, match="did not report the clip's frame count"):
        runner.counted_frames({"outputs": {}})


def test_one_server_per_gpu_is_started_and_all_are_stopped_after_an_error(stand_in, tmp_path, monkeypatch):
    def refused(self, path, subfolder=""):
        raise runner.RunnerError("uploading failed (500)")

    monkeypatch.setattr(runner.Client, "upload", refused)
    monkeypatch.setenv("STAND_IN_DELAY", "0.5")
    port = free_port()
    while free_port() == port + 1:
        port = free_port()
    code, err = run([STYLE_API, "--video", clip_folder(tmp_path, 2), "--server", f"127.0.0.1:{port}",
                     "--comfyui", stand_in, "--gpus", "2", "--out", tmp_path / "out"])
    assert code == 1 and "uploading failed" in err
    for gpu, p in enumerate((port, port + 1)):
        started = json.loads((stand_in / f"started_{p}.json").read_text())
        assert started["gpu"] == str(gpu) and not alive(started["pid"])
        assert f"stopped the ComfyUI it started at http://127.0.0.1:{p}" in err
    assert "CUDA_VISIBLE_DEVICES=1 " in err


def test_a_workflow_refused_by_one_server_runs_on_another(tmp_path):
    """A refusal can be one server's own (a model it lacks), so the job tries the others."""
    with FakeComfy() as lacking, FakeComfy() as good:
        lacking.refusal = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
                           "node_errors": {"1": {"class_type": "CheckpointLoaderSimple", "errors": [
                               {"message": "Value not in list", "details": "ckpt_name: 'my_model.safetensors' not in []"}]}}}
        out = tmp_path / "out"
        code, err = run([STYLE_API, "--video", clip_folder(tmp_path, 2), "--server", lacking.address,
                         "--server", good.address, "--out", out])
        assert code == 0, err
        assert "ComfyUI refused the workflow" in err and "it goes to another server" in err
        assert len(good.prompts) == 2
