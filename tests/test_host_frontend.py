"""Host tests: the front-end extension in the real editor, in headless Chromium.

Debian's chromium is driven over the DevTools protocol through the pack's own websocket
client (no browser driver to install). The editor is ComfyUI's own frontend, served by a real
server started here; a screenshot of the last state is saved under test-artifacts/.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import pytest

from conftest import PACK_ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium: install Debian's chromium to run the front-end tests", allow_module_level=True)

import host  # noqa: E402,F401  (skips this module without a ComfyUI host)
from server import (CHECKPOINT_LOADERS, PACK_LINK_NAME, ComfyServer, install_official_model_files,  # noqa: E402
                    make_base_directory)
from server_nodes.tiny_checkpoint import OFFICIAL_CHECKPOINTS  # noqa: E402

sys.path.append(PACK_ROOT)
from controlnext_queue.websocket import WebSocket  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = os.path.join(PACK_ROOT, "test-artifacts")
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                  "--remote-debugging-port=0", "--window-size=1600,1000"]


class Browser:
    """One Chromium page, driven over the DevTools protocol."""

    def __init__(self, profile: str):
        self.log = open(os.path.join(profile, "chromium.log"), "w")
        self.process = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        port_file = os.path.join(profile, "DevToolsActivePort")
        deadline = time.time() + 30
        while not (os.path.exists(port_file) and open(port_file).read().count("\n") >= 1):
            if time.time() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"chromium did not start; see {self.log.name}")
            time.sleep(0.1)
        port = open(port_file).read().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            page = next(t for t in json.loads(response.read()) if t["type"] == "page")
        self.socket = WebSocket.connect(page["webSocketDebuggerUrl"])
        self.next_id = 0
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")

    def send(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        return self.send_all([(method, params)], timeout)[0]

    def send_all(self, calls: list, timeout: float = 60) -> list[dict]:
        """Sends the calls back to back, then reads their answers (events are kept): a double
        click must reach the page within its double-click time, whatever the machine's load."""
        ids = []
        for method, params in calls:
            self.next_id += 1
            ids.append(self.next_id)
            self.socket.send_text(json.dumps({"id": self.next_id, "method": method, "params": params or {}}))
        self.socket.settimeout(timeout)
        answers = {}
        while len(answers) < len(ids):
            message = json.loads(self.socket.receive())
            if message.get("id") in ids:
                if "error" in message:
                    raise RuntimeError(f"{calls[ids.index(message['id'])][0]}: {message['error']}")
                answers[message["id"]] = message.get("result", {})
            elif "method" in message:
                self.events.append(message)
        return [answers[call_id] for call_id in ids]

    def evaluate(self, expression: str, timeout: float = 60):
        """Runs JavaScript in the page (awaiting a promise) and returns its JSON value."""
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True}, timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise AssertionError(f"{details.get('exception', {}).get('description') or details.get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60, what: str = ""):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what or expression}")

    def click(self, x: float, y: float, count: int = 1) -> None:
        events = [("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})]
        for number in range(1, count + 1):
            for kind in ("mousePressed", "mouseReleased"):
                events.append(("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left",
                                                            "buttons": 1 if kind == "mousePressed" else 0,
                                                            "clickCount": number}))
        self.send_all(events)

    def type_text(self, text: str) -> None:
        self.send("Input.insertText", {"text": text})

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter",
                                                 "windowsVirtualKeyCode": 13})

    def screenshot(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as file:
            file.write(base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"]))

    def responses(self, url_prefix: str) -> dict[str, int]:
        """Status of each response the page received for a URL starting with ``url_prefix`` (decoded)."""
        self.evaluate("1")
        return {urllib.parse.unquote(event["params"]["response"]["url"]): event["params"]["response"]["status"]
                for event in self.events if event["method"] == "Network.responseReceived"
                and urllib.parse.unquote(event["params"]["response"]["url"]).startswith(url_prefix)}

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads the page reported so far."""
        self.evaluate("1")  # collects the events sent before its answer
        found = []
        for event in self.events:
            params = event.get("params", {})
            if event["method"] == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
            elif event["method"] == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                found.append(details.get("exception", {}).get("description") or details.get("text", ""))
            elif event["method"] == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                found.append(f"{entry.get('text')} {entry.get('url', '')}")
        return found

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


APP = "window.comfyAPI.app.app"
OUR_EXTENSION = "ControlNeXt.NodeStatus"
TEMPLATE_URL = f"/api/workflow_templates/{PACK_LINK_NAME}"
WORKFLOWS = os.path.join(PACK_ROOT, "workflows")


def template_url(name: str) -> str:
    """Where the server serves a template (names are titles: spaces and all)."""
    return f"{TEMPLATE_URL}/{urllib.parse.quote(name)}.json"


def read_json(path: str):
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def put_setting(server, name: str, value) -> None:
    status, _ = server.post(f"/settings/{name}", value)
    assert status == 200


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = make_base_directory(str(tmp_path_factory.mktemp("frontend_base")))
    install_official_model_files(base, ordinary_controlnet=False)
    os.makedirs(os.path.join(base, "models", "checkpoints"))
    for name in OFFICIAL_CHECKPOINTS:  # empty: listed for the editor's model check, never read (see run_template_in_editor)
        open(os.path.join(base, "models", "checkpoints", name), "wb").close()
    running = ComfyServer(base).start()
    put_setting(running, "Comfy.TutorialCompleted", True)  # no first-run templates dialog over the canvas
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser(server):
    profile = tempfile.mkdtemp(prefix="controlnext_chromium_")
    page = Browser(profile)
    yield page
    page.close()
    shutil.rmtree(profile, ignore_errors=True)


def open_editor(browser, server) -> list[str]:
    """Loads the editor and waits for it; returns the console errors of this load."""
    browser.events.clear()
    browser.send("Page.navigate", {"url": server.url})
    browser.wait_for(f"!!(window.comfyAPI?.app?.app?.graph && {APP}.extensionManager)", 90, "the editor")
    browser.wait_for(f"{APP}.graph.nodes !== undefined", 30)
    time.sleep(2)  # late requests (user files, release notes) report their errors
    return browser.errors()


def registered_extensions(browser) -> list[str]:
    return browser.evaluate(f"({APP}.extensions || []).map((e) => e.name)")


def script_errors(errors: list[str]) -> set[str]:
    """Errors of the page's code, without positions, to compare two loads of the page. Failed
    network loads are left out: offline, the stock editor's requests fail in varying number and
    order (release notes, model links), and the extension makes none (its own file's URL names
    the pack: the check for our name covers it)."""
    return {re.sub(r":\d+(:\d+)?|\d+", "#", error.split("\n")[0]) for error in errors
            if "Failed to load resource" not in error and "net::ERR_" not in error}


@pytest.fixture(scope="module")
def editor(browser, server):
    """The editor with our extension, and the errors a load logs with it and with it disabled
    (Comfy.Extension.Disabled: its file loads, its hooks never run)."""
    put_setting(server, "Comfy.Extension.Disabled", [OUR_EXTENSION])
    without = open_editor(browser, server)
    put_setting(server, "Comfy.Extension.Disabled", [])
    with_extension = open_editor(browser, server)
    return {"without": without, "with": with_extension}


def test_editor_loads_the_extension_without_console_errors(editor, browser, server):
    assert OUR_EXTENSION in registered_extensions(browser)
    with urllib.request.urlopen(f"{server.url}/extensions/{PACK_LINK_NAME}/controlnext.js") as response:
        assert response.status == 200
    ours = [error for error in editor["with"] if "ControlNeXt" in error or "controlnext" in error]
    assert not ours, ours
    new = script_errors(editor["with"]) - script_errors(editor["without"])
    assert not new, f"errors only with the extension: {new}"


def api_inputs(prompt: dict, object_info: dict) -> dict:
    """Each node's class and the inputs its type declares (the editor adds others, e.g. upload),
    optional ones left out filled with their defaults (the editor sends every widget)."""
    declared = {}
    for node_id, node in prompt.items():
        spec = object_info[node["class_type"]]["input"]
        names = set(spec.get("required", {})) | set(spec.get("optional", {}))
        defaults = {name: options[1]["default"] for name, options in spec.get("optional", {}).items()
                    if len(options) > 1 and isinstance(options[1], dict) and "default" in options[1]}
        inputs = {k: v for k, v in node["inputs"].items() if k in names}
        declared[node_id] = (node["class_type"], {**defaults, **inputs})
    return declared


def test_every_template_opens_and_exports_its_api_twin(editor, browser, server):
    names = server.get("/api/workflow_templates")[PACK_LINK_NAME]
    object_info = server.get("/object_info")
    assert names
    for name in names:
        workflow = server.get(template_url(name))
        exported = browser.evaluate(f"""(async () => {{
            const app = {APP};
            await app.loadGraphData(await (await fetch({json.dumps(template_url(name))})).json());
            return {{count: app.graph.nodes.length, prompt: (await app.graphToPrompt()).output}};
        }})()""")
        assert exported["count"] == len(workflow["nodes"]), name
        twin = read_json(os.path.join(WORKFLOWS, "api", f"{name}.json"))
        assert api_inputs(exported["prompt"], object_info) == api_inputs(twin, object_info), name
    assert not [error for error in browser.errors() if "ControlNeXt" in error]


STATUS_NODES = ("ControlNeXtLoader", "ControlNeXtApply", "ControlNeXtUNetWeights")  # the nodes with a status
ROOM_FOR_NOTHING = 10  # px a node may stand taller than its widgets before a run


def frame(browser, *node_types: str, ids: tuple = ()) -> None:
    """Zooms the canvas onto the first nodes of these types and the nodes of these ids, for the screenshot."""
    browser.evaluate(f"""(() => {{
        const app = {APP};
        const nodes = [...{json.dumps(node_types)}.map((t) => app.graph.nodes.find((n) => n.type === t)),
                       ...{json.dumps(list(ids))}.map((id) => app.graph.getNodeById(id))];
        const left = Math.min(...nodes.map((n) => n.pos[0])), top = Math.min(...nodes.map((n) => n.pos[1] - 40));
        const right = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
        const bottom = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
        const canvas = app.canvas.canvas;
        const fit = Math.min(1.1, (canvas.width - 300) / (right - left), (canvas.height - 200) / (bottom - top));
        const scale = Math.max(0.75, fit);  // below that the editor draws nodes without text
        app.canvas.ds.scale = scale;
        app.canvas.ds.offset = [150 / scale - left, 120 / scale - top];
        app.canvas.setDirty(true, true);
    }})()""")
    time.sleep(0.5)


def load_template(browser, name: str) -> None:
    browser.evaluate(f"""(async () => {{
        await {APP}.loadGraphData(await (await fetch({json.dumps(template_url(name))})).json());
    }})()""")


def our_nodes(browser) -> list[dict]:
    """The pack's nodes in the graph: id, type, height and the height of their widgets (what the
    editor would give them), whether they have a status, and the labels of their list widgets."""
    return browser.evaluate(f"""{APP}.graph.nodes.filter((n) => n.type.startsWith("ControlNeXt")).map((n) => ({{
        id: n.id, type: n.type, height: n.size[1], widgets_height: n.computeSize()[1],
        status: (n.widgets || []).some((w) => w.name === "controlnext_status"),
        labels: (n.widgets || []).filter((w) => w.type === "combo").map((w) => w.label || w.name)}}))""")


def drawn_texts(browser, node_id) -> list[str]:
    """The texts the canvas draws with this node zoomed in: labels come out cut short ("contr…")
    when a long value leaves them no room."""
    frame(browser, ids=(node_id,))
    return browser.evaluate(f"""(() => {{
        const canvas = {APP}.canvas, context = canvas.ctx, fillText = context.fillText, drawn = [];
        context.fillText = function (text, ...rest) {{ drawn.push(String(text)); return fillText.call(this, text, ...rest); }};
        try {{ canvas.draw(true, true); }} finally {{ context.fillText = fillText; }}
        return drawn;
    }})()""")


def check_compact_with_whole_labels(browser, where: str) -> None:
    for node in our_nodes(browser):
        assert not node["status"], (where, node)  # a status only comes with a run
        if node["type"] in STATUS_NODES:
            assert node["height"] <= node["widgets_height"] + ROOM_FOR_NOTHING, (where, node)
        if node["labels"]:
            drawn = drawn_texts(browser, node["id"])
            assert set(node["labels"]) <= set(drawn), (where, node, [text for text in drawn if "…" in text])


def test_the_template_browser_shows_a_picture_and_a_title_for_each_template(editor, browser, server):
    """Browse Templates, the pack's entry: each card's picture (<template>.jpg beside the template)
    loads, and its title (the template's file name) reads as a title and is shown whole."""
    names = server.get("/api/workflow_templates")[PACK_LINK_NAME]
    browser.events.clear()
    browser.evaluate(f"{APP}.extensionManager.command.execute('Comfy.BrowseTemplates')")
    entry = ("[...document.querySelectorAll('*')].find((e) => !e.children.length && "
             f"e.textContent.trim() === {json.dumps(PACK_LINK_NAME)})")
    browser.wait_for(f"!!{entry}", 60, "the pack in the template browser")
    browser.evaluate(f"{entry}.click()")
    cards = {}
    for name in names:
        cards[name] = browser.wait_for(f"""(() => {{
            const shown = [...document.querySelectorAll('[data-testid^="template-workflow-"]')];
            const card = shown.find((c) => c.dataset.testid === {json.dumps(f"template-workflow-{name}")});
            if (!card) {{  // frontend 1.27 shows 12 cards, more when its list is scrolled to the bottom
                const list = shown.at(-1)?.closest(".overflow-auto");
                if (list) list.scrollTop = list.scrollHeight;
                return null;
            }}
            card.scrollIntoView({{block: "nearest"}});  // a picture loads when its card is seen
            const picture = card?.querySelector("img"), title = card?.querySelector("h3");
            if (!picture?.complete || !picture.naturalWidth) return null;
            return {{title: title.textContent.trim(), description: card.querySelector("p")?.textContent.trim() ?? null,
                     clipped: title.scrollHeight > title.clientHeight + 1 || title.scrollWidth > title.clientWidth + 1}};
        }})()""", 60, f"the card of {name} with its picture")
    pictures = browser.responses(f"{server.url}{TEMPLATE_URL}/")
    browser.evaluate("document.querySelector('[data-testid^=\"template-workflow-\"]').scrollIntoView()")
    time.sleep(0.5)
    browser.screenshot(os.path.join(ARTIFACTS, "frontend_templates.png"))
    browser.send("Input.dispatchKeyEvent", {"type": "keyDown", "key": "Escape", "code": "Escape",
                                            "windowsVirtualKeyCode": 27})
    browser.wait_for("!document.querySelector('[data-testid^=\"template-workflow-\"]')", 10, "the dialog to close")
    assert {url: status for url, status in pictures.items() if status != 200} == {}
    assert {f"{server.url}{TEMPLATE_URL}/{name}.jpg" for name in names} <= set(pictures)
    for name, card in cards.items():
        assert card["title"] == name and not card["clipped"], card
        assert name.startswith("ControlNeXt ") and "_" not in name, f"{name!r} is a file name, not a title"
        if card["description"] is not None:  # frontend 1.27 repeats the name in words below it
            assert card["description"] == " ".join(name.replace("-", " ").split()), card


def test_before_a_run_our_nodes_are_compact_and_show_their_whole_labels(editor, browser, server):
    """Each template as it opens: no empty room kept for a status, and every list widget's label
    drawn in full beside its file name."""
    status_nodes = {}
    for name in server.get("/api/workflow_templates")[PACK_LINK_NAME]:
        load_template(browser, name)
        check_compact_with_whole_labels(browser, name)
        status_nodes[name] = [node["id"] for node in our_nodes(browser) if node["type"] in STATUS_NODES]
    name = max(status_nodes, key=lambda name: len(status_nodes[name]))
    load_template(browser, name)
    frame(browser, ids=status_nodes[name])
    browser.screenshot(os.path.join(ARTIFACTS, "frontend_before_run.png"))


def add_from_search(browser, query: str) -> None:
    """Double-click on empty canvas opens the node search; type and take the first result."""
    browser.evaluate(f"{APP}.graph.clear()")
    browser.click(700, 400)  # focus the canvas, then double-click elsewhere (not a continued click)
    time.sleep(0.6)
    browser.click(900, 500, count=2)
    browser.wait_for("document.activeElement?.tagName === 'INPUT'", 10, "the node search box")
    browser.type_text(query)
    time.sleep(0.5)
    browser.press_enter()
    browser.wait_for("document.activeElement?.tagName !== 'INPUT'", 10, "the search box to close")
    time.sleep(0.5)  # its closing animation still catches clicks


@pytest.mark.parametrize("display_name,node_type", [("Load ControlNeXt", "ControlNeXtLoader"),
                                                     ("Apply ControlNeXt", "ControlNeXtApply")])
def test_our_nodes_can_be_added_from_the_search_menu(editor, browser, display_name, node_type):
    add_from_search(browser, display_name)
    types = browser.wait_for(f"(() => {{ const t = {APP}.graph.nodes.map((n) => n.type); "
                             f"return t.length ? t : null; }})()", 10, f"{display_name} to be added")
    assert types == [node_type]
    check_compact_with_whole_labels(browser, f"{display_name} from the search menu")  # with its first file


SMALL = [["EmptyLatentImage", "width", 64], ["EmptyLatentImage", "height", 64], ["KSampler", "steps", 2]]


def run_template_in_editor(browser, server, name: str, widget_values: list) -> None:
    """Opens a template from workflows/ in the editor, sets widgets, and queues it with the
    editor's Run. What the editor sends gets the one test substitution of tests/server.py
    (Load Checkpoint -> the tiny-checkpoint test node, same inputs); nothing else changes."""
    template = server.get(template_url(name))
    browser.evaluate(f"""(async () => {{
        const app = {APP}, api = window.comfyAPI.api.api;
        await app.refreshComboInNodes();  // the editor learns about the uploaded images
        await app.loadGraphData({json.dumps(template)});
        for (const [type, name, value] of {json.dumps(widget_values)}) {{
            for (const node of app.graph.nodes.filter((n) => n.type === type)) {{
                node.widgets.find((w) => w.name === name).value = value;
            }}
        }}
        const substitute = {json.dumps(CHECKPOINT_LOADERS)};
        const queue = api.queuePrompt;
        api.queuePrompt = function (number, data, ...rest) {{
            for (const node of Object.values(data.output)) node.class_type = substitute[node.class_type] ?? node.class_type;
            return queue.call(this, number, data, ...rest);
        }};
        try {{ await app.queuePrompt(0, 1); }} finally {{ api.queuePrompt = queue; }}
    }})()""")


def status_text(browser, node_type: str, timeout: float = 120) -> dict:
    """Waits for our status widget on the first node of that type; its text and state."""
    return browser.wait_for(f"""(() => {{
        const node = {APP}.graph.nodes.find((n) => n.type === "{node_type}");
        const widget = node?.widgets?.find((w) => w.name === "controlnext_status");
        return widget?.element?.textContent ? {{text: widget.element.textContent, tooltip: widget.element.title,
            state: widget.element.dataset.state, images: (node.imgs || []).length}} : null;
    }})()""", timeout, f"the status on {node_type}")


def upload(server, path: str) -> None:
    from controlnext_queue.client import ComfyClient
    ComfyClient(server.url).upload_image(path)


def test_after_a_run_the_nodes_show_what_the_run_found(editor, browser, server, tmp_path):
    from PIL import Image
    Image.new("RGB", (64, 64), (40, 90, 200)).save(tmp_path / "photo.png")  # the template's file name
    upload(server, str(tmp_path / "photo.png"))
    run_template_in_editor(browser, server, "ControlNeXt SD1.5 Depth", SMALL)
    loader = status_text(browser, "ControlNeXtLoader")
    applied = status_text(browser, "ControlNeXtApply")
    assert loader["state"] == "ok" and loader["text"].startswith("Encoder for SD1.5 models")
    assert "M parameters" in loader["text"] and '"mid" layout' in loader["tooltip"]
    assert applied["state"] == "ok" and applied["text"] == (
        "SD1.5 model, strength 1: acts where the release was trained to, deep in the UNet, right after its middle, "
        "at its lowest resolution")
    assert applied["tooltip"].startswith("after_middle = ComfyUI output block 0;"), applied
    assert "layout" not in applied["text"] and "block" not in applied["text"]  # the exact terms stay in the tooltip
    browser.wait_for(f"""(() => {{ const n = {APP}.graph.nodes.find((n) => n.type === "ControlNeXtApply");
                         return (n.imgs || []).length > 0; }})()""", 30, "the control image preview")
    server.wait_until_idle(timeout=120)
    frame(browser, "ControlNeXtLoader", "ControlNeXtApply", "LoadImage")
    browser.screenshot(os.path.join(ARTIFACTS, "frontend_after_run.png"))
    assert not [error for error in browser.errors() if "ControlNeXt" in error and "Error" not in error]


def test_a_wrong_family_shows_as_a_message_on_the_node(editor, browser, server, tmp_path):
    from PIL import Image
    Image.new("RGB", (64, 64), (200, 200, 200)).save(tmp_path / "photo.png")
    upload(server, str(tmp_path / "photo.png"))
    sd15_file = "ControlNeXt-SD1.5/vidit_depth/controlnet.safetensors"
    run_template_in_editor(browser, server, "ControlNeXt SDXL Canny",
                           SMALL + [["ControlNeXtLoader", "controlnext_name", sd15_file]])
    status = browser.wait_for(f"""(() => {{
        const node = {APP}.graph.nodes.find((n) => n.type === "ControlNeXtApply");
        const widget = node?.widgets?.find((w) => w.name === "controlnext_status");
        return widget?.element?.dataset.state === "error" ? widget.element.textContent : null;
    }})()""", 180, "the error on Apply ControlNeXt")
    assert "cannot serve a SDXL model; it serves SD1.5" in status
    assert "Traceback" not in status
    browser.send("Input.dispatchKeyEvent", {"type": "keyDown", "key": "Escape", "code": "Escape",
                                            "windowsVirtualKeyCode": 27})
    server.wait_until_idle(timeout=120)
    frame(browser, "ControlNeXtLoader", "ControlNeXtApply", "ControlNeXtCanny")
    browser.screenshot(os.path.join(ARTIFACTS, "frontend_wrong_family.png"))
