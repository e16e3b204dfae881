//! Chat data as instruct models ship it: the model folder's chat template (Jinja) rendered the
//! way transformers' `apply_chat_template` renders it, and the tokens of assistant turns marked
//! as the ones to train on.
//!
//! The environment matches transformers' sandbox: `trim_blocks` and `lstrip_blocks`, loop
//! controls, `raise_exception`, `strftime_now`, `namespace`, `dict`, a `tojson` that writes what
//! Python's `json.dumps` writes, Python's string methods, `{% generation %}` blocks, and the
//! variables `messages`, `tools`, `documents`, `add_generation_prompt`, every named special token
//! of `tokenizer_config.json` (`bos_token` ... `mask_token` and `extra_special_tokens`, strings or
//! `{"content": ...}`) and a line's own `chat_template_kwargs`.
//!
//! Which tokens train: the `{% generation %}` spans when the template has them (the tokens
//! transformers' `return_assistant_tokens_mask` marks); otherwise each assistant message's content
//! as the whole conversation renders it, located by rendering the conversation once more with
//! that content replaced (see [`ChatTemplate::encode`]), with the end-of-turn special token the
//! template writes right after it. No prefix is rendered on its own, so templates that render
//! earlier turns differently from later ones (reasoning models drop old thinking) work. Without
//! generation blocks, reasoning the template renders from `reasoning_content` and tool calls
//! without content are not trained; a template with generation blocks decides that itself.
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tokenizers::Tokenizer;

use crate::data::Example;
use crate::error::{Result, TrainerError};

/// Opens and closes a generation span in the rendered text (private-use code points, removed
/// before tokenizing).
const GEN_OPEN: char = '\u{E000}';
const GEN_CLOSE: char = '\u{E001}';
const GEN_FILTER: &str = "strata_generation";

/// A Hugging Face chat template with the special tokens of its folder.
#[derive(Clone)]
pub struct ChatTemplate {
    /// The compiled template (`{% generation %}` blocks turned into filter blocks) with
    /// transformers' environment, built once and shared by every render.
    env: std::sync::Arc<minijinja::Environment<'static>>,
    path: PathBuf,
    /// Whether the template marks assistant text with `{% generation %}`.
    has_generation: bool,
    /// `bos_token` ... `mask_token` and `extra_special_tokens`, as transformers passes them.
    special: Map<String, Value>,
}

/// One conversation as a data line gives it.
#[derive(Debug, Clone, Default)]
pub struct Conversation {
    pub messages: Vec<Value>,
    pub tools: Option<Value>,
    pub documents: Option<Value>,
    /// Extra template variables (`chat_template_kwargs` of the line, e.g. `enable_thinking`).
    pub kwargs: Map<String, Value>,
}

/// A rendered conversation: the text and the byte ranges of its generation blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub text: String,
    pub generation: Vec<Range<usize>>,
}

/// A special token as `tokenizer_config.json` writes it: a string or `{"content": ...}`.
fn token_text(v: &Value) -> Option<Value> {
    match v {
        Value::String(s) => Some(Value::String(s.clone())),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(|s| Value::String(s.to_string())),
        Value::Array(list) => Some(Value::Array(list.iter().filter_map(token_text).collect())),
        _ => None,
    }
}

/// transformers' `special_tokens_map`: the named special tokens and the model's extra named ones
/// (`extra_special_tokens`, e.g. `image_token`).
fn special_tokens(cfg: &Value) -> Map<String, Value> {
    let mut out = Map::new();
    for key in ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"] {
        if let Some(v) = cfg.get(key).and_then(token_text) {
            out.insert(key.to_string(), v);
        }
    }
    if let Some(Value::Object(extra)) = cfg.get("extra_special_tokens") {
        for (k, v) in extra {
            if let Some(v) = token_text(v) {
                out.insert(k.clone(), v);
            }
        }
    }
    out
}

