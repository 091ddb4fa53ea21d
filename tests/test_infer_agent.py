"""The agent loop, driven by scripted stub policies: every tool, refusals, bad calls, step limit."""

from __future__ import annotations

import json

from codefoundry.infer.agent import Agent, ModelPolicy
from codefoundry.infer.chat import Reply
from codefoundry.infer.engine import SamplingParams
from codefoundry.infer.tools import Workspace
from codefoundry.checkpoint import load_model
from helpers_post import tiny_checkpoint


def call(name: str, **arguments: str) -> Reply:
    return Reply("", json.dumps({"name": name, "arguments": arguments}), "tool_calls", 0, 0)


def answer(text: str) -> Reply:
    return Reply(text, None, "stop", 0, 0)


class Scripted:
    """Replays replies in order and records the conversation it was shown each time."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies, self.seen = list(replies), []

    def __call__(self, messages):
        self.seen.append([dict(m) for m in messages])
        return self.replies.pop(0)


def test_every_tool_and_refusal(tmp_path):
    asked = []
    ws = Workspace(tmp_path, confirm=lambda command: asked.append(command) or command.startswith("python3"))
    policy = Scripted([
        call("write_file", path="app.py", content="print(6 * 7)\n"),
        call("read_file", path="app.py"),
        call("edit_file", path="app.py", old="6 * 7", new="6 * 8"),
        call("bash", command="python3 app.py"),
        call("bash", command="rm -rf /"),  # declined by the user
        call("read_file", path="../../etc/passwd"),  # outside the workspace
        Reply("", "{not json", "tool_calls", 0, 0),
        call("launch_missiles"),
        answer("app.py prints 48."),
    ])
    result = Agent(policy, ws, max_steps=10).run("make app.py print 48")
    assert result.stop_reason == "done" and result.steps == 8 and result.answer == "app.py prints 48."
    outputs = [text for kind, text in result.events if kind == "tool_result"]
    assert outputs[0].startswith("wrote") and outputs[1] == "print(6 * 7)\n" and outputs[2].startswith("edited")
    assert outputs[3] == "48\n[exit code 0]"
    assert outputs[4] == "error: the user declined to run this command"
    assert "outside the workspace" in outputs[5]
    assert outputs[6].startswith("error: tool call is not valid JSON")
    assert "unknown tool" in outputs[7]
    assert asked == ["python3 app.py", "rm -rf /"]
    # Each result went back to the policy as a tool message after the call.
    last_seen = policy.seen[-1]
    assert [m["role"] for m in last_seen[:4]] == ["system", "user", "assistant", "tool"]
    assert last_seen[-1] == {"role": "tool", "content": outputs[-1]}


def test_step_limit_ends_runaway_loop(tmp_path):
    policy = Scripted([call("read_file", path="x")] * 10)
    result = Agent(policy, Workspace(tmp_path), max_steps=3).run("loop forever")
    assert result.stop_reason == "step_limit" and result.steps == 3 and len(policy.seen) == 4


def test_model_policy_runs_and_stops(tmp_path):
    model, tok = load_model(tiny_checkpoint())
    policy = ModelPolicy(model, tok, SamplingParams(max_tokens=8))
    result = Agent(policy, Workspace(tmp_path), max_steps=2).run("say hi")
    assert result.stop_reason in ("done", "step_limit", "context_full")
    assert result.messages[1] == {"role": "user", "content": "say hi"}
