"""Cached per-layer hidden states of the model's own continuations (training data for exit heads
and "Jump to Conclusions" linear maps).

``collect_states(view, prompts, max_new_tokens, name)``:

1. for each prompt, greedy full-depth decoding (``early_exit_generate(policy="full")``) gives the
   model's own continuation ``g_1..g_n`` (CALM trains its exit classifier on the model's outputs);
2. prompt + ``g_1..g_{n-1}`` is teacher-forced through ``view.hidden_states``; the ``n`` positions
   whose next-token prediction is a generated token (the last prompt position and ``g_1..g_{n-1}``)
   are kept (encoder-decoder views, ``LayerwiseT5``: the decoder is teacher-forced on
   ``decoder_start, g_1..g_{n-1}`` with the prompt as the encoder's source);
3. for each kept token and each layer ``l = 1..L``: the argmax of the shared final norm + LM head,
   the top-1 softmax probability and the top-1 minus top-2 difference (so ``softmax_max`` and
   ``softmax_diff`` can be evaluated offline without a second pass over the 49k-row head).

Returned dict (``N`` = total kept tokens, layers 1-based as everywhere in the study):

- ``states``        (N, L+1, d)  pre-norm states, index 0 = embedding; float16 unless a value
                                 exceeds the float16 range, then float32
- ``labels``        (N, L)       bool, ``labels[:, l-1]`` = layer-l argmax == layer-L argmax
                                 (CALM's consistency label; the last column is all True)
- ``layer_argmax``  (N, L)       int64, per-layer argmax
- ``final_argmax``  (N,)         int64, layer-L argmax (teacher-forced)
- ``generated``     (N,)         int64, the token the incremental decoder emitted there
- ``softmax_max``   (N, L)       float32
- ``softmax_diff``  (N, L)       float32
- ``group``         (N,)         int64, prompt index (split train/held-out by prompt, not token)
- ``step``          (N,)         int64, index of the generated token (0 = from the prompt pass)
- ``meta``          dict         config, the cache key, sizes

Size: SmolLM2-135M has L=30, d=576, so a token costs 31*576*2 bytes = 36 KB in float16. The
study's default (``scripts/exit_heads.py``) is 90 training prompts (60 SQuAD + 30 SciTLDR)
and 30 held-out prompts, 32 new tokens: a few thousand tokens, ~100 MB, ~15 minutes on one busy CPU
thread. The file is ``cache_dir("states") / f"{name}_{config_hash(...)}.pt"`` and is reused.
"""
from __future__ import annotations

import hashlib
import sys

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .decoding import early_exit_generate
from .utils import atomic_write, cache_dir, config_hash

FP16_MAX = 6.0e4


def model_fingerprint(view) -> dict:
    """What identifies the model behind ``view`` in cache keys (name + shapes + a weight checksum)."""
    cfg = getattr(view.model, "config", None)
    w = view.head_weight.detach()
    return {
        "class": type(view.model).__name__,
        "name_or_path": str(getattr(cfg, "name_or_path", "")),
        "layers": view.num_layers, "d": view.hidden_size, "vocab": view.vocab_size,
        "head_checksum": round(float(w[: min(64, w.shape[0])].double().abs().sum()), 6),
        "dtype": str(view.dtype),
    }


def _is_encoder_decoder(view) -> bool:
    """``LayerwiseT5``-like views: ``hidden_states(src_ids, tgt_ids)`` and an encoder."""
    return hasattr(view, "encode") and hasattr(view, "decoder_start_token_id")


