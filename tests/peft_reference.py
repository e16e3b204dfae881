"""Independent reference for exported LoRA adapters: base model + adapter loaded by PEFT.

Usage: peft_reference.py BASE_DIR ADAPTER_DIR DATA.jsonl
Prints {"loss": mean next-token loss over all predicted tokens, "tokens": count}.
"""
import json
import sys

import torch
from peft import PeftModel
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

base_dir, adapter_dir, data = sys.argv[1:4]
torch.set_num_threads(2)
tok = Tokenizer.from_file(f"{base_dir}/tokenizer.json")
base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
model = PeftModel.from_pretrained(base, adapter_dir)
model.eval()
total, count = 0.0, 0
with torch.no_grad(), open(data) as f:
    for line in f:
        if not line.strip():
            continue
        ids = tok.encode(json.loads(line)["text"]).ids
        if len(ids) < 2:
            continue
        x = torch.tensor([ids])
        total += model(input_ids=x, labels=x).loss.double().item() * (len(ids) - 1)
        count += len(ids) - 1
print(json.dumps({"loss": total / count, "tokens": count}))
