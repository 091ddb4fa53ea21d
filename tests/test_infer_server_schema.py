"""A bounded schemathesis run against /openapi.json of the live server: no 5xx, every response
conforms to the published schema, status code and content type (issue 16). About 20 s here."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_post import tiny_server

from codefoundry.infer.server import ServerLimits

CLI = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
pytestmark = pytest.mark.skipif(not Path(CLI).exists(), reason="schemathesis is not installed (the dev extra has it)")
CHECKS = "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance"


def test_schemathesis_finds_no_server_error_or_schema_violation(tmp_path):
    with tiny_server(ServerLimits(max_tokens=16, default_max_tokens=16)) as (url, engine, _, _):
        run = subprocess.run([CLI, "run", url + "/openapi.json", "--checks", CHECKS, "--max-examples", "30",
                              "--generation-deterministic", "--no-color"],
                             capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:]
    assert "No issues found" in run.stdout or "passed" in run.stdout.split("SUMMARY")[-1]
