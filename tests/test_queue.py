"""The queue command's parts without a server: UI-to-API conversion rules, --set, --image's
picture check, the reading of a server's refusal, the progress lines, the websocket framing, the
end of a run and its downloads, and the package's one-way imports.
(Against a real server: test_host_workflows.py; the conversion against the real editor's Export:
test_host_frontend.py.)"""
from __future__ import annotations

import ast
import io
import json
import os
import socket
import struct
import sys

import pytest

from conftest import PACK_ROOT

sys.path.append(PACK_ROOT)
from controlnext_queue import submission  # noqa: E402
from controlnext_queue.cli import finish, main  # noqa: E402
from controlnext_queue.errors import Exit, QueueError  # noqa: E402
from controlnext_queue.progress import ProgressDisplay  # noqa: E402
from controlnext_queue.submission import refusal, wait  # noqa: E402
from controlnext_queue.websocket import ConnectionClosed, WebSocket  # noqa: E402
from controlnext_queue.workflow import check_model_files, nodes_to_run, set_input, ui_to_api  # noqa: E402

OBJECT_INFO = {
    "Loader": {"display_name": "Load Model", "input": {"required": {"name": [["a.safetensors"], {}]}},
               "input_order": {"required": ["name"]}},
    "Filter": {"display_name": "Filter", "input": {"required": {"model": ["MODEL"]}}},
    "Sampler": {"display_name": "Sampler",
                "input": {"required": {"model": ["MODEL"], "seed": ["INT", {"control_after_generate": True}],
                                       "steps": ["INT", {"min": 1}], "text": ["STRING", {"multiline": True}]},
                          "optional": {"strength": ["FLOAT", {}], "extra": ["STRING", {"forceInput": True}]}},
                "input_order": {"required": ["model", "seed", "steps", "text"], "optional": ["strength", "extra"]}},
    "LoadImage": {"display_name": "Load Image", "input": {"required": {"image": [["x.png"], {"image_upload": True}],
                                                                       "scale": ["FLOAT", {}]}}},
    "V3Loader": {"display_name": "V3 Loader",
                 "input": {"required": {"controlnext_name": ["COMBO", {"options": ["a/controlnet.safetensors"]}]}}},
    "Switch": {"display_name": "Switch", "input": {"required": {"on": ["BOOLEAN", {}], "a": ["MODEL", {"lazy": True}],
                                                                "b": ["MODEL", {"lazy": True}]}}},
    "Save": {"display_name": "Save", "input": {"required": {"model": ["MODEL"]}}, "output_node": True},
}


def ui_node(node_id, node_type, inputs=(), outputs=(), widgets=None, mode=0, title=None):
    node = {"id": node_id, "type": node_type, "mode": mode, "inputs": [dict(name=n, type=t, link=l) for n, t, l in inputs],
            "outputs": [dict(name=n, type=t, links=l) for n, t, l in outputs]}
    if widgets is not None:
        node["widgets_values"] = widgets
    if title:
        node["title"] = title
    return node


def ui_workflow(image_mode=0):
    """Loader -> Reroute -> bypassed Filter -> Sampler; a note; a Load Image."""
    return {"nodes": [
        ui_node(1, "Loader", outputs=[("MODEL", "MODEL", [1])], widgets=["a.safetensors"]),
        ui_node(2, "Reroute", inputs=[("", "*", 1)], outputs=[("", "MODEL", [2])]),
        ui_node(3, "Filter", inputs=[("model", "MODEL", 2)], outputs=[("MODEL", "MODEL", [3])], mode=4),
        ui_node(4, "Sampler", inputs=[("model", "MODEL", 3), ("seed", "INT", None)],
                widgets=[5, "randomize", 20, "a fox", 0.5], title="My Sampler"),
        ui_node(5, "Note", widgets=["put a.safetensors in models/checkpoints"]),
        ui_node(6, "LoadImage", widgets=["x.png", "image", 1.5], mode=image_mode),
    ], "links": [[1, 1, 0, 2, 0, "*"], [2, 2, 0, 3, 0, "MODEL"], [3, 3, 0, 4, 0, "MODEL"]]}


def test_ui_to_api_follows_reroutes_and_bypasses_and_skips_editor_widgets():
    prompt = ui_to_api(ui_workflow(), OBJECT_INFO)
    assert prompt == {
        "1": {"inputs": {"name": "a.safetensors"}, "class_type": "Loader", "_meta": {"title": "Load Model"}},
        "4": {"inputs": {"model": ["1", 0], "seed": 5, "steps": 20, "text": "a fox", "strength": 0.5},
              "class_type": "Sampler", "_meta": {"title": "My Sampler"}},
        "6": {"inputs": {"image": "x.png", "scale": 1.5}, "class_type": "LoadImage", "_meta": {"title": "Load Image"}},
    }


