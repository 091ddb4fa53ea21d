"""The coding agent: a policy proposes tool calls, the workspace runs them, results go back.

The policy is any callable from the conversation so far to the next :class:`Reply`;
:class:`ModelPolicy` asks a checkpoint (tool calls are JSON between the tool-call tokens,
results return between the tool-output tokens, see :mod:`codefoundry.tokenizer.chat`),
and tests drive the same loop with scripted stub policies. The loop ends when the policy
answers without a tool call, when the step limit is reached (runaway loops), or when the
conversation no longer fits the model's context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from codefoundry.infer.chat import Reply, assistant_reply
from codefoundry.infer.engine import RequestRejected, SamplingParams, run_batch
from codefoundry.infer.tools import AGENT_SYSTEM_PROMPT, Workspace
from codefoundry.tokenizer.chat import parse_tool_call

Policy = Callable[[list[dict[str, Any]]], Reply]
# on_event(kind, text): kind is "assistant", "tool_call" or "tool_result"; for showing progress.
OnEvent = Callable[[str, str], None]


@dataclass
class AgentResult:
    messages: list[dict[str, Any]]
    steps: int  # tool calls made
    stop_reason: str  # "done" | "step_limit" | "context_full"
    answer: str = ""
    events: list[tuple[str, str]] = field(default_factory=list)


class ModelPolicy:
    """A checkpoint as the agent's policy; ``on_text`` receives its text as it streams."""

    def __init__(self, model, tok, params: SamplingParams | None = None,
                 on_text: Callable[[str], None] | None = None) -> None:
        self.model, self.tok = model, tok
        self.params = params or SamplingParams(max_tokens=512)
        self.on_text = on_text

    def __call__(self, messages: list[dict[str, Any]]) -> Reply:
        return assistant_reply(self.tok, messages, self.params, lambda r: run_batch(self.model, self.tok, [r]),
                               self.model.cfg.max_seq_len, self.on_text)


class Agent:
    def __init__(self, policy: Policy, workspace: Workspace, max_steps: int = 20,
                 on_event: OnEvent | None = None) -> None:
        self.policy, self.workspace, self.max_steps = policy, workspace, max_steps
        self.on_event = on_event or (lambda kind, text: None)

    def run(self, task: str, system: str = AGENT_SYSTEM_PROMPT) -> AgentResult:
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}, {"role": "user", "content": task}]
        events: list[tuple[str, str]] = []

        def event(kind: str, text: str) -> None:
            events.append((kind, text))
            self.on_event(kind, text)

        steps = 0
        while True:
            try:
                reply = self.policy(messages)
            except RequestRejected:
                return AgentResult(messages, steps, "context_full", events=events)
            if reply.tool_call is None:
                messages.append({"role": "assistant", "content": reply.content})
                event("assistant", reply.content)
                return AgentResult(messages, steps, "done", reply.content, events)
            if steps >= self.max_steps:
                event("assistant", reply.content)
                return AgentResult(messages, steps, "step_limit", events=events)
            steps += 1
            try:
                name, arguments = parse_tool_call(reply.tool_call)
                result = self.workspace.run(name, arguments)
            except ValueError as exc:
                name, arguments, result = "invalid", {"raw": reply.tool_call}, f"error: {exc}"
            event("tool_call", reply.tool_call)
            event("tool_result", result)
            messages.append({"role": "assistant", "content": reply.content,
                             "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]})
            messages.append({"role": "tool", "content": result})
