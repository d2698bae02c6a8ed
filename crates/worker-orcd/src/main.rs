//! worker-orcd: the command-line entry point. Argument parsing, wiring and
//! output only; the work is done by the library crates.

mod bench;
mod bench_serving;
mod inspect;
mod run;
mod selftest;
mod serve;

/// mimalloc rather than the system allocator: a prompt's forward pass
/// allocates and frees megabytes of activations per layer, which glibc
/// hands back to the kernel and faults in again (zeroed) each time — on 2
/// cores that was 5% of a prefill's samples, serial, and 13–26% of its
/// speed at 2 threads (Qwen2.5-0.5B, Gemma-3-270M, 289-token prompts).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use engine::convert::{requantize, FileType};
use engine::synth::{synthesize, Preset, SynthOptions};
use gguf::GgufFile;

#[derive(Parser)]
#[command(name = "worker-orcd", version, about = "GGUF inference worker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the model over HTTP: the worker API and an OpenAI-compatible API.
    Serve(serve::ServeArgs),
    /// Generate text from a prompt, streaming it to stdout (speed goes to stderr).
    Generate {
        #[command(flatten)]
        model: run::ModelArgs,
        #[command(flatten)]
        gpu: run::GpuArgs,
        #[command(flatten)]
        sampling: run::SamplingArgs,
        /// The prompt, used as given (special tokens such as <|im_start|> in
        /// it are parsed) unless --chat wraps it in the model's template;
        /// `-` reads it from standard input.
        #[arg(short, long, required_unless_present = "file", conflicts_with = "file")]
        prompt: Option<String>,
        /// Read the prompt from this file.
        #[arg(short = 'f', long)]
        file: Option<PathBuf>,
        /// Send the prompt as a user message through the model's chat template.
        #[arg(long)]
        chat: bool,
    },
    /// Measure load time, prompt processing (pp) and decode (tg) speed.
    Bench(bench::BenchArgs),
    /// Check the GPU backend against the CPU backend on one model.
    Selftest(selftest::SelftestArgs),
    /// Chat interactively with the model's chat template.
    Chat {
        #[command(flatten)]
        model: run::ModelArgs,
        #[command(flatten)]
        gpu: run::GpuArgs,
        #[command(flatten)]
        sampling: run::SamplingArgs,
        /// System prompt.
        #[arg(long)]
        system: Option<String>,
    },
    /// Print a GGUF file's metadata, tensor table and memory needs.
    Inspect {
        file: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Print arrays and strings in full instead of shortening them.
        #[arg(long)]
        full: bool,
        /// Decode every tensor and report non-finite values per tensor
        /// (loading scans only norm and bias vectors); exits with an error
        /// if any tensor has them.
        #[arg(long)]
        check: bool,
    },
    /// Re-quantize a model file (llama.cpp's per-tensor rules for the _S/_M mixes).
    Quantize {
        input: PathBuf,
        output: PathBuf,
        /// F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K.
        #[arg(long = "type", short = 't')]
        file_type: String,
    },
    /// Write a model of a preset's exact shape with seeded random weights.
    Synth {
        /// A shape: qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b, qwen2.5-32b, llama3.2-1b, smollm2-135m, gemma3-270m, … (an unknown name lists them all).
        #[arg(long)]
        preset: String,
        /// Quantization mix, as for `quantize --type`.
        #[arg(long = "quant", default_value = "Q4_K_M")]
        file_type: String,
        /// Copy the tokenizer and chat template from this GGUF file.
        #[arg(long)]
        tokenizer_from: PathBuf,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(short, long)]
        output: PathBuf,
    },
}

fn parse_file_type(name: &str) -> Result<FileType> {
    FileType::from_name(name).with_context(|| {
        let names: Vec<&str> = FileType::ALL.iter().map(|t| t.name()).collect();
        format!(
            "unknown quantization type {name:?}; expected one of {}",
            names.join(", ")
        )
    })
}

