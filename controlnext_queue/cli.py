"""queue WORKFLOW.json --server URL [--set NODE.input=value ...] [--image NODE=path ...] --out DIR [--previews]

Queues a ComfyUI workflow headless, shows progress, and downloads what it saved. The exit code
says what happened (see ``Exit``), so scripts can react without parsing text. ``queue batch ...``
runs a jobs file over several servers (batch.py); both queue through submission.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .batch import main as batch_main
from .client import ComfyClient
from .errors import Exit, QueueError
from .submission import check_outcome, output_files, submit, wait
from .websocket import WebSocket
from .workflow import (api_prompt, check_model_files, check_picture, describe, image_node, load_workflow,
                       parse_assignment, parse_image, set_input)

PREVIEW_FOLDER = "previews"  # under --out, for --previews


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m controlnext_queue",
        description="Queue a ComfyUI workflow (API or UI format) on a running server, show progress per node, "
                    "and download its saved images.",
        epilog="Exit codes: 0 success, 2 usage, 3 server unreachable, 4 workflow refused (node_errors), "
               "5 unknown node type, 6 model file missing on the server, 7 a node failed, 8 interrupted, "
               "9 connection lost while running, 10 --timeout passed, 130 Ctrl-C. Many jobs over several servers: "
               "python -m controlnext_queue batch --help.")
    parser.add_argument("workflow", help="workflow JSON: API format (Export (API)) or UI format (Save); a UI file "
                                         "is converted with the server's /object_info")
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI address (default %(default)s)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="NODE.input=value",
                        help="set an input; NODE is a node id, a title, or a node type used once "
                             "(e.g. --set KSampler.steps=20 --set '6.text=a red fox'). Repeatable")
    parser.add_argument("--image", dest="images", action="append", default=[], metavar="NODE=path",
                        help="upload a local image and use it in that Load Image node. Repeatable")
    parser.add_argument("--out", help="folder for the downloaded outputs (created if missing)")
    parser.add_argument("--previews", action="store_true",
                        help=f"also download the preview images (what the editor shows on nodes such as Preview Image "
                             f"and Apply ControlNeXt) into OUT/{PREVIEW_FOLDER}/; without it they stay in the server's "
                             f"temp folder, which ComfyUI empties when it restarts")
    parser.add_argument("--save-api", metavar="FILE",
                        help="write the API-format workflow (after --set/--image) to FILE and exit without queueing")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="give up waiting after this long (the prompt stays queued on the server)")
    args = parser.parse_args(argv)
    if not args.out and not args.save_api:
        parser.error("--out DIR is required (or --save-api FILE to only convert)")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["batch"]:
        return batch_main(argv[1:])
    args = parse_args(argv)
    try:
        return run(args)
    except QueueError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return int(error.code)
    except KeyboardInterrupt:
        print("stopped waiting (Ctrl-C); the prompt stays queued on the server", file=sys.stderr)
        return Exit.CTRL_C


def run(args) -> int:
    assignments = [parse_assignment(text) for text in args.assignments]
    images = [parse_image(text) for text in args.images]
    for _, path in images:
        check_picture(path)
    workflow = load_workflow(args.workflow)
    client = ComfyClient(args.server)
    object_info = client.object_info()
    prompt = api_prompt(workflow, args.workflow, object_info)
    for reference, path in images:
        node_id = image_node(prompt, reference, object_info)
        prompt[node_id]["inputs"]["image"] = client.upload_image(path)
        print(f"uploaded {path} for {describe(node_id, prompt[node_id], object_info)} "
              f"as {prompt[node_id]['inputs']['image']}", file=sys.stderr)
    for reference, name, text in assignments:
        set_input(prompt, reference, name, text, object_info)
    if args.save_api:
        with open(args.save_api, "w", encoding="utf-8") as file:
            json.dump(prompt, file, indent=2)
        print(f"wrote {args.save_api}", file=sys.stderr)
        return Exit.OK

    check_model_files(prompt, object_info)
    websocket = connect_websocket(client)
    prompt_id = submit(client, prompt, object_info)
    print(f"queued prompt {prompt_id} ({len(prompt)} nodes) on {client.server}", file=sys.stderr)
    entry = wait(client, websocket, prompt_id, prompt, object_info, args.timeout)
    return finish(client, entry, prompt_id, prompt, object_info, args.out, args.previews)


def connect_websocket(client: ComfyClient) -> WebSocket | None:
    try:
        return WebSocket.connect(client.websocket_url)
    except (OSError, ValueError) as error:
        print(f"no progress: the websocket did not open ({error}); polling /history instead", file=sys.stderr)
        return None


def finish(client: ComfyClient, entry: dict, prompt_id: str, prompt: dict, object_info: dict, out: str,
           download_previews: bool) -> int:
    check_outcome(entry, prompt_id, prompt, object_info)
    os.makedirs(out, exist_ok=True)
    results, previews = output_files(entry)
    saved = [client.download(file, out) for file in results]
    preview_folder = os.path.join(out, PREVIEW_FOLDER)
    preview_count = sum(len(files) for files in previews.values())
    if download_previews:
        saved += [client.download(file, preview_folder) for files in previews.values() for file in files]
    for path in saved:
        print(path)
    summary = f"done: {len(results)} file(s) in {out}" if results else "done, but the workflow saved no files"
    if previews and download_previews:
        summary += f"; {preview_count} preview image(s) in {preview_folder}"
    elif previews:
        sources = ", ".join(describe(node_id, prompt.get(node_id, {}), object_info) for node_id in previews)
        summary += (f"\nnot downloaded: {preview_count} preview image(s) from {sources}. Previews are what the "
                    f"editor shows on a node; the server keeps them in its temp folder until it restarts. "
                    f"--previews downloads them into {preview_folder}")
    print(summary, file=sys.stderr)
    return Exit.OK