/// `{%- generation -%}` → `{%- filter strata_generation -%}`, `{% endgeneration %}` →
/// `{% endfilter %}`, keeping the whitespace control, so that `trim_blocks` / `lstrip_blocks` act
/// on them as on the block tags transformers parses. Returns the new source and whether any
/// generation tag was found.
fn rewrite_generation_tags(src: &str) -> (String, bool) {
    let mut out = String::with_capacity(src.len());
    let mut found = false;
    let mut rest = src;
    while let Some(i) = rest.find("{%") {
        out.push_str(&rest[..i]);
        let tag = &rest[i..];
        let Some(end) = tag[2..].find("%}").map(|e| e + 2) else {
            out.push_str(tag);
            rest = "";
            break;
        };
        let inner = &tag[2..end];
        let (lead, body) = match inner.strip_prefix('-').or_else(|| inner.strip_prefix('+')) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, trail) = match body.strip_suffix('-').or_else(|| body.strip_suffix('+')) {
            Some(b) => (b, &body[b.len()..]),
            None => (body, ""),
        };
        let word = body.trim();
        let replaced = match word {
            "generation" => Some(format!("{{%{lead} filter {GEN_FILTER} {trail}%}}")),
            "endgeneration" => Some(format!("{{%{lead} endfilter {trail}%}}")),
            _ => None,
        };
        match replaced {
            Some(r) => {
                found = true;
                out.push_str(&r);
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    (out, found)
}

/// Python's `json.dumps(x, ensure_ascii=False, indent=indent, separators=..., sort_keys=...)`:
/// `", "` and `": "` between items (`","` with an indent), non-ASCII kept, floats as Python
/// writes them.
fn py_json(v: &Value, indent: Option<usize>, seps: (&str, &str), sort_keys: bool, level: usize, out: &mut String) {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (_, Some(u), _) => out.push_str(&u.to_string()),
            (_, _, Some(f)) => out.push_str(&py_float(f)),
            _ => out.push_str(&n.to_string()),
        },
        Value::String(s) => out.push_str(&serde_json::to_string(s).unwrap_or_default()),
        Value::Array(a) if a.is_empty() => out.push_str("[]"),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(seps.0);
                }
                newline(out, level + 1);
                py_json(x, indent, seps, sort_keys, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        Value::Object(o) if o.is_empty() => out.push_str("{}"),
        Value::Object(o) => {
            out.push('{');
            let mut keys: Vec<&String> = o.keys().collect();
            if sort_keys {
                keys.sort();
            }
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(seps.0);
                }
                newline(out, level + 1);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(seps.1);
                py_json(&o[k], indent, seps, sort_keys, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
    }
}

/// A float as Python's `repr` writes it (`1.0`, `0.1`, `1e-05`, `1e+20`).
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let exp: i32 = if f == 0.0 { 0 } else { format!("{f:e}").rsplit('e').next().and_then(|e| e.parse().ok()).unwrap_or(0) };
    if (-4..16).contains(&exp) {
        let s = format!("{f}");
        if s.contains('.') || s.contains('e') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        // Shortest round-trip digits in scientific form, exponent with a sign and two digits.
        let s = format!("{f:e}");
        let (mant, e) = s.split_once('e').unwrap_or((&s, "0"));
        let e: i32 = e.parse().unwrap_or(0);
        format!("{mant}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
    }
}

/// A value as Python's `repr` writes it inside a container: strings quoted (`'a'`), `None`,
/// `True`, floats with their `.0`.
fn py_repr(v: &minijinja::Value, out: &mut String) {
    use minijinja::value::ValueKind;
    match v.kind() {
        ValueKind::String => {
            let s = v.as_str().unwrap_or("");
            let q = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
            out.push(q);
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if c == q => {
                        out.push('\\');
                        out.push(c);
                    }
                    c => out.push(c),
                }
            }
            out.push(q);
        }
        _ => py_str(v, out),
    }
}

/// A value as Python's `str` writes it (what `{{ value }}` prints under transformers): lists and
/// dicts in Python's notation, `None`, `True`/`False`, floats with their `.0`.
fn py_str(v: &minijinja::Value, out: &mut String) {
    use minijinja::value::ValueKind;
    match v.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number if !v.is_integer() => out.push_str(&py_float(f64::try_from(v.clone()).unwrap_or(f64::NAN))),
        ValueKind::Seq => {
            out.push('[');
            for (i, x) in v.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&x, out);
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, k) in v.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&k, out);
                out.push_str(": ");
                py_repr(&v.get_item(&k).unwrap_or_default(), out);
            }
            out.push('}');
        }
        _ => out.push_str(&v.to_string()),
    }
}

