"""pytest hooks for the versions header and the newest-releases check (``.ci/newest``).

Imported by conftest.py; also loadable as a plugin (``-p newest_check``), which is how its test runs it.
"""

from __future__ import annotations

import os

import pytest


_VERSIONED = ("torch", "diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "safetensors", "tokenizers")


def pytest_report_header(config):
    from importlib.metadata import PackageNotFoundError, version

    def installed(package):
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return "versions: " + ", ".join(f"{p} {installed(p)}" for p in _VERSIONED)


# Where an oracle's own code lives: peft and LyCORIS, and the glue diffusers and transformers keep
# around peft. A failure raised inside these is the oracle breaking on a new upstream release, not
# lora_loader; lora_loader never runs this code (it never imports peft).
_ORACLE_PATHS = (
    os.sep + os.path.join("site-packages", "peft") + os.sep,
    os.sep + os.path.join("site-packages", "lycoris") + os.sep,
    os.path.join("transformers", "integrations", "peft.py"),
    os.path.join("transformers", "utils", "peft_utils.py"),
    os.path.join("diffusers", "loaders", "peft.py"),
    os.path.join("diffusers", "utils", "peft_utils.py"),
)
_oracle_broken: list[tuple[str, str]] = []


def newest_check() -> bool:
    return os.environ.get("LORA_LOADER_NEWEST_CHECK") == "1"


def _raised_in_oracle(excinfo) -> bool:
    return any(any(p in str(entry.path) for p in _ORACLE_PATHS) for entry in excinfo.traceback)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    # Only in the newest-releases check: a test whose oracle broke tells nothing about lora_loader,
    # so it is reported apart (skipped with the oracle's error) and the run stays about lora_loader.
    if newest_check() and report.failed and call.excinfo is not None and _raised_in_oracle(call.excinfo):
        message = call.excinfo.exconly().splitlines()[0][:200]
        _oracle_broken.append((item.nodeid, message))
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"oracle broke on these releases: {message}")


def pytest_terminal_summary(terminalreporter):
    if not newest_check():
        return
    terminalreporter.section("newest-releases check")
    terminalreporter.write_line(pytest_report_header(None))
    if not _oracle_broken:
        terminalreporter.write_line("every oracle (peft, LyCORIS, diffusers' and transformers' peft glue) ran")
        return
    by_message: dict[str, list[str]] = {}
    for nodeid, message in _oracle_broken:
        by_message.setdefault(message, []).append(nodeid)
    terminalreporter.write_line(f"{len(_oracle_broken)} tests could not run their oracle (not lora_loader's failures):")
    for message, nodeids in sorted(by_message.items(), key=lambda kv: -len(kv[1])):
        terminalreporter.write_line(f"  {len(nodeids):4d} x {message}")
        for nodeid in nodeids[:3]:
            terminalreporter.write_line(f"         e.g. {nodeid}")
