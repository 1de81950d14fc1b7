"""What the published LLaCA code computes under its own training set-up: a probe.

The authors' code (github.com/JingyangQiao/CoIN, ``CoIN/peft/tuners/lora.py``, ``ema_update``)
runs after ``self.optimizer.step()`` in its copy of the Hugging Face Trainer
(``llava/train/transformers/trainer.py``) and reads ``p.grad`` of every trainable parameter;
any exception (a missing previous gradient, a gradient that is None) falls back to the fixed
blend ``ema = 0.99 ema + 0.01 p``. Its scripts train under DeepSpeed (``--deepspeed
./scripts/zero1.json``, whose ``zero_optimization.stage`` is 0, with ``--bf16 True``), where the
Trainer's backward is accelerate's, which runs DeepSpeed's ``engine.step()`` (optimizer step, then
zero grad) inside ``accelerator.backward``; the Trainer's own ``optimizer.step()`` is then a
no-op. So when ``ema_update`` runs, are there gradients to read?

This probe trains a tiny Llama with LoRA through the Trainer, with and without that DeepSpeed
configuration, and at every optimizer step (``on_optimizer_step``, called right after the
Trainer's ``optimizer.step()``, where the published code calls ``ema_update``) counts the
trainable parameters whose ``.grad`` is None. Run with one rank::

    python -m torch.distributed.run --nproc_per_node 1 -m benchmarks.continual.published_path

(DeepSpeed needs a process group; ``DS_ACCELERATOR=cpu`` on a machine without a GPU.) It prints one
JSON line per set-up. With current transformers, accelerate and DeepSpeed; the published code pins
transformers 4.31, accelerate 0.21 and DeepSpeed 0.9.5, whose ``accelerator.backward`` under
DeepSpeed also calls ``engine.step()``.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def probe(deepspeed_config: dict | None) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=4, max_position_embeddings=32))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 40, (64, 12), generator=g)]

    class AtOptimizerStep(TrainerCallback):
        """Where the published code calls ema_update: right after optimizer.step()."""

        def __init__(self) -> None:
            self.steps = 0
            self.without_grad = 0
            self.trainable = 0

        def on_optimizer_step(self, args, state, control, **kwargs):
            params = [p for p in model.parameters() if p.requires_grad]
            self.steps += 1
            self.trainable = len(params)
            self.without_grad += sum(p.grad is None for p in params)

    seen = AtOptimizerStep()
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, max_steps=6,
                             per_device_train_batch_size=8, learning_rate=2e-4, weight_decay=0.0,
                             report_to=[], save_strategy="no", disable_tqdm=True,
                             bf16=deepspeed_config is not None, deepspeed=deepspeed_config)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[seen]).train()
    return {"deepspeed": deepspeed_config, "optimizer_steps": seen.steps,
            "trainable_tensors": seen.trainable,
            "tensor_steps_without_grad": seen.without_grad,
            "tensor_steps": seen.steps * seen.trainable}


def main() -> None:
    import importlib
    import sys

    # One rank: nothing to reduce across, so no shared-memory all-reduce op to build. Patched
    # through sys.modules: `import deepspeed.comm.torch as m` would bind deepspeed.comm's
    # attribute `torch`, the torch package itself.
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    # The published zero1.json: ZeRO stage 0, bf16 and the batch sizes left to the Trainer.
    published = {"bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
                 "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
                 "zero_optimization": {"stage": 0}}
    for config in (None, published):
        print("PROBE " + json.dumps(probe(config)), flush=True)


if __name__ == "__main__":
    main()
