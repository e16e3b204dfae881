"""transformers' side of tests/chat_templates.rs: renders each test conversation with
`apply_chat_template` and, for templates with {% generation %} blocks, returns the token ids and
`return_assistant_tokens_mask`. Reads a job (JSON) on stdin, writes results (JSON) on stdout."""
import json
import sys

from transformers import PreTrainedTokenizerFast

job = json.load(sys.stdin)
out = []
for case in job["cases"]:
    tok = PreTrainedTokenizerFast(tokenizer_file=job["tokenizer"], **job["special_tokens"])
    results = []
    for conv in case["conversations"]:
        kw = dict(tools=conv.get("tools"), documents=conv.get("documents"), chat_template=case["template"], **conv.get("chat_template_kwargs", {}))
        r = {}
        try:
            r["text"] = tok.apply_chat_template(conv["messages"], tokenize=False, **kw)
            # The prompt for a reply to the last user turn, with the generation prompt.
            last_user = max(i for i, m in enumerate(conv["messages"]) if m["role"] == "user")
            r["prompt"] = tok.apply_chat_template(conv["messages"][: last_user + 1], tokenize=False, add_generation_prompt=True, **kw)
            if case.get("masks"):
                enc = tok.apply_chat_template(conv["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kw)
                r["ids"] = list(enc["input_ids"])
                r["mask"] = list(enc["assistant_masks"])
        except Exception as e:  # the template's own error (raise_exception)
            r["error"] = str(e)
        results.append(r)
    out.append(results)
json.dump(out, sys.stdout)
