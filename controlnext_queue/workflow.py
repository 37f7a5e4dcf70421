"""Workflow files: UI format (what the editor saves) to API format (what /prompt takes), and
the edits the command line asks for (--set, --image), checked against the server's /object_info
(values) and by their content (pictures).
"""
from __future__ import annotations

import json
import re
import sys

from .errors import Exit, QueueError

# Nodes that exist only in the editor: never sent to the server.
EDITOR_ONLY_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MODE_MUTED, MODE_BYPASSED = 2, 4
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# The editor adds a "control after generate" widget after seeds; its value follows the seed's.
SEED_CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# ...and an upload button after file combos, saved as one of these values.
UPLOAD_FLAGS = {"image_upload": "image", "video_upload": "video", "audio_upload": "audio",
                "animated_image_upload": "image"}
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft", ".pkl", ".onnx")
# Where ComfyUI looks for the files of common loader inputs (ControlNeXt files: models/controlnext)
# and of this pack's preprocessors (a depth model is a folder, named without an extension).
MODEL_FOLDERS = {"ckpt_name": "checkpoints", "control_net_name": "controlnet", "vae_name": "vae",
                 "lora_name": "loras", "clip_name": "text_encoders", "unet_name": "diffusion_models",
                 "controlnext_name": "controlnext", "detector_model": "dwpose", "pose_model": "dwpose",
                 "depth_model": "depth_estimation"}
# What goes in the preprocessors' folders and where it comes from (README, Preprocessors).
FOLDER_CONTENTS = {
    "dwpose": ("the file", " (Hugging Face yzd-v/DWPose has both files DWPose needs: yolox_l.onnx and "
                           "dw-ll_ucoco_384.onnx)"),
    "depth_estimation": ("the model folder", " (config.json, model.safetensors and preprocessor_config.json, as in "
                                             "Hugging Face depth-anything/Depth-Anything-V2-Small-hf)"),
}
CONTROLNEXT_LOADERS = {"ControlNeXtLoader", "ControlNeXtUNetWeights"}
BOOLEAN_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
CHOICES_SHOWN = 12  # a longer list of choices is cut in messages
# The pictures Load Image reads, by extension (a folder in a batch's jobs file) and by content:
# the first bytes of PNG, JPEG, GIF, WEBP, BMP and TIFF files.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
PICTURE_START = re.compile(rb"\x89PNG\r\n\x1a\n|\xff\xd8\xff|GIF8[79]a|RIFF....WEBP|BM|II\*\x00|MM\x00\*", re.DOTALL)


