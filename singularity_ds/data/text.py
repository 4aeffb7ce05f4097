"""Text cleaning and tokenisation, matching the ids the original checkpoints were trained on.

The original's vendored BertTokenizer (from ALBEF) emits ``[CLS] tokens`` for one sequence, with no
trailing ``[SEP]``; QA answers end in ``[SEP]`` only because the text ``"answer [SEP]"`` is tokenised.
We use the ``transformers`` BERT tokenizer with that single-sequence template.
"""
import os
import re
from importlib import resources

from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from ..hub import tokenizer_folder

SHIPPED = {"bert-base-uncased":
           resources.files("singularity_ds") / "configs" / "tokenizer" / "bert-base-uncased"}


def pre_text(text: str, max_l: int = None) -> str:
    """The original's caption/question cleaning: lower-case, drop punctuation, ``-``/``/`` -> space."""
    text = re.sub(r"([,.'!?\"()*#:;~])", "", text.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = re.sub(r"\s{2,}", " ", text)
    text = text.rstrip("\n").strip(" ")
    if max_l:
        words = text.split(" ")
        if len(words) > max_l:
            text = " ".join(words[:max_l])
    return text


def build_tokenizer(name: str = "bert-base-uncased"):
    """``name``: a local tokenizer folder, ``bert-base-uncased`` (its vocab ships in the package), or a
    Hugging Face Hub repo id (its tokenizer files from the HF cache, downloaded if needed: :mod:`..hub`)."""
    if os.path.isdir(str(name)):
        source = str(name)
    elif name in SHIPPED:
        source = str(SHIPPED[name])
    else:
        source = tokenizer_folder(str(name))
    tok = AutoTokenizer.from_pretrained(source)
    cls, sep = tok.cls_token, tok.sep_token
    tok.backend_tokenizer.post_processor = TemplateProcessing(  # ALBEF's: no [SEP] after a single sequence
        single=f"{cls} $A", pair=f"{cls} $A {sep} $B {sep}",
        special_tokens=[(cls, tok.cls_token_id), (sep, tok.sep_token_id)])
    return tok


def tokenize(tokenizer, texts, max_len: int, padding="max_length"):
    """-> (input_ids, attention_mask) LongTensors (B, max_len), as the original's training calls."""
    enc = tokenizer(list(texts), padding=padding, truncation=True, max_length=max_len, return_tensors="pt")
    return enc.input_ids, enc.attention_mask
