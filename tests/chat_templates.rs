//! Chat templates against transformers: every test conversation renders to the same text as
//! `apply_chat_template` (or fails with the template's own message), the assistant masks equal
//! `return_assistant_tokens_mask` for templates with `{% generation %}` blocks, and for templates
//! without them the masks strata finds equal transformers' on the same template with generation
//! blocks around each assistant content and its end-of-turn token. Each template also trains.
//! The templates (tests/chat/*.jinja) are written for these tests; `[[G]]`/`[[/G]]` mark where the
//! generation-block twin opens and closes its blocks.
mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::{json, Value};
use tch::Kind;
use trainer::data::{ChatTemplate, Conversation, Encoder};

fn words() -> Vec<String> {
    let mut v: Vec<String> = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start|>", "<|end|>", "<think>", "</think>", "system", "user", "assistant", "tool", "today", "tools:", "documents"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend((v.len()..VOCAB).map(|i| format!("w{i}")));
    v
}

const SPECIAL: [(&str, &str); 4] = [("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"), ("pad_token", "<unk>")];
/// A model's own named special token (`extra_special_tokens` in tokenizer_config.json).
const EXTRA: (&str, &str) = ("image_token", "w19");

/// tokenizer_config.json's special tokens.
fn special_config() -> Value {
    let mut cfg = json!({"extra_special_tokens": {EXTRA.0: EXTRA.1}});
    for (k, v) in SPECIAL {
        cfg[k] = v.into();
    }
    cfg
}

/// A model folder whose tokenizer knows the templates' words and whose tokenizer_config.json
/// carries `template`.
fn folder(dir: &Path, template: &str) -> PathBuf {
    let mut config = llama_config();
    config["vocab_size"] = VOCAB.into();
    write_checkpoint(dir, &config, Kind::Float, 1, 5);
    let w = words();
    let refs: Vec<&str> = w.iter().map(|s| s.as_str()).collect();
    std::fs::write(dir.join("tokenizer.json"), trainer::data::tokenizer::word_level_json(&refs, Some("<s>")).to_string()).unwrap();
    let mut cfg = special_config();
    cfg["chat_template"] = template.into();
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    dir.to_path_buf()
}

fn conversations() -> Vec<Value> {
    vec![
        json!({"messages": [
            {"role": "system", "content": "  w20 w21 "},
            {"role": "user", "content": "w22 w23"}, {"role": "assistant", "content": " w24 w25"},
            {"role": "user", "content": "w26"}, {"role": "assistant", "content": "w27 w28 w29"}]}),
        json!({"messages": [
            {"role": "user", "content": "w30"}, {"role": "assistant", "content": "<think> w31 w32 </think> w33 w34"},
            {"role": "user", "content": "w35"}, {"role": "assistant", "content": "w36", "reasoning_content": "w37 w38"},
            {"role": "user", "content": [{"type": "text", "text": "w39"}]}, {"role": "assistant", "content": [{"type": "text", "text": "w40 w41"}]}]}),
        json!({"tools": [{"type": "function", "function": {"name": "w40", "description": "é ü <b>", "parameters": {"type": "object", "properties": {"x": {"type": "number", "minimum": 0.5}}}}}],
            "messages": [
            {"role": "user", "content": "w41"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"type": "function", "function": {"name": "w40", "arguments": {"x": 1.0}}},
                {"type": "function", "function": {"name": "w40", "arguments": {"x": 2}}},
                {"type": "function", "function": {"name": "w40", "arguments": {"x": 1e-7}}}]},
            {"role": "tool", "content": "skip w42"},
            {"role": "assistant", "content": "w43 w44"}]}),
        json!({"messages": [{"role": "user", "content": "w45"}, {"role": "robot", "content": "w46"}, {"role": "assistant", "content": "w47"}]}),
        json!({"documents": [{"title": "w30", "text": "w31 w32"}, {"title": "w33", "text": "w34"}],
            "chat_template_kwargs": {"unused_flag": true},
            "messages": [{"role": "user", "content": "w35"}, {"role": "assistant", "content": "w36 w37"}]}),
    ]
}

