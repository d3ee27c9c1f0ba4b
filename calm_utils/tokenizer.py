"""Shared EN/FR subword tokenizer for the Multi30k T5 backbone.

A BPE model with a sentencepiece-style ``Metaspace`` pre-tokenizer (so ``decode`` gives
detokenised text), trained with ``tokenizers`` on Multi30k train, English and French together.

Vocabulary 8000: Multi30k has only 29k sentence pairs (~0.8M tokens), so a larger vocabulary
would leave many rare, badly-trained rows; and CALM's loss (and its softmax confidence) applies
the LM head at *every* decoder layer, so a small V keeps the O(V*d) head cheap enough for 8
per-layer losses on a CPU. Special tokens follow T5: ``<pad>``=0 (also the decoder start token),
``</s>``=1 (appended to every encoded sentence), ``<unk>``=2.

    python -m calm_utils.tokenizer        # (re)builds checkpoints/t5_multi30k_tokenizer/
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .utils import REPO_ROOT

TOKENIZER_DIR = REPO_ROOT / "checkpoints" / "t5_multi30k_tokenizer"
SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2
VOCAB_SIZE = 8000


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512)


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2]
    return _wrap(tok)


def build_multi30k_tokenizer(out_dir: str | Path = TOKENIZER_DIR) -> PreTrainedTokenizerFast:
    from .data import load_multi30k
    train = load_multi30k("train")
    tok = train_tokenizer(list(train["en"]) + list(train["fr"]))
    tok.save_pretrained(str(out_dir))
    return tok


def load_tokenizer(path: str | Path = TOKENIZER_DIR) -> PreTrainedTokenizerFast:
    """The saved tokenizer; builds it from Multi30k train if ``path`` is the default and missing."""
    path = Path(path)
    if not (path / "tokenizer.json").exists():
        if path.resolve() != TOKENIZER_DIR.resolve():
            raise FileNotFoundError(path / "tokenizer.json")
        return build_multi30k_tokenizer(path)
    return PreTrainedTokenizerFast.from_pretrained(str(path))


if __name__ == "__main__":
    t = build_multi30k_tokenizer()
    s = "Une petite fille grimpe dans une maisonnette en bois."
    ids = t(s)["input_ids"]
    print(len(t), ids, t.decode(ids, skip_special_tokens=True))
