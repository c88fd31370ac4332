import os
import sys

import pytest
import torch

# tests/tiny.py and friends are plain modules next to the tests.
sys.path.insert(0, os.path.dirname(__file__))
# No test may reach the network: the Hub is only ever a local cache here.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The models here are tiny: a second thread buys nothing and, on a shared 2-core machine,
# makes every small op wait for a busy core.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# -- versions, and the newest-releases check (.ci/newest) -------------------------------------------

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
NEWEST_CHECK = os.environ.get("LORA_LOADER_NEWEST_CHECK") == "1"
_oracle_broken: list[tuple[str, str]] = []


def _raised_in_oracle(excinfo) -> bool:
    return any(any(p in str(entry.path) for p in _ORACLE_PATHS) for entry in excinfo.traceback)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    # Only in the newest-releases check: a test whose oracle broke tells nothing about lora_loader,
    # so it is reported apart (skipped with the oracle's error) and the run stays about lora_loader.
    if NEWEST_CHECK and report.failed and call.excinfo is not None and _raised_in_oracle(call.excinfo):
        message = call.excinfo.exconly().splitlines()[0][:200]
        _oracle_broken.append((item.nodeid, message))
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"oracle broke on these releases: {message}")


def pytest_terminal_summary(terminalreporter):
    if not NEWEST_CHECK:
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