fn mj_err(msg: impl Into<String>) -> minijinja::Error {
    minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg.into())
}

/// transformers' `tojson` filter: `json.dumps` with `ensure_ascii=False` and its keyword options.
fn tojson(v: minijinja::Value, kwargs: minijinja::value::Kwargs) -> std::result::Result<minijinja::Value, minijinja::Error> {
    let json: Value = serde_json::to_value(&v).map_err(|e| mj_err(format!("tojson: {e}")))?;
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let (item, key) = match &separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => return Err(mj_err("tojson: separators must be a pair")),
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let mut out = String::new();
    py_json(&json, indent, (&item, &key), sort_keys.unwrap_or(false), 0, &mut out);
    if ensure_ascii == Some(true) {
        // Python escapes every non-ASCII character as \uXXXX (UTF-16, surrogate pairs above the BMP).
        let mut ascii = String::with_capacity(out.len());
        for c in out.chars() {
            if c.is_ascii() {
                ascii.push(c);
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    ascii.push_str(&format!("\\u{:04x}", u));
                }
            }
        }
        out = ascii;
    }
    Ok(minijinja::Value::from_safe_string(out))
}

/// Python's `datetime.now().strftime(format)` (local time).
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    let c = std::ffi::CString::new(format).map_err(|_| mj_err("strftime_now: the format contains a NUL byte"))?;
    // SAFETY: time and localtime_r only write into the locals passed; strftime writes at most
    // buf.len() bytes into buf and returns how many it wrote (0 when it did not fit).
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return Err(mj_err("strftime_now: no local time"));
        }
        // strftime returns 0 when the result does not fit (or is empty): grow and retry.
        let mut size = 256;
        loop {
            let mut buf = vec![0u8; size];
            let n = libc::strftime(buf.as_mut_ptr().cast(), buf.len(), c.as_ptr(), &tm);
            if n > 0 || size >= 1 << 16 {
                buf.truncate(n);
                return Ok(String::from_utf8_lossy(&buf).into_owned());
            }
            size *= 4;
        }
    }
}