def _prompts_digest(prompts: list[Tensor]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(torch.as_tensor(p, dtype=torch.long).reshape(-1).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def states_path(view, prompts: list[Tensor], max_new_tokens: int, name: str):
    key = {"model": model_fingerprint(view), "prompts": _prompts_digest(prompts), "n_prompts": len(prompts),
           "max_new_tokens": max_new_tokens, "version": 1}
    return cache_dir("states") / f"{name}_{config_hash(key)}.pt", key


@torch.inference_mode()
def _layer_stats(view, hs: Tensor, chunk: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """Per-layer argmax / top-1 prob / top1-top2 for ``hs`` (L, n, d) (layers 1..L), in chunks."""
    L, n, d = hs.shape
    flat = hs.reshape(L * n, d)
    arg, pmax, pdiff = [], [], []
    for s in range(0, flat.shape[0], chunk):
        logits = view.logits(flat[s:s + chunk]).float()
        probs = torch.softmax(logits, dim=-1)
        top = torch.topk(probs, 2, dim=-1)
        arg.append(top.indices[:, 0])
        pmax.append(top.values[:, 0])
        pdiff.append(top.values[:, 0] - top.values[:, 1])
    out = [torch.cat(x).reshape(L, n).T.contiguous() for x in (arg, pmax, pdiff)]
    return out[0], out[1], out[2]


def collect_states(view, prompts: list[Tensor], max_new_tokens: int = 32, name: str = "states",
                   progress: bool = True, use_cache: bool = True) -> dict:
    """Per-layer states and consistency labels of the model's own greedy continuations (see module doc).

    Args:
        view: a ``LayerwiseLM``, or a ``LayerwiseT5`` (then ``prompts`` are source sentences and the
            states are the decoder's, teacher-forced on the greedy translation).
        prompts: token ids per prompt, each (1, T) or (T,).
        max_new_tokens: continuation length cap (EOS stops earlier).
        name: prefix of the cache file.
        use_cache: load the cache file when present (and write it otherwise).
    """
    if not prompts:
        raise ValueError("collect_states needs at least one prompt")
    prompts = [torch.as_tensor(p, dtype=torch.long).reshape(1, -1) for p in prompts]
    path, key = states_path(view, prompts, max_new_tokens, name)
    if use_cache and path.exists():
        data = torch.load(path, weights_only=False)
        data["meta"]["loaded_from"] = str(path)
        return data

    L = view.num_layers
    parts: dict[str, list[Tensor]] = {k: [] for k in ("states", "layer_argmax", "softmax_max", "softmax_diff",
                                                       "generated", "group", "step")}
    for g, ids in enumerate(tqdm(prompts, desc=f"collect {name}", disable=not progress, file=sys.stderr)):
        ids = ids.to(view.device)
        res = early_exit_generate(view, ids, policy="full", max_new_tokens=max_new_tokens)
        gen = torch.tensor(res.tokens, dtype=torch.long, device=view.device)
        n, T = len(gen), ids.shape[1]
        if _is_encoder_decoder(view):                             # T5: the prompt is the source
            hs = view.hidden_states(ids, gen[None])               # (L+1, n, d), row t predicts gen[t]
        else:
            seq = torch.cat([ids[0], gen[:-1]])[None]
            hs = view.hidden_states(seq)[:, T - 1:T - 1 + n]      # (L+1, n, d)
        arg, pmax, pdiff = _layer_stats(view, hs[1:])
        parts["states"].append(hs.transpose(0, 1).float().cpu())  # (n, L+1, d)
        parts["layer_argmax"].append(arg.cpu())
        parts["softmax_max"].append(pmax.cpu())
        parts["softmax_diff"].append(pdiff.cpu())
        parts["generated"].append(gen.cpu())
        parts["group"].append(torch.full((n,), g, dtype=torch.long))
        parts["step"].append(torch.arange(n))
    data = {k: torch.cat(v) for k, v in parts.items()}
    states = data["states"]
    if not torch.isfinite(states).all():
        raise FloatingPointError("non-finite hidden states collected")
    if states.abs().max() < FP16_MAX:
        data["states"] = states.half()
    final = data["layer_argmax"][:, L - 1].clone()
    data["final_argmax"] = final
    data["labels"] = data["layer_argmax"] == final[:, None]
    data["meta"] = {**key, "key": config_hash(key), "name": name, "tokens": int(final.numel()),
                    "agree_with_generated": float((final == data["generated"]).float().mean()),
                    "states_dtype": str(data["states"].dtype)}
    if use_cache:
        atomic_write(path, lambda p: torch.save(data, p))
    return data


def split_by_group(data: dict, groups) -> dict:
    """The tokens of ``data`` whose prompt index is in ``groups`` (tensor/list/set), same keys."""
    groups = torch.as_tensor(sorted(set(int(g) for g in groups)), dtype=torch.long)
    mask = torch.isin(data["group"], groups)
    out = {k: (v[mask] if torch.is_tensor(v) and v.shape[:1] == mask.shape else v) for k, v in data.items()}
    return out
