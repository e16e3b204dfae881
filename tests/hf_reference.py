"""Independent reference: the loss of a model folder computed by Hugging Face transformers,
optionally with a LoRA adapter applied by PEFT.

Usage: hf_reference.py MODEL_DIR DATA.jsonl [--adapter ADAPTER_DIR] [--max-tokens N]
Prints {"loss": mean next-token loss over all predicted tokens, "tokens": count}.
Tokenization goes through the `tokenizers` library's Python binding, as `AutoTokenizer` would.
"""
import argparse
import json

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("model_dir")
ap.add_argument("data")
ap.add_argument("--adapter")
ap.add_argument("--max-tokens", type=int)
args = ap.parse_args()
torch.set_num_threads(2)
tok = Tokenizer.from_file(f"{args.model_dir}/tokenizer.json")
model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="eager")
rope = model.model.rotary_emb
if args.adapter:
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, args.adapter)
model.eval()
total, count = 0.0, 0
with torch.no_grad(), open(args.data) as f:
    for line in f:
        if not line.strip():
            continue
        ids = tok.encode(json.loads(line)["text"]).ids
        if args.max_tokens:
            ids = ids[: args.max_tokens]
        if len(ids) < 2:
            continue
        # Dynamic-NTK RoPE in transformers caches the longest length seen so far (it is built for
        # generation), so a document's frequencies would depend on the documents before it.
        # strata scales each document by its own length; reset the cache to compare like with like.
        if getattr(rope, "rope_type", None) == "dynamic":
            rope.register_buffer("inv_freq", rope.original_inv_freq.clone(), persistent=False)
            rope.max_seq_len_cached = rope.original_max_seq_len
        x = torch.tensor([ids])
        out = model(input_ids=x, labels=x)
        total += out.loss.double().item() * (len(ids) - 1)
        count += len(ids) - 1
print(json.dumps({"loss": total / count, "tokens": count}))
