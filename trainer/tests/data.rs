//! Data formats: which tokens are trained on, packing, chat templates, bad lines.
use serde_json::json;
use trainer::data::{pack, ChatTemplate, Encoder};

fn tok() -> tokenizers::Tokenizer {
    let words = ["<unk>", "<s>", "</s>", "a", "b", "c", "d", "Below", "<|user|>", "<|assistant|>", "<|end|>"];
    let json = trainer::data::tokenizer::word_level_json(&words, Some("<s>"));
    tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes()).unwrap()
}

fn encoder(t: &tokenizers::Tokenizer, chat: Option<ChatTemplate>) -> Encoder<'_> {
    Encoder { tok: t, tok_path: "tokenizer.json".into(), chat, eos: Some(2), max_tokens: 64 }
}

#[test]
fn prompt_tokens_are_masked() {
    let t = tok();
    let e = encoder(&t, None).line(r#"{"prompt": "a b", "completion": "c d"}"#).unwrap();
    assert_eq!(e.ids, vec![1, 3, 4, 5, 6, 2]);
    assert_eq!(e.target, vec![false, false, false, true, true, true]);
    let e = encoder(&t, None).line(r#"{"text": "a b c"}"#).unwrap();
    assert_eq!(e.ids, vec![1, 3, 4, 5, 2]);
    assert_eq!(e.target, vec![false, true, true, true, true]);
    let b = pack(&[&e, &e]);
    let labels: Vec<i64> = Vec::try_from(&b.labels).unwrap();
    assert_eq!(labels, vec![3, 4, 5, 2, -100, 3, 4, 5, 2, -100]);
    assert_eq!(b.doc_lens, vec![5, 5]);
}

#[test]
fn chat_template_trains_only_assistant_turns() {
    let dir = std::env::temp_dir().join(format!("strata-chat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let template = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'].strip() }} {% else %}<|assistant|> {{ m['content'] }} <|end|> {% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}";
    std::fs::write(dir.join("tokenizer_config.json"), json!({"chat_template": template, "bos_token": "<s>", "eos_token": "</s>"}).to_string()).unwrap();
    let chat = ChatTemplate::load(&dir).unwrap().expect("template");
    let t = tok();
    let line = json!({"messages": [
        {"role": "user", "content": " a "}, {"role": "assistant", "content": "b c"},
        {"role": "user", "content": "d"}, {"role": "assistant", "content": "a"}]}).to_string();
    let e = encoder(&t, Some(chat.clone())).line(&line).unwrap();
    // <s> <|user|> a <|assistant|> b c <|end|> <|user|> d <|assistant|> a <|end|>
    assert_eq!(e.ids, vec![1, 8, 3, 9, 4, 5, 10, 8, 6, 9, 3, 10]);
    let want = [false, false, false, false, true, true, true, false, false, false, true, true];
    assert_eq!(e.target, want);
    let err = encoder(&t, Some(chat)).line(r#"{"messages": [{"role": "user", "content": "a"}]}"#).unwrap_err();
    assert!(err.contains("no assistant turn"), "{err}");
    let err = encoder(&t, None).line(&line).unwrap_err();
    assert!(err.contains("chat template"), "{err}");
    std::fs::write(dir.join("tokenizer_config.json"), json!({"chat_template": "{% for m in messages %}"}).to_string()).unwrap();
    let err = ChatTemplate::load(&dir).err().unwrap().to_string();
    assert!(err.contains("tokenizer_config.json") && err.contains("does not compile"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn instruction_format_and_bad_lines() {
    let t = tok();
    let enc = encoder(&t, None);
    let e = enc.line(r#"{"instruction": "a", "input": "", "output": "b"}"#).unwrap();
    assert_eq!(&e.ids[e.ids.len() - 2..], &[4, 2]);
    assert_eq!(e.target.iter().filter(|&&x| x).count(), 2);
    assert!(e.ids.contains(&7), "the Alpaca header is in the prompt");
    for (line, want) in [
        ("not json", "not JSON"),
        (r#"{"prompt": "a"}"#, "missing `completion`"),
        (r#"{"text": 5}"#, "`text` must be a string"),
        (r#"{"foo": "a"}"#, "expected one of"),
        (r#"{"prompt": "a", "completion": ""}"#, "fails"),
    ] {
        let r = enc.line(line);
        match (r, want) {
            (Ok(e), "fails") => assert!(e.targets() == 1, "only EOS is trained on for an empty completion"),
            (Ok(_), _) => panic!("{line} should fail"),
            (Err(msg), _) => assert!(msg.contains(want), "{line}: {msg}"),
        }
    }
    let dir = std::env::temp_dir().join(format!("strata-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("d.jsonl");
    std::fs::write(&f, "{\"text\": \"a b\"}\n\n{\"text\": }\n").unwrap();
    let err = enc.file(&f).unwrap_err().to_string();
    assert!(err.contains("d.jsonl:3"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn synthetic_samples_hold_their_answer() {
    use trainer::rng::Rng;
    use trainer::data::synth::{sample, Task};
    for task in [Task::Passkey, Task::KvRecall] {
        for depth in [Some(0.0), Some(0.5), Some(1.0), None] {
            let s = sample(task, &mut Rng::new(7), 300, depth, 5);
            let words = s.prompt.split(' ').count();
            assert!((250..=310).contains(&words), "{task:?}: {words} words");
            assert!(s.prompt.contains(&s.completion), "{task:?}: answer must appear in the prompt");
            assert_eq!(s.completion.split(' ').count(), 5);
            let known: std::collections::HashSet<&str> = trainer::data::synth::VOCAB.iter().copied().collect();
            assert!(s.prompt.split(' ').all(|w| known.contains(w)), "{task:?}: a word outside the vocabulary");
        }
    }
    let early = sample(Task::Passkey, &mut Rng::new(1), 1000, Some(0.0), 5);
    let late = sample(Task::Passkey, &mut Rng::new(1), 1000, Some(1.0), 5);
    assert!(early.prompt.find("pass key :").unwrap() < 30);
    assert!(late.prompt.find("pass key :").unwrap() > early.prompt.len() * 8 / 10);
}
