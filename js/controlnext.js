/**
 * ControlNeXt in the graph editor: what a run found out, shown on the node itself.
 *
 * - Load ControlNeXt: the file's layout and parameter count (the node's "controlnext_info").
 * - Apply ControlNeXt: the model family and where the control went; ComfyUI itself shows the
 *   preview of the control image the node received (its "images" output).
 * - A ControlNeXt node that failed (say, an SD1.5 file on an SDXL model): the error message,
 *   in red on the node, not only in a dialog or the console.
 *
 * Only the frontend's public extension API: app.registerExtension, onExecuted, addDOMWidget
 * and api events.
 */
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPES = new Set(["ControlNeXtLoader", "ControlNeXtApply", "ControlNeXtUNetWeights"]);
const STATUS_WIDGET = "controlnext_status";
const LINE_HEIGHT = 15; // px, for the 12px monospace text below
const CHAR_WIDTH = 7.8; // a little wider than a glyph: lines wrap at word ends

/** Height that shows the whole text at the node's width, so nothing hides behind a scrollbar. */
function textHeight(node, text) {
  const perLine = Math.max(20, Math.floor((node.size[0] - 40) / CHAR_WIDTH));
  const lines = text.split("\n").reduce((sum, line) => sum + Math.max(1, Math.ceil(line.length / perLine)), 0);
  return 14 + LINE_HEIGHT * Math.ceil(lines * 1.2 + 1);
}

function statusWidget(node) {
  const existing = node.widgets?.find((widget) => widget.name === STATUS_WIDGET);
  if (existing) return existing;
  const element = document.createElement("div");
  element.className = "controlnext-status";
  Object.assign(element.style, {
    font: `12px/${LINE_HEIGHT}px monospace`,
    whiteSpace: "pre-wrap",
    overflowWrap: "anywhere",
    overflow: "auto",
    padding: "4px 6px",
    borderRadius: "4px",
    background: "rgba(0, 0, 0, 0.25)",
  });
  // Not a setting: never saved in the workflow nor sent with the prompt.
  const widget = node.addDOMWidget(STATUS_WIDGET, "controlnext_status", element, {
    serialize: false,
    getMinHeight: () => textHeight(node, element.textContent),
    getValue: () => element.textContent,
    setValue: () => {},
  });
  widget.serialize = false;
  return widget;
}

function showStatus(node, text, isError) {
  const widget = statusWidget(node);
  widget.element.textContent = text;
  widget.element.dataset.state = isError ? "error" : "ok";
  widget.element.style.color = isError ? "#ff7070" : "#a8e6a1";
  const [width, height] = node.computeSize();
  node.setSize([Math.max(node.size[0], width), Math.max(node.size[1], height)]);
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "ControlNeXt.NodeStatus",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const lines = output?.controlnext_info;
      if (lines?.length) showStatus(this, lines.join("\n"), false);
    };
  },

  setup() {
    api.addEventListener("execution_error", ({ detail }) => {
      const node = app.graph?.getNodeById(detail?.node_id);
      if (node && NODE_TYPES.has(node.comfyClass ?? node.type)) {
        showStatus(node, String(detail.exception_message ?? "").trim(), true);
      }
    });
  },
});
