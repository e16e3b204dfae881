//! `train`: the strata command line.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use trainer::config::ModelConfig;
use trainer::model::Model;
use trainer::{device, eval, tokenizer};

#[derive(Parser)]
#[command(name = "train", version, about = "Long-context fine-tuning with explicit activation placement")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mean next-token loss and perplexity of a Hugging Face model folder over JSONL files of
    /// {"text": ...} lines (one result per file).
    Eval {
        /// Folder with config.json, model.safetensors (or a sharded index) and tokenizer.json.
        #[arg(long)]
        model: PathBuf,
        /// JSONL file(s), one {"text": ...} object per line.
        #[arg(long, required = true, num_args = 1..)]
        data: Vec<PathBuf>,
        /// Truncate each document to this many tokens.
        #[arg(long)]
        max_tokens: Option<usize>,
        /// cpu, cuda or auto.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Compute dtype: float32, float64, bfloat16, float16.
        #[arg(long, default_value = "float32")]
        dtype: String,
        /// Tokens per chunk of the fused LM-head + cross-entropy (the [chunk, vocab] logits are
        /// the largest transient of the loss).
        #[arg(long, default_value_t = 1024)]
        loss_chunk: i64,
        /// One JSON object per file instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks (numbers to read, not pass/fail).
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand)]
enum BenchCmd {
    /// One forward + explicit backward of a Llama-shaped model with random weights.
    Step {
        #[arg(long, default_value_t = 8)]
        layers: i64,
        #[arg(long, default_value_t = 512)]
        hidden: i64,
        #[arg(long, default_value_t = 8)]
        heads: i64,
        #[arg(long, default_value_t = 4)]
        kv_heads: i64,
        #[arg(long, default_value_t = 1376)]
        intermediate: i64,
        #[arg(long, default_value_t = 32000)]
        vocab: i64,
        #[arg(long, default_value_t = 4096)]
        tokens: i64,
        #[arg(long, default_value_t = 3)]
        iters: usize,
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long, default_value = "float32")]
        dtype: String,
    },
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.cmd {
        Cmd::Eval { model, data, max_tokens, device, dtype, loss_chunk, json } => {
            let dev = device::parse_device(&device)?;
            let kind = device::parse_dtype(&dtype)?;
            if loss_chunk <= 0 {
                return Err(format!("--loss-chunk must be positive, found {loss_chunk}").into());
            }
            let (cfg, warnings) = ModelConfig::load(&model)?;
            for w in warnings {
                eprintln!("warning: {w}");
            }
            let tok = tokenizer::load(&model)?;
            let (m, unused) = Model::load(&model, cfg, kind, dev)?;
            if !unused.is_empty() {
                eprintln!("warning: {}: {} tensor(s) in the checkpoint are not used: {}", model.display(), unused.len(), unused.join(", "));
            }
            let tok_path = model.join(tokenizer::TOKENIZER_FILE);
            for file in &data {
                let r = eval::eval_file(&m, &tok, &tok_path, file, max_tokens, loss_chunk)?;
                if json {
                    let v = serde_json::json!({
                        "file": r.file.display().to_string(),
                        "loss": r.loss,
                        "perplexity": r.perplexity,
                        "tokens": r.tokens,
                        "sequences": r.sequences,
                        "device": format!("{dev:?}"),
                        "dtype": dtype,
                    });
                    println!("{v}");
                } else {
                    println!(
                        "{}: loss {:.6} perplexity {:.4} ({} tokens predicted in {} sequences)",
                        r.file.display(),
                        r.loss,
                        r.perplexity,
                        r.tokens,
                        r.sequences
                    );
                }
            }
            Ok(())
        }
        Cmd::Bench(BenchCmd::Step { layers, hidden, heads, kv_heads, intermediate, vocab, tokens, iters, device, dtype }) => {
            let dev = device::parse_device(&device)?;
            let kind = device::parse_dtype(&dtype)?;
            if [layers, hidden, heads, kv_heads, intermediate, vocab, tokens].iter().any(|v| *v <= 0) || iters == 0 {
                return Err("bench step: every size and --iters must be positive".into());
            }
            let b = trainer::bench::StepBench { layers, hidden, heads, kv_heads, intermediate, vocab, tokens, iters };
            println!("{}", trainer::bench::run_step_bench(&b, kind, dev)?);
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Every error of ours already names its cause in its message.
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
