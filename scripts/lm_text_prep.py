"""Builds what `scripts/lm-sparsity.sh` trains on: English text cut into documents of about
2000 tokens (train.jsonl / val.jsonl: every tenth document held out), a byte-level BPE tokenizer
fitted on the training documents, and a small Llama model with random weights in the Hugging
Face layout (config.json, model.safetensors, tokenizer.json).

    .venv/bin/python scripts/lm_text_prep.py OUT_DIR TEXT [TEXT ...]
"""
import json
import os
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 4096
DOC_CHARS = 6000  # about 2000 BPE tokens of this prose (release notes: many numbers and links)


def documents(text):
    """Consecutive pieces of DOC_CHARS characters, cut at a line end."""
    docs, start = [], 0
    while start < len(text):
        end = min(len(text), start + DOC_CHARS)
        if end < len(text):
            nl = text.rfind("\n", start + DOC_CHARS // 2, end)
            end = nl + 1 if nl > 0 else end
        piece = text[start:end].strip()
        if piece:
            docs.append(piece)
        start = end
    return docs


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out, docs = sys.argv[1], []
    for src in sys.argv[2:]:
        with open(src, encoding="utf-8", errors="replace") as f:
            docs += documents(f.read())
    train = [d for i, d in enumerate(docs) if i % 10 != 9]
    val = [d for i, d in enumerate(docs) if i % 10 == 9]
    os.makedirs(os.path.join(out, "model"), exist_ok=True)
    for name, docs in (("train", train), ("val", val)):
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train, trainer)
    tok.save(os.path.join(out, "model", "tokenizer.json"))
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=256, intermediate_size=688, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=10000.0, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(os.path.join(out, "model"))
    lens = [len(tok.encode(d).ids) for d in train]
    print(f"{len(train)} training documents ({sum(lens)} tokens, median {sorted(lens)[len(lens) // 2]}), {len(val)} held out; vocab {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
