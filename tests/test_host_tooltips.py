"""Every input and output of every node of the pack has a tooltip, read from what /object_info
serves for it (``GET_NODE_INFO_V1``, the same call the server makes per node)."""
from __future__ import annotations

import asyncio

import host

pack_nodes = host.importlib.import_module(f"{host.PACK_NAME}.nodes")


def missing_tooltips(info: dict) -> list[str]:
    missing = [f"input {name}" for group in ("required", "optional")
               for name, spec in info["input"].get(group, {}).items() if not spec[1].get("tooltip")]
    tooltips = info.get("output_tooltips") or [None] * len(info["output"])
    return missing + [f"output {name}" for name, tooltip in zip(info["output_name"], tooltips) if not tooltip]


def test_every_input_and_output_of_every_node_has_a_tooltip():
    node_list = asyncio.run(pack_nodes.comfy_entrypoint().get_node_list())
    infos = [node.GET_NODE_INFO_V1() for node in node_list]
    missing = {info["name"]: names for info in infos if (names := missing_tooltips(info))}
    assert not missing
