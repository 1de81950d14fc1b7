"""What other libraries hand the optimizers, and what they get back: the Hugging Face Trainer
(huggingface.py, which imports transformers) and DeepSpeed (deepspeed.py, which imports nothing
of it)."""