/// Python string and list methods beyond minijinja-contrib's pycompat.
fn py_methods(state: &minijinja::State, value: &minijinja::Value, method: &str, args: &[minijinja::Value]) -> std::result::Result<minijinja::Value, minijinja::Error> {
    use minijinja::Value as V;
    let arg_str = |i: usize| -> std::result::Result<String, minijinja::Error> {
        args.get(i).and_then(|a| a.as_str().map(str::to_string)).ok_or_else(|| mj_err(format!("{method}: argument {} must be a string", i + 1)))
    };
    if let Some(s) = value.as_str() {
        let r = match method {
            "removeprefix" => V::from(s.strip_prefix(arg_str(0)?.as_str()).unwrap_or(s)),
            "removesuffix" => V::from(s.strip_suffix(arg_str(0)?.as_str()).unwrap_or(s)),
            "rsplit" => {
                let maxsplit = args.get(1).and_then(|a| i64::try_from(a.clone()).ok()).unwrap_or(-1);
                let parts: Vec<String> = match args.first().filter(|a| !a.is_none()) {
                    Some(sep) => {
                        let sep = sep.as_str().ok_or_else(|| mj_err("rsplit: the separator must be a string"))?;
                        let mut v: Vec<String> = if maxsplit < 0 { s.rsplit(sep).map(str::to_string).collect() } else { s.rsplitn(maxsplit as usize + 1, sep).map(str::to_string).collect() };
                        v.reverse();
                        v
                    }
                    None if maxsplit < 0 => s.split_whitespace().map(str::to_string).collect(),
                    None => {
                        // Python: at most `maxsplit` splits from the right; the rest keeps its
                        // inner whitespace (leading whitespace of the rest stripped).
                        let mut words: Vec<String> = Vec::new();
                        let mut rest = s.trim_end();
                        while (words.len() as i64) < maxsplit {
                            match rest.rfind(char::is_whitespace) {
                                Some(i) => {
                                    let ws = rest[i..].chars().next().map_or(1, |c| c.len_utf8());
                                    words.push(rest[i + ws..].to_string());
                                    rest = rest[..i].trim_end();
                                }
                                None => break,
                            }
                        }
                        if !rest.trim_start().is_empty() {
                            words.push(rest.trim_start().to_string());
                        }
                        words.reverse();
                        words
                    }
                };
                V::from(parts)
            }
            "partition" | "rpartition" => {
                let sep = arg_str(0)?;
                let found = if method == "partition" { s.find(&sep) } else { s.rfind(&sep) };
                let (a, b, c) = match found {
                    Some(i) => (&s[..i], sep.as_str(), &s[i + sep.len()..]),
                    None if method == "partition" => (s, "", ""),
                    None => ("", "", s),
                };
                V::from(vec![V::from(a), V::from(b), V::from(c)])
            }
            "index" | "rindex" => {
                let sub = arg_str(0)?;
                let found = if method == "index" { s.find(&sub) } else { s.rfind(&sub) };
                let i = found.ok_or_else(|| mj_err("substring not found"))?;
                V::from(s[..i].chars().count())
            }
            "zfill" => {
                let width = args.first().and_then(|a| usize::try_from(a.clone()).ok()).unwrap_or(0);
                let n = s.chars().count();
                if n >= width {
                    V::from(s)
                } else {
                    let (sign, digits) = if s.starts_with(['-', '+']) { s.split_at(1) } else { ("", s) };
                    V::from(format!("{sign}{}{digits}", "0".repeat(width - n)))
                }
            }
            "ljust" | "rjust" | "center" => {
                let width = args.first().and_then(|a| usize::try_from(a.clone()).ok()).unwrap_or(0);
                let fill = args.get(1).and_then(|a| a.as_str()).and_then(|f| f.chars().next()).unwrap_or(' ');
                let n = s.chars().count();
                if n >= width {
                    V::from(s)
                } else {
                    let pad = width - n;
                    let (l, r) = match method {
                        "ljust" => (0, pad),
                        "rjust" => (pad, 0),
                        // Python centres with the extra space on the right when both are odd.
                        _ => {
                            let l = pad / 2 + (pad & width & 1);
                            (l, pad - l)
                        }
                    };
                    V::from(format!("{}{s}{}", fill.to_string().repeat(l), fill.to_string().repeat(r)))
                }
            }
            "swapcase" => V::from(s.chars().map(|c| if c.is_uppercase() { c.to_lowercase().collect::<String>() } else { c.to_uppercase().collect() }).collect::<String>()),
            "casefold" => V::from(s.to_lowercase()),
            "isnumeric" | "isdecimal" => V::from(!s.is_empty() && s.chars().all(|c| c.is_numeric())),
            _ => return minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args),
        };
        return Ok(r);
    }
    if value.kind() == minijinja::value::ValueKind::Seq && method == "index" {
        let needle = args.first().ok_or_else(|| mj_err("index: one argument"))?;
        let items: Vec<V> = value.try_iter()?.collect();
        return items.iter().position(|x| x == needle).map(V::from).ok_or_else(|| mj_err("value is not in list"));
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// Messages as transformers hands them to the template: keys whose value is null dropped, and a
/// message's reasoning (`reasoning_content`, `thinking` or `reasoning`) under both
/// `reasoning_content` and `thinking`.
fn normalize(messages: &[Value]) -> Vec<Value> {
    messages
        .iter()
        .map(|m| match m {
            Value::Object(o) => {
                let mut o: Map<String, Value> = o.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect();
                if let Some(r) = ["reasoning_content", "thinking", "reasoning"].iter().find_map(|k| o.get(*k).cloned()) {
                    let mut aliased = Map::new();
                    aliased.insert("thinking".into(), r.clone());
                    for (k, v) in o.iter() {
                        aliased.insert(k.clone(), v.clone());
                    }
                    aliased.insert("reasoning_content".into(), r);
                    o = aliased;
                }
                Value::Object(o)
            }
            other => other.clone(),
        })
        .collect()
}

impl ChatTemplate {
    /// From a template source and its folder's `tokenizer_config.json` value.
    pub fn from_source(source: &str, path: &Path, config: &Value) -> Result<ChatTemplate> {
        let (source, has_generation) = rewrite_generation_tags(source);
        // Compiled once, here: a broken template fails before training starts.
        let env = std::sync::Arc::new(Self::env(source, path)?);
        Ok(ChatTemplate { env, path: path.to_path_buf(), has_generation, special: special_tokens(config) })
    }

    /// From `tokenizer_config.json` (`chat_template` as a string, or a list of named templates of
    /// which "default" is used) or `chat_template.jinja`. None when the folder has neither.
    pub fn load(dir: &Path) -> Result<Option<ChatTemplate>> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            let t = std::fs::read_to_string(&cfg_path).map_err(TrainerError::io(&cfg_path))?;
            serde_json::from_str(&t).map_err(|e| TrainerError::config(&cfg_path, format!("line {}: {e}", e.line())))?
        } else {
            Value::Null
        };
        let jinja = dir.join("chat_template.jinja");
        let (source, path) = if jinja.exists() {
            (std::fs::read_to_string(&jinja).map_err(TrainerError::io(&jinja))?, jinja)
        } else {
            match cfg.get("chat_template") {
                Some(Value::String(s)) => (s.clone(), cfg_path.clone()),
                Some(Value::Array(list)) => {
                    let pick = list.iter().find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default")).or(list.first());
                    match pick.and_then(|t| t.get("template")).and_then(|t| t.as_str()) {
                        Some(s) => (s.to_string(), cfg_path.clone()),
                        None => return Err(TrainerError::config(&cfg_path, "`chat_template` list has no usable template")),
                    }
                }
                _ => return Ok(None),
            }
        };
        ChatTemplate::from_source(&source, &path, &cfg).map(Some)
    }

    fn env(source: String, path: &Path) -> Result<minijinja::Environment<'static>> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(py_methods);
        // `{{ value }}` prints what Python's str() prints (templates print tool-call arguments,
        // flags and lists directly); strings and safe strings as they are.
        env.set_formatter(|out, _state, value| {
            use minijinja::value::ValueKind;
            let text = match value.kind() {
                ValueKind::String => value.to_string(),
                _ => {
                    let mut s = String::new();
                    py_str(value, &mut s);
                    s
                }
            };
            out.write_str(&text).map_err(|e| mj_err(format!("write: {e}")))
        });
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> { Err(mj_err(msg)) });
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        // Filters that turn a value into text do it as Python's str() does.
        env.add_filter("string", |v: minijinja::Value| -> String {
            let mut s = String::new();
            py_str(&v, &mut s);
            s
        });
        env.add_filter("trim", |v: minijinja::Value, chars: Option<String>| -> String {
            let mut s = String::new();
            py_str(&v, &mut s);
            match chars {
                Some(c) => s.trim_matches(|x| c.contains(x)).to_string(),
                None => s.trim().to_string(),
            }
        });
        env.add_filter(GEN_FILTER, |s: String| format!("{GEN_OPEN}{s}{GEN_CLOSE}"));
        env.add_template_owned("chat", source).map_err(|e| TrainerError::config(path, format!("chat template does not compile: {e}")))?;
        Ok(env)
    }

    /// Whether the template marks assistant text with `{% generation %}`.
    pub fn has_generation(&self) -> bool {
        self.has_generation
    }

    /// Renders a conversation; the error is the template's own message (`raise_exception`) or
    /// minijinja's, with the template's file.
    pub fn render(&self, conv: &Conversation, add_generation_prompt: bool) -> std::result::Result<Rendered, String> {
        let tmpl = self.env.get_template("chat").map_err(|e| e.to_string())?;
        if self.has_generation {
            let data = serde_json::to_string(&(&conv.messages, &conv.tools, &conv.documents, &conv.kwargs)).unwrap_or_default();
            if data.contains(GEN_OPEN) || data.contains(GEN_CLOSE) {
                return Err("the conversation contains U+E000 or U+E001, which mark the template's {% generation %} spans".into());
            }
        }
        let mut ctx = self.special.clone();
        for (k, v) in &conv.kwargs {
            ctx.insert(k.clone(), v.clone());
        }
        ctx.insert("messages".into(), Value::Array(normalize(&conv.messages)));
        ctx.insert("tools".into(), conv.tools.clone().unwrap_or(Value::Null));
        ctx.insert("documents".into(), conv.documents.clone().unwrap_or(Value::Null));
        ctx.insert("add_generation_prompt".into(), Value::Bool(add_generation_prompt));
        let raw = tmpl.render(minijinja::Value::from_serialize(&ctx)).map_err(|e| {
            let mut msg = format!("chat template ({}): {e}", self.path.display());
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg += &format!(": {s}");
                src = s.source();
            }
            msg
        })?;
        if !self.has_generation {
            return Ok(Rendered { text: raw, generation: Vec::new() });
        }
        // Strip the generation markers, recording where they were.
        let mut text = String::with_capacity(raw.len());
        let mut generation = Vec::new();
        let mut open = None;
        for c in raw.chars() {
            match c {
                GEN_OPEN => open = Some(text.len()),
                GEN_CLOSE => {
                    if let Some(start) = open.take() {
                        generation.push(start..text.len());
                    }
                }
                c => text.push(c),
            }
        }
        Ok(Rendered { text, generation })
    }

    /// Renders a conversation and marks the tokens of its assistant turns as targets.
    pub fn encode(&self, tok: &Tokenizer, conv: &Conversation) -> std::result::Result<Example, String> {
        for (i, m) in conv.messages.iter().enumerate() {
            let role = m.get("role").and_then(|r| r.as_str()).ok_or(format!("messages[{i}]: missing string `role`"))?;
            if m.get("content").is_none() && m.get("tool_calls").is_none() {
                return Err(format!("messages[{i}] ({role}): missing `content`"));
            }
        }
        if !conv.messages.iter().any(|m| m.get("role").and_then(|r| r.as_str()) == Some("assistant")) {
            return Err("`messages` has no assistant turn to train on".into());
        }
        let r = self.render(conv, false)?;
        let spans = if self.has_generation {
            r.generation.clone()
        } else {
            let specials: Vec<String> = tok.get_added_tokens_decoder().values().filter(|t| t.special).map(|t| t.content.clone()).collect();
            self.assistant_spans(conv, &r.text, &specials)?
        };
        if spans.is_empty() {
            return Err(if self.has_generation {
                "the chat template's {% generation %} blocks marked no text: nothing to train on".into()
            } else {
                "no assistant message has content to train on".into()
            });
        }
        // The template writes BOS itself: no special tokens from the tokenizer.
        let e = tok.encode(r.text.as_str(), false).map_err(|e| format!("cannot encode: {e}"))?;
        let ids: Vec<i64> = e.get_ids().iter().map(|&i| i as i64).collect();
        Ok(Example { target: token_mask(&e, &spans), ids })
    }
}