def test_ui_to_api_leaves_out_muted_nodes():
    assert set(ui_to_api(ui_workflow(image_mode=2), OBJECT_INFO)) == {"1", "4"}


def test_ui_to_api_names_node_types_the_server_lacks():
    workflow = ui_workflow()
    workflow["nodes"][0]["type"] = "SomePackLoader"
    with pytest.raises(QueueError) as error:
        ui_to_api(workflow, OBJECT_INFO)
    assert error.value.code == Exit.UNKNOWN_NODE and "SomePackLoader" in error.value.message


def api_prompt():
    return {"1": {"class_type": "Loader", "inputs": {"name": "a.safetensors"}, "_meta": {"title": "Load Model"}},
            "2": {"class_type": "Sampler", "inputs": {"model": ["1", 0], "seed": 1, "steps": 2, "text": "x"},
                  "_meta": {"title": "Sampler"}},
            "3": {"class_type": "Sampler", "inputs": {"model": ["1", 0], "seed": 1, "steps": 2, "text": "x"},
                  "_meta": {"title": "Refiner"}}}


def test_set_converts_values_by_input_type():
    prompt = api_prompt()
    set_input(prompt, "Refiner", "steps", "30", OBJECT_INFO)
    set_input(prompt, "2", "text", "42", OBJECT_INFO)
    set_input(prompt, "2", "strength", "0.25", OBJECT_INFO)
    assert prompt["3"]["inputs"]["steps"] == 30
    assert prompt["2"]["inputs"]["text"] == "42" and prompt["2"]["inputs"]["strength"] == 0.25


@pytest.mark.parametrize("reference,name,text,expected", [
    ("Refiner", "steps", "many", "not a valid INT"),
    ("2", "model", "x", "connected to node 1"),
    ("2", "stepz", "3", "has no input 'stepz'"),
    ("Nowhere", "steps", "3", "no node 'Nowhere'"),
])
def test_set_refuses_with_a_message(reference, name, text, expected):
    prompt = api_prompt()
    with pytest.raises(QueueError) as error:
        set_input(prompt, reference, name, text, OBJECT_INFO)
    assert error.value.code == Exit.USAGE and expected in error.value.message


def test_a_title_used_twice_asks_for_the_id():
    prompt = api_prompt()
    prompt["3"]["_meta"]["title"] = "Sampler"
    with pytest.raises(QueueError) as error:
        set_input(prompt, "Sampler", "steps", "3", OBJECT_INFO)
    assert "ids 2, 3" in error.value.message


def test_model_files_the_server_does_not_list_are_named_before_queueing():
    prompt = {"7": {"class_type": "V3Loader", "inputs": {"controlnext_name": "b/controlnet.safetensors"}}}
    with pytest.raises(QueueError) as error:
        check_model_files(prompt, OBJECT_INFO)
    assert error.value.code == Exit.MISSING_MODEL
    assert "b/controlnet.safetensors" in error.value.message and "ComfyUI/models/controlnext/" in error.value.message
    assert "a/controlnet.safetensors" in error.value.message  # what the server has


def node_error(kind, received, name="name"):
    return {"type": kind, "message": "Value not in list" if kind == "value_not_in_list" else "Value too small",
            "details": f"{name}: {received}", "extra_info": {"input_name": name, "received_value": received,
                                                             "input_config": [["a.safetensors"], {}]}}


def test_a_refusal_with_only_missing_files_is_a_missing_model():
    answer = {"error": {"type": "prompt_outputs_failed_validation"},
              "node_errors": {"1": {"errors": [node_error("value_not_in_list", "b.safetensors")],
                                    "class_type": "Loader"}}}
    error = refusal(400, answer, api_prompt(), OBJECT_INFO)
    assert error.code == Exit.MISSING_MODEL and "models/checkpoints" not in error.message
    assert "b.safetensors" in error.message and "a.safetensors" in error.message


PREPROCESSOR_INFO = {
    "ControlNeXtDWPose": {"display_name": "DWPose Estimator (ControlNeXt)",
                          "input": {"required": {"detector_model": ["COMBO", {"options": []}],
                                                 "pose_model": ["COMBO", {"options": []}]}}},
    "ControlNeXtDepth": {"display_name": "Depth Map (ControlNeXt)",
                         "input": {"required": {"depth_model": ["COMBO", {"options": []}]}}},
}


