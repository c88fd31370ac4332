"""The newest-releases check (``.ci/newest``, README "Tested with, and newer releases"): a failure raised
inside an oracle (peft, LyCORIS, the frameworks' peft glue) is reported apart as the oracle breaking;
any other failure stays a failure. The check itself installs the newest releases into a fresh venv,
too slow for the suite; this tests the triage it relies on and what the script runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TESTS = '''
import sys
sys.path.insert(0, {oracle_root!r})
from peft.boom import explode      # a stand-in 'peft' package under a site-packages folder

def test_oracle_breaks():
    explode()

def test_lora_loader_breaks():
    assert 1 == 2, "lora_loader's own failure"

def test_passes():
    pass
'''


def run(tmp_path: Path, newest: bool) -> subprocess.CompletedProcess:
    oracle_root = tmp_path / "venv" / "site-packages"
    (oracle_root / "peft").mkdir(parents=True)
    (oracle_root / "peft" / "__init__.py").write_text("")
    (oracle_root / "peft" / "boom.py").write_text("def explode():\n    raise ValueError('peft refuses this transformers')\n")
    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "test_sample.py").write_text(TESTS.format(oracle_root=str(oracle_root)))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"), LORA_LOADER_NEWEST_CHECK="1" if newest else "0")
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "newest_check", "-q", "-rs", "test_sample.py"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=120)


def test_in_the_newest_check_an_oracle_failure_is_reported_apart_and_other_failures_still_fail(tmp_path):
    result = run(tmp_path, newest=True)
    out = result.stdout
    assert result.returncode == 1, out  # lora_loader's own failure still fails the run
    assert "1 failed, 1 passed, 1 skipped" in out, out
    assert "oracle broke on these releases: ValueError: peft refuses this transformers" in out, out
    assert "1 tests could not run their oracle" in out and "test_oracle_breaks" in out, out
    assert "versions: torch" in out, out


def test_outside_the_newest_check_an_oracle_failure_is_a_failure(tmp_path):
    result = run(tmp_path, newest=False)
    assert "2 failed, 1 passed" in result.stdout, result.stdout


def test_the_newest_check_script_upgrades_the_four_packages_in_a_fresh_venv_and_runs_the_suite_in_triage_mode():
    script = ROOT / ".ci" / "newest"
    text = script.read_text()
    assert os.access(script, os.X_OK)
    assert "python3 -m venv" in text and "torch==2.13.0" in text
    assert "-U diffusers transformers accelerate huggingface_hub" in text
    assert "LORA_LOADER_NEWEST_CHECK=1" in text and "-m pytest" in text
    assert "constraints.txt" not in text.split("\n# ")[-1].split("set -uo")[1]  # newest, not pinned
