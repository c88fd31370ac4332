"""Multi-process training (issue 7, part 3): examples/train_multiprocess.py on 2 CPU processes (DDP over gloo).

The example runs in subprocesses, once launched by accelerate on two processes and
once as a plain single process, with the same global batch and seed. What is specified:
- the two adapters are equal within fp32 tolerance (DDP averages the adapter's
  gradients), and neither equals what one process trained on its own half of each
  batch would save (what a model whose adapter DDP does not synchronise would give);
- training moved the adapter away from its initialisation;
- only the main process saves: a spy around ``save_adapter`` records every call
  from every process, and the folder holds exactly PEFT's two files;
- the folder loads in peft onto the same base with the same logits as
  lora_loader's ``load_adapter``.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import socket
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

import lora_loader

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "train_multiprocess.py"
STEPS, GLOBAL_BATCH, SEED, LR = 20, 8, 3, 0.1
ARGS = ["--steps", str(STEPS), "--global-batch", str(GLOBAL_BATCH), "--seed", str(SEED), "--lr", str(LR)]
PREFIX = "base_model.model."
TOL = dict(atol=1e-5, rtol=1e-4)

# Runs the example as __main__ and records, per process, every save_adapter call and that the process finished.
SPY = """
import json, os, runpy, sys
from lora_loader.model import LoraModelMixin

log_dir, example = sys.argv.pop(1), sys.argv.pop(1)
rank = os.environ.get("RANK", "0")
save_adapter = LoraModelMixin.save_adapter