/// transformers' mapping of character spans to an assistant mask: from the token holding the
/// span's first byte to the token holding its last (to the end when that has none); a span whose
/// first byte is in no token ends the marking.
fn token_mask(e: &tokenizers::Encoding, spans: &[Range<usize>]) -> Vec<bool> {
    let n = e.get_ids().len();
    let mut mask = vec![false; n];
    for s in spans.iter().filter(|s| !s.is_empty()) {
        let Some(start) = e.char_to_token(s.start, 0) else { break };
        let end = e.char_to_token(s.end - 1, 0).map_or(n, |t| t + 1);
        for m in &mut mask[start..end.max(start)] {
            *m = true;
        }
    }
    mask
}

/// The special token right after `end` (whitespace between allowed), if any.
fn special_after<'s>(text: &str, end: usize, specials: &'s [String]) -> Option<(usize, &'s str)> {
    let after = &text[end..];
    let ws = after.len() - after.trim_start().len();
    specials.iter().filter(|s| after[ws..].starts_with(s.as_str())).max_by_key(|s| s.len()).map(|s| (ws, s.as_str()))
}

/// `end` moved over the end-of-turn token the template writes right after an assistant
/// message's content (`<|im_end|>`, `<|eot_id|>`, `</s>`), when there is one. A special token
/// followed by a role name (`<|im_start|>user`) opens the next turn instead and is left out.
fn end_of_turn(text: &str, end: usize, specials: &[String], roles: &[&str]) -> usize {
    match special_after(text, end, specials) {
        Some((ws, s)) => {
            let next = text[end + ws + s.len()..].trim_start();
            if roles.iter().any(|r| next.starts_with(r)) {
                end
            } else {
                end + ws + s.len()
            }
        }
        None => end,
    }
}