def test_preprocessor_models_that_are_not_installed_name_their_folder_and_source():
    prompt = {"1": {"class_type": "ControlNeXtDWPose",
                    "inputs": {"detector_model": "yolox_l.onnx", "pose_model": "dw-ll_ucoco_384.onnx"}},
              "2": {"class_type": "ControlNeXtDepth", "inputs": {"depth_model": "Depth-Anything-V2-Small-hf"}}}
    with pytest.raises(QueueError) as error:
        check_model_files(prompt, PREPROCESSOR_INFO)
    assert error.value.code == Exit.MISSING_MODEL
    lines = error.value.message.splitlines()[1:]
    assert len(lines) == 3 and all("(the server has none)" in line for line in lines)
    for line, file in zip(lines[:2], ("yolox_l.onnx", "dw-ll_ucoco_384.onnx")):
        assert f"'{file}'" in line and "ComfyUI/models/dwpose/" in line and "yzd-v/DWPose" in line
    assert "model folder in ComfyUI/models/depth_estimation/" in lines[2] and "config.json" in lines[2]
    answer = {"node_errors": {"2": {"errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                                "extra_info": {"input_name": "depth_model",
                                                               "received_value": "Depth-Anything-V2-Small-hf",
                                                               "input_config": None}}]}}}
    refused = refusal(400, answer, prompt, PREPROCESSOR_INFO)  # how ComfyUI v0.33 refuses it
    assert refused.code == Exit.MISSING_MODEL and "ComfyUI/models/depth_estimation/" in refused.message


def test_a_refusal_with_other_problems_lists_them_all():
    answer = {"node_errors": {
        "1": {"errors": [node_error("value_not_in_list", "b.safetensors")], "class_type": "Loader"},
        "2": {"errors": [node_error("value_smaller_than_min", 0, "steps")], "class_type": "Sampler"}}}
    error = refusal(400, answer, api_prompt(), OBJECT_INFO)
    assert error.code == Exit.INVALID_PROMPT
    assert "node 2 'Sampler'" in error.message and "steps: 0" in error.message and "b.safetensors" in error.message


def test_a_refusal_naming_a_missing_class_is_an_unknown_node():
    answer = {"error": {"type": "invalid_prompt", "message": "Cannot execute because a node is missing the "
                        "class_type property.", "details": "Node ID '#9'"}, "node_errors": {}}
    assert refusal(400, answer, {}, OBJECT_INFO).code == Exit.INVALID_PROMPT
    answer["error"]["message"] = "Cannot execute because node SomePackNode does not exist."
    assert refusal(400, answer, {}, OBJECT_INFO).code == Exit.UNKNOWN_NODE


def api_prompt_with_output():
    """Loader -> Sampler -> Save; the Refiner (3) feeds nothing, so it never runs."""
    return {**api_prompt(), "4": {"class_type": "Save", "inputs": {"model": ["2", 0]}, "_meta": {"title": "Save"}}}


def test_progress_on_a_pipe_is_a_line_per_node_its_first_step_and_quarters():
    stream = io.StringIO()
    display = ProgressDisplay(api_prompt_with_output(), OBJECT_INFO, stream)
    display.executing("1")
    display.executing("2")
    for value in range(1, 9):
        display.progress("2", value, 8)
    display.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[1/3] Load Model (1)" and lines[1] == "[2/3] Sampler (2)"
    assert [line.split()[-1] for line in lines[2:]] == ["1/8", "2/8", "4/8", "6/8", "8/8"]


def test_nodes_to_run_are_the_outputs_and_what_they_need_up_to_cached_and_lazy_inputs():
    prompt = api_prompt_with_output()
    assert nodes_to_run(prompt, OBJECT_INFO) == {"1", "2", "4"}
    assert nodes_to_run(prompt, OBJECT_INFO, frozenset({"2", "3"})) == {"2", "4"}  # 1 only feeds the cached 2
    prompt["5"] = {"class_type": "Switch", "inputs": {"on": True, "a": ["2", 0], "b": ["3", 0]}}
    prompt["4"]["inputs"]["model"] = ["5", 0]
    assert nodes_to_run(prompt, OBJECT_INFO) == {"4", "5"}  # the Switch asks for a or b while it runs