def record(event):
    with open(os.path.join(log_dir, f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps(event) + "\\n")

def spy(self, path, *args, **kwargs):
    from accelerate import PartialState
    state = PartialState()
    record({"save": str(path), "process_index": state.process_index, "num_processes": state.num_processes})
    return save_adapter(self, path, *args, **kwargs)

LoraModelMixin.save_adapter = spy
sys.argv[0] = example
runpy.run_path(example, run_name="__main__")
record({"finished": True})
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="",
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
        HF_HOME=str(home),  # no accelerate config of this machine's user applies
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def read_log(log_dir: Path) -> dict[str, list[dict]]:
    return {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in sorted(log_dir.glob("*.jsonl"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both runs at once (each is mostly imports): two processes launched by accelerate, and one plain process."""
    root = tmp_path_factory.mktemp("multiprocess")
    spy = root / "spy.py"
    spy.write_text(SPY)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    commands = {"two": launch, "one": [sys.executable]}
    procs = {}
    for name, prefix in commands.items():
        run_dir = root / name
        (run_dir / "log").mkdir(parents=True)
        cmd = [*prefix, str(spy), str(run_dir / "log"), str(EXAMPLE), "--out", str(run_dir / "adapter"), *ARGS]
        # stdin from /dev/null: under pytest-xdist the worker's stdin is its execnet channel, and a DDP worker that
        # inherits it hung at exit (rank 0 saved and finished, rank 1 never did) on every xdist run on a 2-core box.
        procs[name] = subprocess.Popen(cmd, cwd=root, env=clean_env(root / "hf_home"), stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        outputs = {name: proc.communicate(timeout=300)[0] for name, proc in procs.items()}
    finally:  # a run that hangs (say, a worker waiting for a peer that died) takes its workers down with it
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    out = {}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name} process run failed:\n{outputs[name][-4000:]}"
        out[name] = {"dir": root / name, "output": outputs[name], "log": read_log(root / name / "log")}
    return out


def saved(run) -> dict[str, torch.Tensor]:
    return load_file(str(run["dir"] / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def example():
    return runpy.run_path(str(EXAMPLE))


def train_in_process(example, rows: int) -> dict[str, torch.Tensor]:
    """The example's loop in this process, on the first ``rows`` rows of each step's global batch."""
    model = example["build_model"](SEED)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    data = example["make_data"](STEPS * GLOBAL_BATCH, SEED)
    for step in range(STEPS):
        ids = data[step * GLOBAL_BATCH : step * GLOBAL_BATCH + rows]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {PREFIX + k: v.clone() for k, v in model.get_adapter_state_dict().items()}


def assert_same_adapter(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **TOL, msg=lambda m, key=key: f"{key}: {m}")


def test_both_runs_really_ran_with_the_processes_they_claim(runs):
    two, one = runs["two"]["log"], runs["one"]["log"]
    assert set(two) == {"rank0", "rank1"}, two  # accelerate's --cpu launcher alone would start a single process
    assert all(events[-1] == {"finished": True} for events in two.values())
    assert [e["num_processes"] for e in two["rank0"] if "save" in e] == [2]
    assert set(one) == {"rank0"} and one["rank0"][-1] == {"finished": True}
    assert [e["num_processes"] for e in one["rank0"] if "save" in e] == [1]


def test_two_processes_give_the_one_process_adapter(runs):
    assert [e["num_processes"] for e in runs["two"]["log"]["rank0"] if "save" in e] == [2]
    assert_same_adapter(saved(runs["two"]), saved(runs["one"]))


def test_training_moved_the_adapter_from_its_initialisation(runs, example):
    init = {PREFIX + k: v for k, v in example["build_model"](SEED).get_adapter_state_dict().items()}
    trained = saved(runs["two"])
    assert set(trained) == set(init)
    for key, value in trained.items():
        if ".lora_B." in key:
            assert torch.count_nonzero(init[key]) == 0 and torch.count_nonzero(value) > 0, key
        assert not torch.equal(value, init[key]), key  # every tensor trained (layer 0's q/k only a little: flat attention)
    assert max((v - init[k]).abs().max().item() for k, v in trained.items()) > 100 * TOL["atol"]


def test_the_adapter_is_ddp_averaged_not_the_main_process_half_alone(runs, example):
    # The same loop here on the full global batch gives the saved adapter, so the half-batch run below is exactly
    # what process 0 would have saved had DDP not averaged the adapter's gradients with process 1's.
    assert_same_adapter(train_in_process(example, GLOBAL_BATCH), saved(runs["one"]))
    own_half = train_in_process(example, GLOBAL_BATCH // 2)
    two = saved(runs["two"])
    apart = max((two[k] - own_half[k]).abs().max().item() for k in two)
    assert apart > 100 * TOL["atol"], f"the 2-process adapter is within {apart} of process 0's half-batch training"


def test_only_the_main_process_saves_and_the_folder_holds_peft_files_only(runs):
    run = runs["two"]
    saves = [(rank, e) for rank, events in run["log"].items() for e in events if "save" in e]
    assert len(saves) == 1, saves
    rank, event = saves[0]
    assert rank == "rank0" and event["process_index"] == 0
    assert Path(event["save"]) == run["dir"] / "adapter"
    assert sorted(p.name for p in (run["dir"] / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in run["dir"].iterdir()) == ["adapter", "log"]
    assert run["output"].count("wrote ") == 1


@torch.no_grad()
def test_the_saved_adapter_loads_in_peft_with_lora_loaders_logits(runs, example):
    folder = str(runs["two"]["dir"] / "adapter")
    ids = example["make_data"](4, SEED + 1)
    ours = lora_loader.attach(example["base_model"](SEED)).eval()
    ours.load_adapter(folder, adapter_name="trained")
    theirs = peft.PeftModel.from_pretrained(example["base_model"](SEED), folder).eval()
    base = example["base_model"](SEED).eval()
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=1e-5)
    assert (ours(ids).logits - base(ids).logits).abs().max() > 1e-3


def test_processes_that_would_each_train_alone_stop_before_training(example, monkeypatch, tmp_path):
    # What torchrun's processes see on a machine without GPUs when ACCELERATE_USE_CPU is unset: WORLD_SIZE=2, but
    # accelerate gives each a world of one, so each would train on its own shard and save. The example refuses.
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    try:
        with pytest.raises(SystemExit, match="2 processes were launched but each runs alone"):
            example["main"](["--out", str(tmp_path / "adapter"), *ARGS])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert not (tmp_path / "adapter").exists()