fn sentinel(i: usize) -> String {
    format!("\u{E100}{i}\u{E101}")
}

/// Bytes `a` and `b` share at their start (on a character boundary of `a`).
fn common_prefix(a: &str, b: &str) -> usize {
    let mut n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    while !a.is_char_boundary(n) {
        n -= 1;
    }
    n
}

/// Bytes `a` and `b` share at their end (on a character boundary of `a`).
fn common_suffix(a: &str, b: &str) -> usize {
    let mut n = a.bytes().rev().zip(b.bytes().rev()).take_while(|(x, y)| x == y).count();
    while !a.is_char_boundary(a.len() - n) {
        n -= 1;
    }
    n
}

/// Where a message's content may appear once rendered: whole, trimmed, or the answer after its
/// reasoning (templates drop earlier turns' thinking).
fn candidates(content: &str) -> Vec<&str> {
    let mut v = vec![content, content.trim(), content.rsplit("</think>").next().unwrap_or("").trim()];
    v.retain(|c| !c.is_empty());
    v.dedup();
    v
}

impl ChatTemplate {
    /// Without generation blocks, for each assistant message: the conversation rendered again
    /// with only that message's content replaced by a sentinel differs from the real rendering in
    /// one region — what the content influenced. The content's span is that region when the
    /// template writes the content verbatim; otherwise the one place inside it where the content
    /// (trimmed, or the answer after its reasoning) appears, or the last when the region ends with
    /// it. Then the end-of-turn token after it (see [`end_of_turn`]). No prefix is rendered on its own, so
    /// templates that render earlier turns differently from later ones work.
    fn assistant_spans(&self, conv: &Conversation, real: &str, specials: &[String]) -> std::result::Result<Vec<Range<usize>>, String> {
        let mut roles: Vec<&str> = conv.messages.iter().filter_map(|m| m.get("role").and_then(|r| r.as_str())).collect();
        roles.extend(["user", "assistant", "system", "tool", "developer"]);
        let mut spans = Vec::new();
        for (i, m) in conv.messages.iter().enumerate() {
            if m.get("role").and_then(|r| r.as_str()) != Some("assistant") {
                continue;
            }
            let mut marked = conv.clone();
            // A string content, or the text parts of a list of parts (the first part's text
            // becomes the sentinel, the others empty).
            let content: String = match m.get("content") {
                Some(Value::String(c)) => {
                    marked.messages[i]["content"] = Value::String(sentinel(i));
                    c.clone()
                }
                Some(Value::Array(parts)) if parts.iter().any(|p| p.get("text").is_some_and(|t| t.is_string())) => {
                    let mut first = true;
                    if let Some(Value::Array(mparts)) = marked.messages[i].get_mut("content") {
                        for p in mparts.iter_mut().filter(|p| p.get("text").is_some_and(|t| t.is_string())) {
                            p["text"] = Value::String(if first { sentinel(i) } else { String::new() });
                            first = false;
                        }
                    }
                    parts.iter().filter_map(|p| p.get("text").and_then(|t| t.as_str())).collect()
                }
                _ => continue, // tool calls only: nothing of the message's own text to train
            };
            let content = content.as_str();
            let other = self.render(&marked, false)?.text;
            let start = common_prefix(real, &other);
            let end = real.len() - common_suffix(&real[start..], &other[start.min(other.len())..]);
            let region = &real[start..end];
            if region.is_empty() || content.trim().is_empty() {
                continue; // the template does not render this content, or it is empty: nothing to train
            }
            // Several text parts: the region from the first part to the last, whatever the
            // template writes between them.
            let parts: Vec<&str> = match m.get("content") {
                Some(Value::Array(p)) => p.iter().filter_map(|p| p.get("text").and_then(|t| t.as_str())).map(str::trim).filter(|t| !t.is_empty()).collect(),
                _ => Vec::new(),
            };
            let trimmed = region.trim();
            let span = if region == content {
                start..end
            } else if parts.len() > 1 && trimmed.starts_with(parts[0]) && trimmed.ends_with(parts[parts.len() - 1]) {
                let lead = region.len() - region.trim_start().len();
                start + lead..start + lead + trimmed.len()
            } else {
                let mut found = None;
                for c in candidates(content) {
                    let hits: Vec<usize> = region.match_indices(c).map(|(at, _)| at).collect();
                    match hits.as_slice() {
                        [] => continue,
                        [one] => found = Some(start + one..start + one + c.len()),
                        [_, ..] if region.trim_end().ends_with(c) => {
                            let at = start + region.trim_end().len() - c.len();
                            found = Some(at..at + c.len());
                        }
                        _ => return Err(format!("messages[{i}] (assistant): the chat template writes this content {} times; which copy is the answer is ambiguous (a template with {{% generation %}} blocks says)", hits.len())),
                    }
                    break;
                }
                found.ok_or(format!("messages[{i}] (assistant): its content does not appear in the rendered conversation, so its tokens cannot be found (a template with {{% generation %}} blocks avoids this)"))?
            };
            // Whitespace at either end belongs to no token (a span starting there would mark nothing).
            let text = &real[span.clone()];
            let (lead, trail) = (text.len() - text.trim_start().len(), text.len() - text.trim_end().len());
            let (a, b) = (span.start + lead, (span.end - trail).max(span.start + lead));
            spans.push(a..end_of_turn(real, b, specials, &roles));
        }
        Ok(spans)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_become_filter_blocks_with_their_whitespace_control() {
        let (s, found) = rewrite_generation_tags("a{%- generation -%}b{% endgeneration %}c{% if x %}{% endif %}");
        assert!(found);
        assert_eq!(s, "a{%- filter strata_generation -%}b{% endfilter %}c{% if x %}{% endif %}");
        assert_eq!(rewrite_generation_tags("{{ x }}{% for m in y %}{% endfor %}"), ("{{ x }}{% for m in y %}{% endfor %}".to_string(), false));
        assert_eq!(rewrite_generation_tags("{{ '{%}' }}{% if a %}b{% endif %}").1, false);
    }

    #[test]
    fn python_methods_and_filters_render_as_python_does() {
        let t = ChatTemplate::from_source(
            "{{ m.rsplit(None, 1) }}|{{ m.rsplit(' ', 1) }}|{{ m.partition(':') }}|{{ x | tojson(ensure_ascii=True) }}|{{ x }}|{{ flag }}|{{ none }}|{{ m.zfill(12) }}|{{ 'ab'.center(5, '*') }}",
            Path::new("t.jinja"),
            &Value::Null,
        )
        .unwrap();
        let conv = Conversation { kwargs: serde_json::from_str(r#"{"m": "a b  c:d", "x": {"é": [1.5, true, null, "it's"]}, "flag": false, "none": null}"#).unwrap(), ..Default::default() };
        let r = t.render(&conv, false).unwrap();
        // Python prints partition's tuple with parentheses; minijinja has no tuples.
        assert_eq!(r.text, r#"['a b', 'c:d']|['a b ', 'c:d']|['a b  c', ':', 'd']|{"\u00e9": [1.5, true, null, "it's"]}|{'é': [1.5, True, None, "it's"]}|False|None|0000a b  c:d|**ab*"#);
    }

    #[test]
    fn json_and_floats_as_python_writes_them() {
        let v: Value = serde_json::from_str(r#"{"b": [1, 2.5, "é<"], "a": {"x": null, "y": 1e-7, "z": 3.0}}"#).unwrap();
        let mut s = String::new();
        py_json(&v, None, (", ", ": "), false, 0, &mut s);
        assert_eq!(s, r#"{"b": [1, 2.5, "é<"], "a": {"x": null, "y": 1e-07, "z": 3.0}}"#);
        let mut s = String::new();
        py_json(&v, Some(2), (",", ": "), true, 0, &mut s);
        assert_eq!(s, "{\n  \"a\": {\n    \"x\": null,\n    \"y\": 1e-07,\n    \"z\": 3.0\n  },\n  \"b\": [\n    1,\n    2.5,\n    \"é<\"\n  ]\n}");
        assert_eq!(py_float(1e20), "1e+20");
        assert_eq!(py_float(9999999999999998.0), "9999999999999998.0");
        assert_eq!(py_float(1e16), "1e+16");
        assert_eq!(py_float(0.0001), "0.0001");
        assert_eq!(py_float(0.00001), "1e-05");
        assert_eq!(py_float(0.1), "0.1");
        assert_eq!(py_float(123456.0), "123456.0");
    }
}
