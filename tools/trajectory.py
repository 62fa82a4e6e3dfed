"""A candidate's trajectory is its chat: the prompt, the model's answers, and every
step as an OpenAI-style tool call with its result.

The steps are `propose_diff` (the model's answer), `apply_diff`, `check_novelty`,
`human_review` (under `search.review`: a person's verdict, reason and edit) and
`proxy_train`. A repair is a user turn that feeds the apply error back,
followed by a new `propose_diff`. The message list is trainable as it stands
(TRL's `messages` + `tools` format).
"""
from __future__ import annotations

import json
from typing import Any

TOOL_SCHEMAS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "propose_diff",
        "description": "Propose a change to model.py as a unified diff (or, in full mode, the whole file).",
        "parameters": {"type": "object", "properties": {"diff": {"type": "string"}}, "required": ["diff"]}}},
    {"type": "function", "function": {
        "name": "apply_diff",
        "description": "Apply the proposed diff to the parent network and check the result compiles.",
        "parameters": {"type": "object", "properties": {"target": {"type": "string"}}, "required": ["target"]}}},
    {"type": "function", "function": {
        "name": "check_novelty",
        "description": "MinHash-Jaccard similarity of the new network to its parent and to the archive.",
        "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {
        "name": "proxy_train",
        "description": "Train the new network for one epoch in the sandbox and score it on the test split.",
        "parameters": {"type": "object", "properties": {"dataset": {"type": "string"}, "epochs": {"type": "integer"}},
                       "required": ["dataset", "epochs"]}}},
    {"type": "function", "function": {
        "name": "human_review",
        "description": "Ask a person whether to train the candidate: yes, no (with a reason), or their own edit.",
        "parameters": {"type": "object", "properties": {}}}},
]


def tool_step(messages: list[dict[str, Any]], name: str, arguments: dict[str, Any],
              result: dict[str, Any]) -> list[dict[str, Any]]:
    """A new message list with one tool call and its result appended (the input is not mutated)."""
    call_id = f"call_{sum(1 for m in messages if m.get('role') == 'tool')}"
    return [
        *messages,
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "name": name, "content": json.dumps(result, sort_keys=True)},
    ]


def proposal_step(messages: list[dict[str, Any]], completion: str) -> list[dict[str, Any]]:
    """The model's answer, recorded as its `propose_diff` call."""
    return tool_step(messages, "propose_diff", {"diff": completion}, {"received": True,
                                                                      "lines": completion.count("\n") + 1})


def chat_view(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The plain chat a model sees when asked to repair: the system and user turns, and
    its own earlier answers as assistant turns. Environment steps are left out (the
    repair turn restates the error), so any chat template can render it."""
    out: list[dict[str, str]] = []
    for m in messages:
        if m["role"] in ("system", "user"):
            out.append({"role": m["role"], "content": m["content"]})
        elif m["role"] == "assistant":
            for call in m.get("tool_calls") or []:
                if call["function"]["name"] == "propose_diff":
                    out.append({"role": "assistant", "content": call["function"]["arguments"]["diff"]})
            if m.get("content"):
                out.append({"role": "assistant", "content": m["content"]})
    return out


def human_verdict(messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last `human_review` result of a trajectory ({"verdict", "reason", "by"[, "diff"]}),
    if the model's last answer was reviewed; None otherwise."""
    names = {}
    found = None
    for m in messages:
        for call in m.get("tool_calls") or []:
            names[call["id"]] = call["function"]["name"]
            if call["function"]["name"] == "propose_diff":
                found = None  # a later answer: an earlier verdict is not about it
        if m.get("role") == "tool" and names.get(m.get("tool_call_id")) == "human_review":
            found = json.loads(m["content"])
    return found