fn open(path: &PathBuf) -> Result<GgufFile> {
    GgufFile::open(path).with_context(|| format!("reading {}", path.display()))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve::run_serve(&args)?,
        Command::Generate {
            model,
            gpu,
            sampling,
            prompt,
            file,
            chat,
        } => {
            let source = match (prompt, file) {
                (Some(p), _) if p == "-" => run::PromptSource::Stdin,
                (Some(p), _) => run::PromptSource::Text(p),
                (None, Some(f)) => run::PromptSource::File(f),
                (None, None) => {
                    bail!("give a prompt with -p TEXT, -p - (standard input) or -f FILE")
                }
            };
            run::run_generate(&model, &gpu, &sampling, &source, chat)?
        }
        Command::Bench(args) => bench::run_bench(&args)?,
        Command::Selftest(args) => selftest::run_selftest(&args)?,
        Command::Chat {
            model,
            gpu,
            sampling,
            system,
        } => run::run_chat(&model, &gpu, &sampling, system.as_deref())?,
        Command::Inspect {
            file,
            json,
            full,
            check,
        } => {
            let gguf = open(&file)?;
            let report = inspect::Report::new(&gguf);
            let support = inspect::Support::new(&gguf);
            let checks = check.then(|| inspect::check_tensors(&gguf));
            let sound = checks
                .as_ref()
                .is_none_or(|c| c.iter().all(|t| t.error.is_none() && t.non_finite == 0));
            let mut out = std::io::stdout().lock();
            let written = if json {
                let mut value = report.to_json();
                value["support"] = support.to_json();
                if let Some(checks) = &checks {
                    value["check"] = inspect::checks_json(checks);
                }
                let text = serde_json::to_string_pretty(&value)?;
                writeln!(out, "{text}")
            } else {
                report
                    .print(&mut out, full)
                    .and_then(|()| support.print(&mut out))
                    .and_then(|()| match &checks {
                        Some(checks) => inspect::print_checks(&mut out, checks).map(|_| ()),
                        None => Ok(()),
                    })
            };
            match written {
                // A closed pipe (`inspect … | head`) is not an error.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                other => other?,
            }
            if !sound {
                bail!(
                    "{}: some tensors have non-finite values or cannot be decoded",
                    file.display()
                );
            }
        }
        Command::Quantize {
            input,
            output,
            file_type,
        } => {
            let file_type = parse_file_type(&file_type)?;
            let start = Instant::now();
            let gguf = open(&input)?;
            let writer = requantize(&gguf, file_type)?;
            writer
                .write_to_path(&output)
                .with_context(|| format!("writing {}", output.display()))?;
            let out = open(&output)?;
            eprintln!(
                "{} → {} ({}): {:.1} MiB → {:.1} MiB of tensors in {:.2} s",
                input.display(),
                output.display(),
                file_type.name(),
                mib(gguf.tensor_bytes_total()),
                mib(out.tensor_bytes_total()),
                start.elapsed().as_secs_f64()
            );
            eprintln!("{}", inspect::type_counts_line(&out));
        }
        Command::Synth {
            preset,
            file_type,
            tokenizer_from,
            seed,
            output,
        } => {
            let Some(preset) = Preset::by_name(&preset) else {
                bail!(
                    "unknown preset {preset:?}; expected one of {}",
                    Preset::names().join(", ")
                );
            };
            let file_type = parse_file_type(&file_type)?;
            let tokenizer = open(&tokenizer_from)?;
            let start = Instant::now();
            let writer = synthesize(&SynthOptions {
                preset,
                file_type,
                seed,
                tokenizer_from: &tokenizer,
            })?;
            writer
                .write_to_path(&output)
                .with_context(|| format!("writing {}", output.display()))?;
            let out = open(&output)?;
            eprintln!(
                "{}: {} {} with seed {seed}, {:.1} MiB of tensors in {:.2} s",
                output.display(),
                preset.name,
                file_type.name(),
                mib(out.tensor_bytes_total()),
                start.elapsed().as_secs_f64()
            );
            eprintln!("{}", inspect::type_counts_line(&out));
        }
    }
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
