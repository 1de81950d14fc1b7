"""Task family (a): a small causal language model (transformers' Llama, configured tiny, character
level) instruction-tuned on four generated tasks one after another; full fine-tuning or LoRA
through peft. Accuracy is the exact match of the greedy answer.

The tasks have distinct formats, so a model tuned on the last one has reasons to forget the rest:

    add 3+4=      -> 7         single-digit addition
    rev kqz=      -> zqk       reverse three letters
    key a3 k7 q1 ?k= -> 7      look up the digit of a letter
    cls tbw=      -> hi        "hi" if the first letter is after m, else "lo"

Before the sequence the model is pre-trained briefly on a copy task (``cpy abc=`` -> ``abc``), so
it starts from weights that already know the characters and the prompt/answer layout. That base
is the same for every method of a seed (LoRA adapts it; full fine-tuning changes all of it).
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass

import torch
from torch import nn

from llaca_optim.demo import Result

CHARS = "0123456789abcdefghijklmnopqrstuvwxyz+=? "
PAD, BOS, EOS = 0, 1, 2
STOI = {c: i + 3 for i, c in enumerate(CHARS)}
ITOS = {i: c for c, i in STOI.items()}
LETTERS = "abcdefghijklmnopqrstuvwxyz"
TASKS = ("add", "rev", "key", "cls")


def make_example(task: str, rng: random.Random) -> tuple[str, str]:
    if task == "add":
        a, b = rng.randrange(10), rng.randrange(10)
        return f"add {a}+{b}=", str(a + b)
    if task == "rev":
        s = "".join(rng.choice(LETTERS) for _ in range(3))
        return f"rev {s}=", s[::-1]
    if task == "key":
        keys = rng.sample(LETTERS, 3)
        vals = [str(rng.randrange(10)) for _ in keys]
        q = rng.randrange(3)
        pairs = " ".join(k + v for k, v in zip(keys, vals))
        return f"key {pairs} ?{keys[q]}=", vals[q]
    if task == "cls":
        s = "".join(rng.choice(LETTERS) for _ in range(3))
        return f"cls {s}=", "hi" if s[0] > "m" else "lo"
    if task == "cpy":
        s = "".join(rng.choice(LETTERS + "0123456789") for _ in range(rng.randint(1, 4)))
        return f"cpy {s}=", s
    raise ValueError(task)


def encode(text: str) -> list[int]:
    return [STOI[c] for c in text]


def batch_of(examples: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded token ids, attention mask, and labels that score only the answer and EOS."""
    seqs, labels = [], []
    for prompt, answer in examples:
        p, a = [BOS] + encode(prompt), encode(answer) + [EOS]
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD)
    lab = torch.full((len(seqs), width), -100)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
    return ids, (ids != PAD).long(), lab


def make_model(seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(CHARS) + 3, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS,
                         eos_token_id=EOS, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def train_steps(model, optimizer, task: str, steps: int, rng: random.Random, batch: int,
                progress=None, step_times=None) -> None:
    model.train()
    for _ in range(steps):
        ids, mask, labels = batch_of([make_example(task, rng) for _ in range(batch)])
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        start = time.perf_counter()
        optimizer.step()
        if step_times is not None:
            step_times.append(time.perf_counter() - start)
        if progress is not None:
            progress.update(1)


@torch.no_grad()
def exact_match(model, task: str, n: int, seed: int, max_new: int = 4) -> float:
    """Greedy decoding of ``n`` fixed held-out prompts (left-padded, explicit positions)."""
    model.eval()
    rng = random.Random(10_000 + seed)
    examples = [make_example(task, rng) for _ in range(n)]
    prompts = [[BOS] + encode(p) for p, _ in examples]
    width = max(len(p) for p in prompts)
    ids = torch.full((n, width), PAD)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
    mask = (ids != PAD).long()
    out = [[] for _ in range(n)]
    done = torch.zeros(n, dtype=torch.bool)
    for _ in range(max_new + 1):
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        nxt = logits.argmax(-1)
        for i in range(n):
            if not done[i]:
                if int(nxt[i]) == EOS:
                    done[i] = True
                else:
                    out[i].append(int(nxt[i]))
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype)], 1)
        if bool(done.all()):
            break
    answers = ["".join(ITOS.get(t, "#") for t in o) for o in out]
    return sum(a == e for a, (_, e) in zip(answers, examples)) / n


@dataclass
class Base:
    """A seed's pre-trained starting point, shared by every method of that seed."""

    seed: int
    state: dict


def pretrain(seed: int, steps: int, batch: int) -> Base:
    model = make_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train_steps(model, optimizer, "cpy", steps, random.Random(seed), batch)
    return Base(seed, copy.deepcopy(model.state_dict()))


def run(method_name: str, make_optimizer, base: Base, mode: str, steps: int, batch: int,
        n_eval: int, progress) -> Result:
    model = make_model(base.seed)
    model.load_state_dict(base.state)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    rng = random.Random(base.seed + 1)
    matrix, step_times, optimizer, backend = [], [], None, "torch"
    for t, task in enumerate(TASKS):
        if optimizer is None or not hasattr(optimizer, "end_task"):
            optimizer = make_optimizer(trainable)  # fresh state per task, as the recipe does
        backend = str(getattr(optimizer, "backend", "torch (fused)"))
        train_steps(model, optimizer, task, steps, rng, batch, progress, step_times)
        if hasattr(optimizer, "end_task"):
            optimizer.end_task()
        matrix.append([exact_match(model, TASKS[j], n_eval, base.seed) for j in range(t + 1)])
    return Result(method_name, matrix, 1e3 * sorted(step_times)[len(step_times) // 2], backend)