def test_the_counter_counts_cached_nodes_and_ends_at_the_total():
    """The server lists cached nodes once (``execution_cached``) and never sends them ``executing``."""
    stream = io.StringIO()
    display = ProgressDisplay(api_prompt_with_output(), OBJECT_INFO, stream)
    display.cached(["1", "3"])  # 3 was cached by an earlier prompt but is not part of this run
    display.executing("2")
    display.executing("4")
    display.executing(None)
    assert stream.getvalue().splitlines() == ["[1/3] cached: Load Model (1)", "[2/3] Sampler (2)", "[3/3] Save (4)"]


def test_the_counter_grows_with_a_node_a_lazy_input_asks_for():
    prompt = api_prompt_with_output()
    prompt["5"] = {"class_type": "Switch", "inputs": {"on": True, "a": ["2", 0], "b": ["3", 0]}}
    prompt["4"]["inputs"]["model"] = ["5", 0]
    stream = io.StringIO()
    display = ProgressDisplay(prompt, OBJECT_INFO, stream)
    for node_id in ("5", "1", "2", "5", "4"):  # the Switch runs, asks for a, then runs again
        display.executing(node_id)
    assert [line.split()[0] for line in stream.getvalue().splitlines()] == ["[1/2]", "[2/3]", "[3/4]", "[3/4]", "[4/4]"]


def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    length = bytes([len(payload)]) if len(payload) < 126 else bytes([126]) + struct.pack("!H", len(payload))
    return bytes([(0x80 if fin else 0) | opcode]) + length + payload


def receive_until_quiet(websocket: WebSocket) -> list:
    messages = []
    while True:
        try:
            messages.append(websocket.receive())
        except TimeoutError:
            return messages


def test_websocket_reassembles_fragments_answers_pings_and_reports_close():
    client, server = socket.socketpair()
    with client, server:
        server.sendall(frame(0x1, b'{"type": ', fin=False) + frame(0x9, b"hi") + frame(0x0, b'"status"}')
                       + frame(0x2, b"\x00\x01") + frame(0x8, struct.pack("!H", 1001)))
        websocket = WebSocket(client)
        assert websocket.receive() == '{"type": "status"}'
        pong = server.recv(64)
        mask = pong[2:6]
        assert pong[0] == 0x8A and bytes(b ^ mask[i % 4] for i, b in enumerate(pong[6:])) == b"hi"
        assert websocket.receive() == b"\x00\x01"
        with pytest.raises(ConnectionClosed, match="1001"):
            websocket.receive()


def test_websocket_messages_survive_a_read_timeout_at_any_byte():
    """A read that times out part way through a frame, or between the fragments of a message,
    loses nothing: the next read goes on from there (the command reads with a 1 s timeout)."""
    long_text = json.dumps({"type": "executed", "data": {"output": "x" * 200}})
    stream = (frame(0x1, b'{"type": ', fin=False) + frame(0x9, b"hi") + frame(0x0, b'"status"}')
              + frame(0x1, long_text.encode()) + frame(0x2, b"\x00\x01"))
    for cut in range(1, len(stream)):
        client, server = socket.socketpair()
        with client, server:
            websocket = WebSocket(client)
            websocket.settimeout(0.001)
            server.sendall(stream[:cut])
            received = receive_until_quiet(websocket)
            server.sendall(stream[cut:])
            received += receive_until_quiet(websocket)
        assert received == ['{"type": "status"}', long_text, b"\x00\x01"], f"cut after byte {cut}"


class FinishedHistory:
    """A client whose /history already has the prompt's entry, as when the server finished the
    run while the command was still reading the run's messages."""

    def __init__(self, entry: dict):
        self.entry = entry

    def history(self, prompt_id: str) -> dict:
        return self.entry


def run_messages(prompt_id: str) -> list[dict]:
    """What ComfyUI sends the queueing client for a run of api_prompt_with_output()."""
    def message(kind, **data):
        return {"type": kind, "data": {**data, "prompt_id": prompt_id}}

    return [{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 1}}, "sid": "me"}},
            message("execution_start"), message("execution_cached", nodes=["1"]),
            message("executing", node="2", display_node="2"), message("progress", node="2", value=1, max=2),
            message("progress", node="2", value=2, max=2), message("executing", node="4", display_node="4"),
            message("executed", node="4", display_node="4", output={}), message("execution_success"),
            message("executing", node=None)]


