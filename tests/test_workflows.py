"""The GitHub Actions workflows (.github/workflows/) are valid before a runner ever sees them.

* every workflow validates against GitHub's workflow schema (check-jsonschema's vendored copy,
  as ``make lint`` runs it), and a copy with a misspelt key does not (the check can fail);
* every ``run:`` step passes shellcheck (``${{ ... }}`` expressions replaced by a placeholder);
* ci.yml runs ``.ci/run`` and builds without the CUDA extension (a hosted runner has no nvcc);
  gpu.yml takes the runner's labels as an input, builds the CUDA extension and runs the gpu
  tests, the static gate, compute-sanitizer and moe-bench with its outputs uploaded.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = os.path.join(ROOT, ".github", "workflows")
FILES = sorted(
    os.path.join(WORKFLOWS, f) for f in os.listdir(WORKFLOWS) if f.endswith((".yml", ".yaml"))
)

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install .[bench])")


def _tool(name: str) -> str:
    path = shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):
        pytest.skip(f"{name} is not installed (pip install .[test])")
    return path


def _load(path: str) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _schema_check(paths: list[str]) -> subprocess.CompletedProcess:
    tool = _tool("check-jsonschema")
    return subprocess.run(
        [tool, "--builtin-schema", "vendor.github-workflows", *paths],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_workflows_exist():
    names = {os.path.basename(f) for f in FILES}
    assert {"ci.yml", "gpu.yml"} <= names


def test_schema_valid_and_can_fail(tmp_path):
    res = _schema_check(FILES)
    assert res.returncode == 0, res.stdout + res.stderr
    bad = tmp_path / "bad.yml"
    with open(os.path.join(WORKFLOWS, "ci.yml")) as f:
        bad.write_text(f.read().replace("runs-on:", "runs_on:", 1))
    res = _schema_check([str(bad)])
    assert res.returncode != 0, "a misspelt key passed the schema check"


def _run_steps(path: str):
    for job_name, job in _load(path)["jobs"].items():
        for i, step in enumerate(job.get("steps", [])):
            if "run" in step:
                yield f"{os.path.basename(path)}:{job_name}:{step.get('name', i)}", step["run"]


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_run_steps_pass_shellcheck(path, tmp_path):
    tool = _tool("shellcheck")
    for label, script in _run_steps(path):
        text = re.sub(r"\$\{\{.*?\}\}", "EXPR", script)
        f = tmp_path / "step.sh"
        f.write_text("#!/usr/bin/env bash\nset -e\n" + text)
        res = subprocess.run(
            [tool, "-s", "bash", str(f)], capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 0, f"{label}:\n{res.stdout}{res.stderr}"


def _all_run_text(path: str) -> str:
    return "\n".join(script for _, script in _run_steps(path))


def test_ci_workflow_runs_ci_script_without_cuda():
    wf = _load(os.path.join(WORKFLOWS, "ci.yml"))
    job = wf["jobs"]["test"]
    assert job["env"]["MOE_KERNELS_BUILD_CUDA"] == "0"
    assert "bash .ci/run" in _all_run_text(os.path.join(WORKFLOWS, "ci.yml"))


def test_gpu_workflow_steps():
    path = os.path.join(WORKFLOWS, "gpu.yml")
    wf = _load(path)
    # PyYAML reads the key "on" as True
    triggers = wf.get("on", wf.get(True))
    assert "runner-labels" in triggers["workflow_dispatch"]["inputs"]
    job = wf["jobs"]["gpu"]
    assert job["runs-on"] == "${{ fromJSON(inputs.runner-labels) }}"
    assert job["env"]["MOE_KERNELS_BUILD_CUDA"] == "1"
    text = _all_run_text(path)
    for needed in ("make install", "make test-gpu", "make gate", "make test-sanitizer"):
        assert needed in text, needed
    assert "moe-bench" in text and "--json" in text and "--plot" in text
    uploads = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/upload")]
    assert uploads and "moe-bench-gpu.json" in uploads[0]["with"]["path"]