def load_workflow(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except OSError as error:
        raise QueueError(Exit.USAGE, f"cannot read the workflow {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise QueueError(Exit.USAGE, f"{path} is not JSON ({error}). Save the workflow from the editor.") from None
    if not isinstance(data, dict):
        raise QueueError(Exit.USAGE, f"{path} is not a ComfyUI workflow (expected a JSON object).")
    return data


def is_ui_format(workflow: dict) -> bool:
    return isinstance(workflow.get("nodes"), list) and "links" in workflow


def display_name(class_type: str, object_info: dict) -> str:
    return object_info.get(class_type, {}).get("display_name") or class_type


def describe(node_id: str, node: dict, object_info: dict | None = None) -> str:
    title = node.get("_meta", {}).get("title") or display_name(node.get("class_type", "?"), object_info or {})
    return f"node {node_id} '{title}'" if title == node.get("class_type") else \
        f"node {node_id} '{title}' ({node.get('class_type')})"


def input_specs(class_info: dict) -> dict[str, list]:
    """Input name -> [type, options] in the order the editor creates widgets."""
    groups = class_info.get("input", {})
    order = class_info.get("input_order") or {group: list(groups.get(group, {})) for group in ("required", "optional")}
    specs = {}
    for group in ("required", "optional"):
        for name in order.get(group, []):
            spec = groups.get(group, {}).get(name)
            if spec is not None:
                specs[name] = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    return specs


def input_type(spec: list) -> str:
    kind = spec[0]
    return "COMBO" if isinstance(kind, list) else kind


def input_options(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec: list) -> bool:
    return input_type(spec) in WIDGET_TYPES and not input_options(spec).get("forceInput")


def check_node_types(prompt: dict, object_info: dict) -> None:
    """Refuses node types the server lacks before anything is queued (ComfyUI's own answer names
    only the first one, and gives no node_errors)."""
    unknown = [f"{describe(node_id, node, object_info)}" for node_id, node in prompt.items()
               if node.get("class_type") not in object_info]
    if unknown:
        raise QueueError(Exit.UNKNOWN_NODE,
                         f"the server has no node type for {', '.join(unknown)}. Install the custom node pack that "
                         f"provides it (ComfyUI-Manager: Install Missing Custom Nodes) and restart the server.")


def names_a_model(input_name: str, value) -> bool:
    """A model file name, or any value of an input known to name a model (files and folders)."""
    return isinstance(value, str) and (value.lower().endswith(MODEL_EXTENSIONS) or input_name in MODEL_FOLDERS)


def combo_options(spec: list) -> list | None:
    if isinstance(spec[0], list):
        return spec[0]
    return input_options(spec).get("options") if input_type(spec) == "COMBO" else None


def missing_model_message(node_id: str, node: dict, input_name: str, value: str, options: list | None,
                          object_info: dict) -> str:
    folder = "controlnext" if node.get("class_type") in CONTROLNEXT_LOADERS else MODEL_FOLDERS.get(input_name)
    where = f"ComfyUI/models/{folder}/" if folder else "the models folder this node reads"
    what, source = FOLDER_CONTENTS.get(folder, ("the file", ""))
    available = "" if options is None else \
        f" (the server has: {', '.join(options[:5])}{', ...' if len(options) > 5 else ''})" if options else \
        " (the server has none)"
    return (f"{describe(node_id, node, object_info)}: {input_name} '{value}' is not installed. Put {what} in "
            f"{where}{source} and refresh{available}.")


def missing_models(prompt: dict, object_info: dict) -> list[str]:
    """A message per model file the prompt names and the server does not list."""
    missing = []
    for node_id, node in prompt.items():
        specs = input_specs(object_info.get(node["class_type"], {}))
        for name, value in node["inputs"].items():
            options = combo_options(specs[name]) if name in specs else None
            if options is not None and names_a_model(name, value) and value not in options:
                missing.append(missing_model_message(node_id, node, name, value, options, object_info))
    return missing


def check_model_files(prompt: dict, object_info: dict) -> None:
    """Model files the server does not list, named before queueing: ComfyUI v0.3.64 does not
    check the lists of V3 nodes (this pack's among them), which would only fail when they run."""
    missing = missing_models(prompt, object_info)
    if missing:
        raise QueueError(Exit.MISSING_MODEL, "model files the workflow needs are not on the server:\n  "
                         + "\n  ".join(missing))


def api_prompt(workflow: dict, path: str, object_info: dict) -> dict:
    """The workflow read from ``path`` in API format, its node types checked against the server's."""
    if is_ui_format(workflow):
        prompt = ui_to_api(workflow, object_info)
        print(f"converted the UI-format workflow to API format ({len(prompt)} nodes)", file=sys.stderr)
        return prompt
    if all(isinstance(node, dict) and "class_type" in node for node in workflow.values()):
        check_node_types(workflow, object_info)
        return workflow
    raise QueueError(Exit.USAGE, f"{path} is neither a UI-format workflow (Save) nor an API-format one "
                                 f"(Export (API)).")


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """What the editor's "Export (API)" gives, computed from the saved UI file and /object_info."""
    if workflow.get("definitions", {}).get("subgraphs") or workflow.get("extra", {}).get("groupNodes"):
        raise QueueError(Exit.USAGE, "this workflow uses subgraphs or group nodes, which the command cannot "
                                     "convert: open it in the editor and use Export (API) instead.")
    nodes = {str(node["id"]): node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow.get("links") or [] if link}
    unknown = [f"node {node_id} '{node.get('title') or node['type']}' ({node['type']})"
               for node_id, node in nodes.items()
               if node["type"] not in object_info and node["type"] not in EDITOR_ONLY_NODES]
    if unknown:
        raise QueueError(Exit.UNKNOWN_NODE,
                         f"the server has no node type for {', '.join(unknown)}. Install the custom node pack that "
                         f"provides it (ComfyUI-Manager: Install Missing Custom Nodes) and restart the server.")

    def source(link_id, want_type):
        """(node id, output slot) feeding a link, through reroutes and bypassed nodes; None if muted."""
        seen = set()
        while link_id is not None and link_id in links and link_id not in seen:
            seen.add(link_id)
            _, origin_id, origin_slot, _, _, link_type = links[link_id][:6]
            origin = nodes.get(str(origin_id))
            if origin is None or origin.get("mode") == MODE_MUTED:
                return None
            if origin["type"] == "PrimitiveNode":
                return None  # its value is already the target widget's value
            if origin["type"] == "Reroute" or origin.get("mode") == MODE_BYPASSED:
                inputs = origin.get("inputs") or []
                same_type = [slot for slot in inputs if slot.get("type") in (want_type, link_type, "*")]
                candidates = ([inputs[origin_slot]] if origin_slot < len(inputs) and inputs[origin_slot] in same_type
                              else []) + same_type
                link_id = next((slot.get("link") for slot in candidates if slot.get("link") is not None), None)
                continue
            return [str(origin_id), origin_slot]
        return None

    prompt = {}
    for node_id, node in nodes.items():
        class_type = node["type"]
        if class_type in EDITOR_ONLY_NODES or node.get("mode") in (MODE_MUTED, MODE_BYPASSED):
            continue
        specs = input_specs(object_info[class_type])
        values = node.get("widgets_values")
        linked = {slot["name"]: slot for slot in node.get("inputs") or [] if slot.get("link") is not None}
        inputs = {}
        if isinstance(values, dict):  # some editors save widgets by name
            inputs.update({name: value for name, value in values.items() if name in specs and is_widget(specs[name])})
        else:
            queue = list(values or [])
            for name, spec in specs.items():
                if not is_widget(spec) or not queue:
                    continue
                inputs[name] = queue.pop(0)
                options = input_options(spec)
                follower = next((value for flag, value in UPLOAD_FLAGS.items() if options.get(flag)), None)
                if queue and input_type(spec) == "INT" and queue[0] in SEED_CONTROL_VALUES:
                    queue.pop(0)
                elif queue and follower is not None and queue[0] == follower:
                    queue.pop(0)
        for name, slot in linked.items():
            if name not in specs:
                raise QueueError(Exit.INVALID_PROMPT,
                                 f"node {node_id} ({class_type}) has an input '{name}' that the server's "
                                 f"{class_type} does not have (it has: {', '.join(specs)}). The node pack on the "
                                 f"server may be older or newer than the workflow.")
            origin = source(slot["link"], slot.get("type"))
            if origin is not None:
                inputs[name] = origin
            elif not is_widget(specs[name]):
                inputs.pop(name, None)
        title = node.get("title") or display_name(class_type, object_info)
        prompt[node_id] = {"inputs": inputs, "class_type": class_type, "_meta": {"title": title}}
    kept = set(prompt)
    for node in prompt.values():  # inputs from nodes that are not sent (muted) are dropped, as the editor does
        for name, value in list(node["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] not in kept:
                del node["inputs"][name]
    return prompt


def is_link(value, prompt: dict) -> bool:
    """An input that takes another node's output: [node id, output slot]."""
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] in prompt


def nodes_to_run(prompt: dict, object_info: dict, cached: frozenset[str] = frozenset()) -> set[str]:
    """The nodes a run of ``prompt`` goes through, gathered as ComfyUI's ExecutionList does: the
    output nodes, then the nodes their inputs link to, except through lazy inputs (such a node runs
    only if asked for) and not beyond a cached node (it is in the set, its inputs are not needed).
    The server reports each of them, by ``executing`` or in ``execution_cached``."""
    outputs = [node_id for node_id, node in prompt.items()
               if object_info.get(node.get("class_type"), {}).get("output_node")]
    found, pending = set(outputs), list(outputs)
    while pending:
        node_id = pending.pop()
        specs = input_specs(object_info.get(prompt[node_id].get("class_type"), {}))
        for name, value in prompt[node_id].get("inputs", {}).items():
            if not is_link(value, prompt) or value[0] in found or input_options(specs.get(name, [None])).get("lazy"):
                continue
            found.add(value[0])
            if value[0] not in cached:
                pending.append(value[0])
    return found


def find_node(prompt: dict, reference: str, object_info: dict) -> str:
    """A node by id, else by title, else by type when only one node has it."""
    if reference in prompt:
        return reference
    for key in ("title", "class_type"):
        matches = [node_id for node_id, node in prompt.items()
                   if (node.get("_meta", {}).get("title") if key == "title" else node.get("class_type")) == reference]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise QueueError(Exit.USAGE, f"'{reference}' names {len(matches)} nodes (ids {', '.join(matches)}): "
                                         f"use the node id instead.")
    listing = "; ".join(f"{node_id}: {node.get('_meta', {}).get('title') or node.get('class_type')}"
                        for node_id, node in prompt.items())
    raise QueueError(Exit.USAGE, f"no node '{reference}' in the workflow. Nodes are ({listing}).")


def allowed_values(spec: list) -> str:
    """What an input takes, in words: its type, range or choices."""
    kind, options = input_type(spec), input_options(spec)
    if kind in ("INT", "FLOAT"):
        low, high = options.get("min"), options.get("max")
        number = "a whole number" if kind == "INT" else "a number"
        if low is not None and high is not None:
            return f"{number} from {low} to {high}"
        return number + (f" of at least {low}" if low is not None else f" of at most {high}" if high is not None
                         else "")
    if kind == "BOOLEAN":
        return " / ".join(BOOLEAN_WORDS)
    choices = combo_options(spec)
    if choices is not None:
        more = f" and {len(choices) - CHOICES_SHOWN} more" if len(choices) > CHOICES_SHOWN else ""
        return "one of " + ", ".join(str(choice) for choice in choices[:CHOICES_SHOWN]) + more
    return f"any {kind}"


def parse_value(text: str, spec: list | None):
    kind = input_type(spec) if spec else None
    try:
        if kind == "INT":
            return int(text)
        if kind == "FLOAT":
            return float(text)
        if kind == "BOOLEAN":
            return BOOLEAN_WORDS[text.lower()]
    except (ValueError, KeyError):
        raise QueueError(Exit.USAGE, f"'{text}' is not a valid {kind} (allowed: {allowed_values(spec)}).") from None
    if kind in ("STRING", "COMBO"):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_assignment(assignment: str) -> tuple[str, str, str]:
    """``NODE.input=value`` -> (NODE, input, value text)."""
    target, equals, text = assignment.partition("=")
    reference, dot, name = target.rpartition(".")
    if not equals or not dot or not reference or not name:
        raise QueueError(Exit.USAGE, f"--set {assignment!r}: write NODE.input=value, e.g. --set KSampler.steps=20 "
                                     f"or --set 6.seed=42.")
    return reference, name, text


def parse_image(assignment: str) -> tuple[str, str]:
    """``NODE=path`` -> (NODE, path)."""
    reference, equals, path = assignment.partition("=")
    if not equals or not reference or not path:
        raise QueueError(Exit.USAGE, f"--image {assignment!r}: write NODE=path, e.g. --image 'Load Image=edges.png'.")
    return reference, path


def set_input(prompt: dict, reference: str, name: str, text: str, object_info: dict) -> str:
    """Sets one input of the node ``reference`` (id, title or unique type) from its text, converted
    to the input's type; returns the node's id."""
    node_id = find_node(prompt, reference, object_info)
    node = prompt[node_id]
    specs = input_specs(object_info.get(node["class_type"], {}))
    if name not in specs and name not in node["inputs"]:
        raise QueueError(Exit.USAGE, f"{describe(node_id, node, object_info)} has no input '{name}' "
                                     f"(it has: {', '.join(specs or node['inputs'])}).")
    current = node["inputs"].get(name)
    if is_link(current, prompt):
        raise QueueError(Exit.USAGE, f"{describe(node_id, node, object_info)}: input '{name}' is connected to node "
                                     f"{current[0]}; --set changes values, not connections.")
    node["inputs"][name] = parse_value(text, specs.get(name))
    return node_id


def check_value(node: dict, name: str, object_info: dict) -> None:
    """Refuses the input's value where the server would refuse the prompt: a number outside the
    input's min/max, or a value not among its choices. Model files are left to
    ``missing_models`` (their own message and exit code), and so are the inputs with an upload
    button: Load Image takes files the server received after it listed its choices."""
    spec = input_specs(object_info.get(node["class_type"], {})).get(name)
    if spec is None:
        return
    value, kind, options = node["inputs"][name], input_type(spec), input_options(spec)
    if kind in ("INT", "FLOAT"):
        low, high = options.get("min"), options.get("max")
        if not ((low is None or low <= value) and (high is None or value <= high)):  # NaN: outside any min or max
            raise QueueError(Exit.USAGE, f"{value} is out of range (allowed: {allowed_values(spec)}).")
        return
    choices = combo_options(spec)
    if choices is None or value in choices or names_a_model(name, value) or options.get("multiselect") \
            or any(options.get(flag) for flag in UPLOAD_FLAGS):
        return
    raise QueueError(Exit.USAGE, f"'{value}' is not one of the choices (allowed: {allowed_values(spec)}).")


def check_picture(path: str) -> None:
    """Refuses a file Load Image cannot read, by its first bytes (a table named in a picture's
    place would otherwise be uploaded, and fail each job on the server)."""
    try:
        with open(path, "rb") as file:
            start = file.read(12)
    except OSError as error:
        raise QueueError(Exit.USAGE, f"cannot read the image {path}: {error.strerror}") from None
    if not PICTURE_START.match(start):
        raise QueueError(Exit.USAGE, f"{path} is not a picture (allowed: PNG, JPEG, WEBP, GIF, BMP or TIFF files, "
                                     f"as Load Image reads).")


def image_node(prompt: dict, reference: str, object_info: dict) -> str:
    """The id of the node ``reference`` names, which must take an ``image`` (Load Image and the like)."""
    node_id = find_node(prompt, reference, object_info)
    node = prompt[node_id]
    if "image" not in input_specs(object_info.get(node["class_type"], {})) and "image" not in node["inputs"]:
        raise QueueError(Exit.USAGE, f"{describe(node_id, node, object_info)} has no 'image' input: --image is for "
                                     f"Load Image nodes.")
    return node_id
