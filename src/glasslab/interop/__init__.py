"""Hugging Face interop: open checkpoints (Llama, Qwen2, Qwen3 and the same shapes) into glasslab runs, and
glasslab runs out as standard transformers checkpoints.

The core install does not need transformers: config and weight mapping read and write config.json and safetensors
directly, and only a model's chat template needs jinja2 (the `hf` extra).
"""
