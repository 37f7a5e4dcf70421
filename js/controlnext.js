/**
 * ControlNeXt in the graph editor: what a run found out, shown on the node itself.
 *
 * - Load ControlNeXt: which models the file is for and its size (the node's "controlnext_info"),
 *   the exact layout in the text's tooltip ("controlnext_detail").
 * - Apply ControlNeXt: the model family and where the control acted, in words; the exact
 *   injection point and block in the tooltip. ComfyUI itself shows the preview of the control
 *   image the node received (its "images" output).
 * - Train / Save ControlNeXt: how training ended (all steps, cancelled, or stopped where the loss
 *   diverged) and where the files were written.
 * - A ControlNeXt node that failed (say, an SD1.5 file on an SDXL model): the error message,
 *   in red on the node, not only in a dialog or the console.
 * - Before a run the status takes no room: these nodes open (and load from a saved workflow) at
 *   the height of their widgets, and every ControlNeXt node is wide enough for the labels of its
 *   file lists beside long file names such as "ControlAny-SDXL/anime_canny/controlnet.safetensors".
 *
 * Only the frontend's public extension API: app.registerExtension, onExecuted, nodeCreated,
 * loadedGraphNode, addDOMWidget and api events.
 */
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const CATEGORY = "ControlNeXt"; // the pack's node menu, and the start of its submenus
const NODE_TYPES = new Set(["ControlNeXtLoader", "ControlNeXtApply", "ControlNeXtUNetWeights", "ControlNeXtTrain",
  "ControlNeXtTrainSVD", "ControlNeXtSave"]);
const STATUS_WIDGET = "controlnext_status";
const LINE_HEIGHT = 15; // px, for the 12px monospace text below
const CHAR_WIDTH = 7.8; // a little wider than a glyph: lines wrap at word ends
// What the editor draws around a list widget's label and value: margins, arrow buttons, the gap.
const WIDGET_CHROME = 96;
const MAX_NODE_WIDTH = 600; // longer file names leave the value cut short, never the whole label

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

function showStatus(node, text, detail, isError) {
  const widget = statusWidget(node);
  widget.element.textContent = text;
  widget.element.title = detail;
  widget.element.dataset.state = isError ? "error" : "ok";
  widget.element.style.color = isError ? "#ff7070" : "#a8e6a1";
  const [width, height] = node.computeSize();
  node.setSize([Math.max(node.size[0], width), Math.max(node.size[1], height)]);
  node.setDirtyCanvas(true, true);
}

let measuringContext;

/** Width of a widget's text in the font the editor draws widgets with. */
function widgetTextWidth(text) {
  measuringContext ??= document.createElement("canvas").getContext("2d");
  measuringContext.font = app.canvas.inner_text_font;
  return measuringContext.measureText(String(text)).width;
}

/** Widens the node until each list widget shows its whole label beside its value. */
function fitListWidgets(node) {
  const needed = (node.widgets ?? [])
    .filter((widget) => widget.type === "combo")
    .map((widget) => WIDGET_CHROME + widgetTextWidth(widget.label || widget.name) + widgetTextWidth(widget.value));
  const width = Math.min(MAX_NODE_WIDTH, Math.max(node.size[0], ...needed));
  if (width > node.size[0]) node.setSize([width, node.size[1]]);
}

/** The height of the node's widgets: no empty room kept for a status that only a run shows. */
function fitHeightToWidgets(node) {
  node.setSize([node.size[0], node.computeSize()[1]]);
}

const OUR_TYPES = new Set(); // every node of the pack's menu, filled as the editor registers them

function isOurs(node) {
  return OUR_TYPES.has(node.comfyClass ?? node.type);
}

app.registerExtension({
  name: "ControlNeXt.NodeStatus",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.category?.startsWith(CATEGORY)) OUR_TYPES.add(nodeData.name);
    if (!NODE_TYPES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const lines = output?.controlnext_info;
      if (lines?.length) showStatus(this, lines.join("\n"), (output.controlnext_detail ?? []).join("\n"), false);
    };
  },

  nodeCreated(node) {
    if (!isOurs(node)) return;
    for (const widget of node.widgets ?? []) {
      if (widget.type !== "combo") continue;
      const callback = widget.callback;
      widget.callback = function () {
        const result = callback?.apply(this, arguments);
        fitListWidgets(node);
        return result;
      };
    }
    fitListWidgets(node);
  },

  loadedGraphNode(node) {
    if (!isOurs(node)) return;
    if (NODE_TYPES.has(node.comfyClass ?? node.type)) fitHeightToWidgets(node);
    fitListWidgets(node);
  },

  setup() {
    api.addEventListener("execution_error", ({ detail }) => {
      const node = app.graph?.getNodeById(detail?.node_id);
      if (node && NODE_TYPES.has(node.comfyClass ?? node.type)) {
        showStatus(node, String(detail.exception_message ?? "").trim(), "", true);
      }
    });
  },
});