def test_the_progress_lines_go_to_the_end_when_history_has_the_entry_first(monkeypatch, capsys):
    """The command checks /history now and then in case a message was missed; when that check
    finds the run finished, the run's messages still unread are shown, not dropped."""
    monkeypatch.setattr(submission, "IDLE_CHECK_SECONDS", -1.0)  # check at every message
    entry = {"status": {"completed": True, "status_str": "success"}, "outputs": {}}
    client, server = socket.socketpair()
    with client, server:
        server.sendall(b"".join(frame(0x1, json.dumps(m).encode()) for m in run_messages("p1")))
        assert wait(FinishedHistory(entry), WebSocket(client), "p1", api_prompt_with_output(), OBJECT_INFO,
                    None) is entry
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["[1/3] cached: Load Model (1)", "[2/3] Sampler (2)", "    [############------------] 1/2",
                     "    [########################] 2/2", "[3/3] Save (4)"]


class RecordingDownloads:
    def __init__(self):
        self.downloads = []

    def download(self, file: dict, directory: str) -> str:
        self.downloads.append((file["filename"], directory))
        return os.path.join(directory, file["filename"])


def entry_with_a_preview() -> dict:
    return {"status": {"completed": True, "status_str": "success", "messages": []},
            "outputs": {"4": {"images": [{"filename": "out.png", "subfolder": "", "type": "output"}]},
                        "2": {"images": [{"filename": "preview.png", "subfolder": "", "type": "temp"}],
                              "text": ["not a file"]}}}


def test_previews_are_left_on_the_server_with_a_note_that_says_what_they_are(tmp_path, capsys):
    client = RecordingDownloads()
    finish(client, entry_with_a_preview(), "p1", api_prompt_with_output(), OBJECT_INFO, str(tmp_path), False)
    assert client.downloads == [("out.png", str(tmp_path))]
    out, err = capsys.readouterr()
    assert out.split() == [os.path.join(tmp_path, "out.png")]
    assert "1 preview image(s) from node 2 'Sampler'" in err and "temp folder" in err
    assert f"--previews downloads them into {os.path.join(tmp_path, 'previews')}" in err


def test_previews_flag_downloads_them_into_their_own_folder(tmp_path, capsys):
    client = RecordingDownloads()
    finish(client, entry_with_a_preview(), "p1", api_prompt_with_output(), OBJECT_INFO, str(tmp_path), True)
    previews = os.path.join(tmp_path, "previews")
    assert client.downloads == [("out.png", str(tmp_path)), ("preview.png", previews)]
    out, err = capsys.readouterr()
    assert out.split() == [os.path.join(tmp_path, "out.png"), os.path.join(previews, "preview.png")]
    assert f"1 preview image(s) in {previews}" in err


def test_a_file_that_is_not_a_picture_is_refused_before_the_server_is_asked(tmp_path, capsys):
    table = tmp_path / "photo.png"
    table.write_text("name,seed\nfox,7\n")
    workflow = tmp_path / "workflow.json"
    workflow.write_text(json.dumps(api_prompt()))
    arguments = [str(workflow), "--server", "http://127.0.0.1:1", "--out", str(tmp_path / "out")]  # nothing there
    assert main([*arguments, "--image", f"Load Model={table}"]) == Exit.USAGE
    assert f"error: {table} is not a picture (allowed: PNG, JPEG, WEBP, GIF, BMP or TIFF" in capsys.readouterr().err
    assert main([*arguments, "--image", f"Load Model={tmp_path / 'gone.png'}"]) == Exit.USAGE
    assert "cannot read the image" in capsys.readouterr().err
    table.write_bytes(b"\x89PNG\r\n\x1a\n")
    assert main([*arguments, "--image", f"Load Model={table}"]) == Exit.UNREACHABLE  # a picture: on to the server


def test_the_package_imports_point_one_way():
    """No module of controlnext_queue imports one that imports it back (cli.py runs batch.py; both
    queue through submission.py)."""
    folder = os.path.join(PACK_ROOT, "controlnext_queue")
    imports = {}
    for file in os.listdir(folder):
        if file.endswith(".py"):
            tree = ast.parse(open(os.path.join(folder, file), encoding="utf-8").read())
            imports[file[:-3]] = {node.module for node in ast.walk(tree)
                                  if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
    assert imports["batch"] >= {"submission", "workflow"} and "cli" not in imports["batch"]
    placed: list[str] = []
    while len(placed) < len(imports):  # modules in an order where each comes after all it imports
        ready = sorted(name for name, needs in imports.items() if name not in placed and needs <= set(placed))
        assert ready, f"an import cycle among {sorted(set(imports) - set(placed))}"
        placed += ready
