"""Train a LoRA adapter on several processes with accelerate (DDP), and save it once.

A tiny Llama built from a config with seeded weights learns to continue
arithmetic sequences (3, 7, 11, 15, ...). The global batch is fixed and split
over the processes, so two processes average the same gradients one process
computes, and a short run writes the same adapter (up to fp32 rounding). Two
processes on CPU (gloo), and one process:

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/train_multiprocess.py --out /tmp/mp
    python3 examples/train_multiprocess.py --out /tmp/mp-1proc

On CPU, ``accelerate launch --cpu --num_processes 2`` starts ONE process unless
MPI is set up (``--mpirun_hostfile``); the torchrun launcher behind
``--multi_gpu`` starts them, and ``ACCELERATE_USE_CPU=1`` puts them on gloo
(``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 ...`` is the same). With
GPUs: ``accelerate launch --num_processes 2 examples/train_multiprocess.py --out DIR``.

Only the main process writes the adapter (PEFT's layout: ``adapter_config.json``
+ ``adapter_model.safetensors``), after every process has finished its last step.
"""

from __future__ import annotations

import argparse
import os

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

import lora_loader

VOCAB, SEQ_LEN = 64, 16


def base_model(seed: int) -> LlamaForCausalLM:
    """A tiny Llama from a config; the same seed gives the same weights in every process."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN)
    return LlamaForCausalLM(config)


def build_model(seed: int) -> LlamaForCausalLM:
    """The base model with a fresh trainable adapter (its ``lora_A`` drawn from the same seeded generator)."""
    model = lora_loader.attach(base_model(seed))
    model.add_adapter(lora_loader.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]))
    return model


def make_data(rows: int, seed: int) -> torch.Tensor:
    """``rows`` sequences ``start, start + stride, ...`` modulo the vocabulary, from their own generator."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (rows, 1), generator=gen)
    stride = torch.randint(1, 5, (rows, 1), generator=gen)
    return (start + stride * torch.arange(SEQ_LEN)) % VOCAB


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="adapter folder to write (main process only)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--global-batch", type=int, default=8, help="rows per step over all processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args(argv)

    accelerator = Accelerator()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:  # e.g. --multi_gpu without GPUs: each process would train alone and save
        raise SystemExit(f"{launched} processes were launched but each runs alone (accelerate sees "
                         f"{accelerator.num_processes}): on CPU, set ACCELERATE_USE_CPU=1")
    if args.global_batch % accelerator.num_processes:
        raise SystemExit(f"--global-batch {args.global_batch} does not split over {accelerator.num_processes} processes")
    model = build_model(args.seed)
    model.train()  # lora_dropout is 0 and Llama has no other dropout: training is deterministic
    # Plain SGD keeps the 1- and 2-process adapters equal to fp32 rounding. AdamW trains the same way, but it divides
    # each element by its own gradient history, so rounding in near-zero gradients becomes visible in the weights.
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    # Each process takes global / num_processes rows of every step's batch: accelerate hands process k
    # the k-th per-process batch in turn, so together they see the same rows one process would.
    data = make_data(args.steps * args.global_batch, args.seed)
    loader = DataLoader(data, batch_size=args.global_batch // accelerator.num_processes)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    for step, ids in enumerate(loader):
        # Every row has SEQ_LEN tokens, so the mean of the processes' mean losses is the global batch's mean loss.
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)  # DDP averages the adapter's gradients over the processes here
        optimizer.step()
        optimizer.zero_grad()
        mean_loss = accelerator.reduce(loss.detach(), reduction="mean")
        accelerator.print(f"step {step + 1:3d}/{args.steps}  loss {mean_loss.item():.4f}")

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_adapter(args.out)
        print(f"wrote {args.out} ({accelerator.num_processes} process(es), global batch {args.global_batch})")
    # Shut down in step: every process waits for the save, drops the DDP-wrapped model (its reducer holds the process
    # group) and only then destroys the group. A process that destroyed the group while its peer was still saving,
    # and freed the DDP model only on return, was left waiting at exit for a peer that had gone.
    accelerator.wait_for_everyone()
    model, optimizer, loader = accelerator.free_memory(model, optimizer, loader)
    accelerator.end_training()


if __name__ == "__main__":
    main()