fn conversation(v: &Value) -> Conversation {
    Conversation {
        messages: v["messages"].as_array().unwrap().clone(),
        tools: v.get("tools").cloned(),
        documents: v.get("documents").cloned(),
        kwargs: v.get("chat_template_kwargs").and_then(|k| k.as_object()).cloned().unwrap_or_default(),
    }
}

/// transformers' answers for `cases` (template, whether to return masks).
fn reference(tokenizer: &Path, cases: &[(String, bool)]) -> Vec<Vec<Value>> {
    let mut special: serde_json::Map<String, Value> = SPECIAL.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    special.insert("extra_special_tokens".into(), json!({EXTRA.0: EXTRA.1}));
    let job = json!({
        "tokenizer": tokenizer,
        "special_tokens": special,
        "cases": cases.iter().map(|(t, m)| json!({"template": t, "masks": m, "conversations": conversations()})).collect::<Vec<_>>(),
    });
    let mut child = std::process::Command::new(venv_python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chat_reference.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(job.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "chat_reference.py failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn templates_render_and_mask_as_transformers_does_and_train() {
    let dir = tmp_dir("chat-templates");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chat");
    let mut names: Vec<String> = std::fs::read_dir(&src).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.ends_with(".jinja")).collect();
    names.sort();
    let (mut identical, mut both_fail, mut masked, mut prompts, mut total) = (0, 0, 0, 0, 0);
    for name in &names {
        let raw = std::fs::read_to_string(src.join(name)).unwrap();
        let plain = raw.replace("[[G]]", "").replace("[[/G]]", "");
        let twin = raw.replace("[[G]]", "{% generation %}").replace("[[/G]]", "{% endgeneration %}");
        let model = folder(&dir.join(name.trim_end_matches(".jinja")), &plain);
        let tok = trainer::data::tokenizer::load(&model).unwrap();
        let chat = ChatTemplate::load(&model).unwrap().unwrap();
        let twin_chat = ChatTemplate::from_source(&twin, &model.join("twin.jinja"), &special_config()).unwrap();
        let refs = reference(&model.join("tokenizer.json"), &[(plain.clone(), false), (twin.clone(), true)]);
        for (i, conv) in conversations().iter().enumerate() {
            total += 1;
            let c = conversation(conv);
            let ours = chat.render(&c, false);
            let theirs = &refs[0][i];
            match (&ours, theirs.get("text"), theirs.get("error")) {
                (Ok(r), Some(t), _) => {
                    assert_eq!(&r.text, t.as_str().unwrap(), "{name} conversation {i}: rendered text");
                    identical += 1;
                }
                // Both fail; a template's own raise_exception message comes through word for word.
                (Err(e), None, Some(msg)) => {
                    let msg = msg.as_str().unwrap();
                    assert!(!msg.starts_with("unknown role") || e.contains(msg), "{name} conversation {i}: `{e}` vs transformers' `{msg}`");
                    both_fail += 1;
                }
                _ => panic!("{name} conversation {i}: strata {ours:?}, transformers {theirs}"),
            }
            if let Some(p) = theirs.get("prompt") {
                let messages = c.messages.clone();
                let last_user = messages.iter().rposition(|m| m["role"] == "user").unwrap();
                let prompt = Conversation { messages: messages[..=last_user].to_vec(), ..c.clone() };
                assert_eq!(chat.render(&prompt, true).unwrap().text, p.as_str().unwrap(), "{name} conversation {i}: the generation prompt");
                prompts += 1;
            }
            let Some(want) = refs[1][i].get("mask") else { continue };
            let want: Vec<bool> = want.as_array().unwrap().iter().map(|m| m.as_i64() == Some(1)).collect();
            let ids: Vec<i64> = refs[1][i]["ids"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
            if !want.contains(&true) {
                continue; // no assistant content turn in this conversation
            }
            // Generation blocks: strata's spans; without them: strata's located content.
            for (how, template) in [("generation blocks", &twin_chat), ("located content", &chat)] {
                let e = template.encode(&tok, &c).unwrap_or_else(|e| panic!("{name} conversation {i} ({how}): {e}"));
                assert_eq!(e.ids, ids, "{name} conversation {i} ({how}): token ids");
                assert_eq!(e.target, want, "{name} conversation {i} ({how}): assistant mask");
            }
            masked += 1;
        }
        // A training step on the template's data.
        let data = dir.join(format!("{name}.jsonl"));
        let lines: Vec<String> = conversations().iter().filter(|c| chat.render(&conversation(c), false).is_ok()).map(|c| c.to_string()).collect();
        std::fs::write(&data, lines.join("\n")).unwrap();
        let recipe = dir.join(format!("{name}.toml"));
        std::fs::write(
            &recipe,
            format!(
                "[run]\ndir = \"{}\"\ndevice = \"cpu\"\n[model]\npath = \"{}\"\n[data]\ntrain = [\"{}\"]\ntokens_per_batch = 1024\nmax_tokens = 1024\n[train]\nsteps = 2\nlr = 1e-3\n",
                dir.join(format!("{name}-run")).display(),
                model.display(),
                data.display()
            ),
        )
        .unwrap();
        let out = train(&["run", "--recipe", recipe.to_str().unwrap()]);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        // What will train, as `train data inspect` shows it (not a terminal: brackets).
        let out = train(&["data", "inspect", "--recipe", recipe.to_str().unwrap(), "--n", "2"]);
        let so = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        for needle in ["jsonl:1: ", "trained (", "[[", "truncated: 0 documents", "packing: 1 micro-batches of up to 1024 tokens (until every document was packed once"] {
            assert!(so.contains(needle), "{name}: `{needle}` missing from:\n{so}");
        }
        if name.starts_with("chatml-generation") {
            assert!(so.contains("[[w24 w25 <|im_end|>]]") && so.contains("[[w27 w28 w29 <|im_end|>]]"), "{so}");
            println!("train data inspect on {name}:\n{so}");
        }
    }
    println!("{identical}/{total} conversations render to transformers' text ({both_fail} fail in both), {prompts} generation prompts too; {masked} assistant masks equal transformers' over {} templates", names.len());
    // Every test conversation renders with at least one template, and most masks are compared.
    assert!(identical >= total - names.len() && masked >= 12, "{identical} identical, {masked} masks");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_template_error_names_the_data_file_line_and_the_templates_message() {
    let dir = tmp_dir("chat-template-error");
    let model = folder(&dir.join("m"), "{% for m in messages %}{% if m.role == 'robot' %}{{ raise_exception('robots are not welcome') }}{% endif %}{{ m.content }} {% endfor %}");
    let tok = trainer::data::tokenizer::load(&model).unwrap();
    let chat = ChatTemplate::load(&model).unwrap();
    let data = dir.join("d.jsonl");
    std::fs::write(&data, "{\"messages\": [{\"role\": \"user\", \"content\": \"w20\"}, {\"role\": \"assistant\", \"content\": \"w21\"}]}\n{\"messages\": [{\"role\": \"robot\", \"content\": \"w20\"}, {\"role\": \"assistant\", \"content\": \"w21\"}]}\n").unwrap();
    let enc = Encoder { tok: &tok, tok_path: model.join("tokenizer.json"), chat, eos: Some(2), max_tokens: 64 };
    let e = enc.file(&data).unwrap_err().to_string();
    assert!(e.contains("d.jsonl:2") && e.contains("robots are not welcome"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_content_the_template_writes_twice_is_an_ambiguity_naming_the_message() {
    let dir = tmp_dir("chat-template-ambiguous");
    let model = folder(&dir.join("m"), "{% for m in messages %}<|start|> {{ m.role }} {{ m.content }} <|end|> {{ m.content }} {{ m.content | length }} {% endfor %}");
    let tok = trainer::data::tokenizer::load(&model).unwrap();
    let chat = ChatTemplate::load(&model).unwrap().unwrap();
    let conv = conversation(&json!({"messages": [{"role": "user", "content": "w20"}, {"role": "assistant", "content": "w21 w23"}, {"role": "user", "content": "w22"}]}));
    let e = chat.encode(&tok, &conv).unwrap_err();
    assert!(e.contains("messages[1]") && e.contains("ambiguous"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}
