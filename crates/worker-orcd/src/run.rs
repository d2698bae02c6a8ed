//! `generate` and `chat`: wiring the CLI to the engine's generation loop.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use engine::backend::Backend;
use engine::cpu::CpuModel;
use engine::generate::{generate_blocking, GenerateParams};
use engine::kv::PAGE_TOKENS;
use engine::sampler::SamplingParams;
use engine::scheduler::{self, Finish, SchedulerConfig, SchedulerHandle};
use gguf::GgufFile;
use tokenizer::{ChatTemplate, Message, Tokenizer, TokenizerError};

/// The model used when none is given: SmolLM2-135M-Instruct from the fetch script's cache.
const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const FETCH_SCRIPT: &str = include_str!("../../../scripts/fetch-models.sh");

#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// GGUF model file [default: SmolLM2-135M-Instruct from the model cache, fetched if missing].
    #[arg(short, long, env = "WORKER_ORCD_MODEL")]
    pub model: Option<PathBuf>,
    /// Context size in tokens [default: the model's training context, at most 4096].
    #[arg(long, env = "WORKER_ORCD_CTX_SIZE")]
    pub ctx_size: Option<usize>,
    /// Allow a --ctx-size past the model's training context (its output degrades there).
    #[arg(long, env = "WORKER_ORCD_ALLOW_CTX_BEYOND_TRAINING")]
    pub allow_ctx_beyond_training: bool,
    /// A Jinja chat template to use instead of the model file's.
    #[arg(long, value_name = "FILE", env = "WORKER_ORCD_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"], env = "WORKER_ORCD_DEVICE")]
    pub device: String,
    /// Worker threads for the CPU backend [default: all cores].
    #[arg(short, long, env = "WORKER_ORCD_THREADS")]
    pub threads: Option<usize>,
    /// CPU matrix products: q8 (activations quantized to 8 bits per block
    /// as llama.cpp does; fast) or f32 (exact: the reference).
    #[arg(long, default_value = "q8", value_parser = ["q8", "f32"], env = "WORKER_ORCD_CPU_ACTIVATIONS")]
    pub cpu_activations: String,
    /// Most tokens one forward pass runs (decode tokens plus prompt chunks).
    /// While sequences decode, prompt chunks are smaller: sized from the
    /// measured step times so that streams keep their pace.
    #[arg(long, default_value_t = 512, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536), env = "WORKER_ORCD_STEP_TOKENS")]
    pub step_tokens: usize,
    /// Do not keep finished sequences' KV caches for prompts that start
    /// with the same tokens (the prefix cache is on by default).
    #[arg(long, env = "WORKER_ORCD_NO_PREFIX_CACHE")]
    pub no_prefix_cache: bool,
}

impl ModelArgs {
    /// The source of `--chat-template FILE`, if given.
    pub fn chat_template_source(&self) -> Result<Option<String>> {
        self.chat_template
            .as_ref()
            .map(|path| {
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading the chat template {}", path.display()))
            })
            .transpose()
    }

    pub fn activations(&self) -> quant::Activations {
        match self.cpu_activations.as_str() {
            "f32" => quant::Activations::F32,
            _ => quant::Activations::Q8,
        }
    }
}

/// How to use the GPU with `--device cuda`.
#[derive(Args, Clone, Debug)]
pub struct GpuArgs {
    /// The GPU to run on, as the driver numbers them.
    #[arg(
        long = "gpu-device",
        default_value_t = 0,
        env = "WORKER_ORCD_GPU_DEVICE"
    )]
    pub gpu_device: usize,
    /// Weights on the GPU: quant keeps the file's blocks (fused
    /// dequantize-and-multiply kernels), f16 dequantizes them at load (cuBLAS).
    #[arg(long, default_value = "quant", value_parser = ["quant", "f16"], env = "WORKER_ORCD_WEIGHTS")]
    pub weights: String,
    /// Run the decode step's kernels unfused (RMSNorm separate, Q/K/V in
    /// three launches), to measure what fusing gains.
    #[arg(long, env = "WORKER_ORCD_UNFUSED")]
    pub unfused: bool,
    /// Most activation rows a product runs through the mat-vec kernels
    /// from the quantized blocks; more go through cuBLAS on f16 (1-8; to
    /// measure where cuBLAS wins).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=8), env = "WORKER_ORCD_MATVEC_ROWS")]
    pub matvec_rows: u64,
}

impl GpuArgs {
    /// Options for loading onto the GPU: `kv_pages` pages of KV cache, forward
    /// passes of up to `max_batch_tokens` tokens, sequences of up to `context`
    /// positions (the training context when `None`).
    pub fn options(
        &self,
        kv_pages: usize,
        max_batch_tokens: usize,
        context: Option<usize>,
    ) -> cuda::CudaOptions {
        cuda::CudaOptions {
            device: cuda::DeviceOptions {
                index: self.gpu_device,
                ..Default::default()
            },
            weights: cuda::WeightsMode::from_name(&self.weights)
                .unwrap_or(cuda::WeightsMode::Quantized),
            kv_pages,
            max_batch_tokens,
            progress: true,
            fuse: !self.unfused,
            matvec_rows: self.matvec_rows as usize,
            context,
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Maximum tokens to generate.
    #[arg(short = 'n', long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 for greedy decoding.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// 1 disables.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// 1 disables.
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// OpenAI's presence penalty, in [-2, 2]: subtracted once from the logit
    /// of every token generated so far.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true, value_parser = penalty)]
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty, in [-2, 2]: subtracted from a token's
    /// logit per time it was generated.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true, value_parser = penalty)]
    pub frequency_penalty: f32,
    /// TOKEN_ID=BIAS: add BIAS (in [-100, 100]; -100 bans the token) to the
    /// token's logit (repeatable).
    #[arg(long, value_parser = logit_bias, allow_hyphen_values = true)]
    pub logit_bias: Vec<(u32, f32)>,
    /// Random seed [default: random, printed to stderr].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this text is generated (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// `--logit-bias` ids must be tokens of the model.
    fn check_vocabulary(&self, tokenizer: &Tokenizer) -> Result<()> {
        if let Some((id, _)) = self
            .logit_bias
            .iter()
            .find(|(id, _)| *id as usize >= tokenizer.vocab_size())
        {
            anyhow::bail!(
                "--logit-bias: token id {id} is outside the vocabulary of {}",
                tokenizer.vocab_size()
            );
        }
        Ok(())
    }

    fn params(&self) -> GenerateParams {
        let seed = self.seed.unwrap_or_else(rand::random);
        GenerateParams {
            max_tokens: self.max_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repeat_penalty,
                penalty_last_n: 64,
                presence_penalty: self.presence_penalty,
                frequency_penalty: self.frequency_penalty,
                logit_bias: self.logit_bias.clone(),
                seed,
            },
            stop: self.stop.clone(),
            logprobs: None,
            constraint: None,
        }
    }
}

fn penalty(text: &str) -> Result<f32, String> {
    match text.parse::<f32>() {
        Ok(v) if (-2.0..=2.0).contains(&v) => Ok(v),
        _ => Err(format!("{text}: a number in [-2, 2] is expected")),
    }
}

fn logit_bias(text: &str) -> Result<(u32, f32), String> {
    let parsed = text.split_once('=').and_then(|(id, bias)| {
        let bias = bias.trim().parse::<f32>().ok()?;
        Some((id.trim().parse::<u32>().ok()?, bias))
    });
    match parsed {
        Some((id, bias)) if (-100.0..=100.0).contains(&bias) => Ok((id, bias)),
        _ => Err(format!(
            "{text}: TOKEN_ID=BIAS is expected, with BIAS in [-100, 100]"
        )),
    }
}

fn models_dir() -> PathBuf {
    match std::env::var_os("WORKER_ORCD_MODELS") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME").unwrap_or_default();
            Path::new(&home).join(".cache/worker-orcd/models")
        }
    }
}

/// The given model, or the default one, fetched with the project's fetch script if missing.
pub fn resolve_model(model: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(path) = model {
        return Ok(path.clone());
    }
    let path = models_dir().join(DEFAULT_MODEL);
    if !path.exists() {
        eprintln!("{} is missing; fetching the default models", path.display());
        let status = Command::new("bash")
            .arg("-c")
            .arg(FETCH_SCRIPT)
            .status()
            .context("running the model fetch script with bash")?;
        if !status.success() {
            bail!("fetching the default model failed ({status})");
        }
    }
    Ok(path)
}

/// A loaded model with its tokenizer, chat template and scheduler.
pub struct Loaded {
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<ChatTemplate>,
    scheduler: Option<SchedulerHandle>,
    /// The scheduler's thread, which owns the model.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Loaded {
    pub fn scheduler(&self) -> &SchedulerHandle {
        self.scheduler
            .as_ref()
            .expect("the scheduler lives as long as Loaded")
    }
}

impl Drop for Loaded {
    /// Waits for the scheduler's thread to drop the model (its GPU memory
    /// and graphs) before the process goes on to exit: a model still being
    /// torn down while the CUDA driver unloads can crash the exit.
    fn drop(&mut self) {
        // The thread ends once no handle is left.
        drop(self.scheduler.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub fn load(args: &ModelArgs, gpu: &GpuArgs) -> Result<Loaded> {
    set_threads(args.threads)?;
    let path = resolve_model(&args.model)?;
    let file =
        Arc::new(GgufFile::open(&path).with_context(|| format!("reading {}", path.display()))?);
    let tokenizer = Tokenizer::from_gguf(file.metadata()).context("loading the tokenizer")?;
    let explicit = args.chat_template_source()?;
    let template = match ChatTemplate::load(file.metadata(), explicit.as_deref()) {
        Ok(template) => Some(template),
        Err(e) if explicit.is_some() => {
            return Err(e).context("the template given with --chat-template")
        }
        Err(TokenizerError::NoTemplate(_)) => None,
        Err(e) => {
            eprintln!("warning: the model's chat template cannot be used ({e}); pass one with --chat-template FILE");
            None
        }
    };
    let spec = engine::spec::ModelSpec::from_gguf(&file)
        .with_context(|| format!("loading {}", path.display()))?;
    let context = spec.serving_context(args.ctx_size, args.allow_ctx_beyond_training)?;
    if args.device != "cuda" {
        engine::kv::check_host_budget(
            context.div_ceil(PAGE_TOKENS) as u128
                * u128::from(engine::kv::cpu_page_bytes(spec.n_layers, spec.kv_dim())),
            &format!("--ctx-size {context}"),
        )?;
    }
    let tokenizer = Arc::new(tokenizer);
    let config = SchedulerConfig {
        context,
        max_running: 1,
        max_queued: 1,
        step_tokens: args.step_tokens,
        kv_pages: context.div_ceil(PAGE_TOKENS),
        prefix_cache: !args.no_prefix_cache,
    };
    fn start<B: Backend>(
        model: B,
        tokenizer: &Arc<Tokenizer>,
        config: SchedulerConfig,
    ) -> (SchedulerHandle, std::thread::JoinHandle<()>) {
        scheduler::spawn(Arc::new(model), tokenizer.clone(), config)
    }
    let (scheduler, thread) = match args.device.as_str() {
        "cuda" => {
            let options = gpu.options(config.kv_pages, config.step_tokens, Some(context));
            let model = cuda::CudaModel::load(file, &options)
                .with_context(|| format!("loading {} onto the GPU", path.display()))?;
            start(model, &tokenizer, config)
        }
        _ => {
            let model = CpuModel::load_for_context(file, Some(context))
                .with_context(|| format!("loading {}", path.display()))?
                .with_activations(args.activations());
            start(model, &tokenizer, config)
        }
    };
    Ok(Loaded {
        tokenizer,
        template,
        scheduler: Some(scheduler),
        thread: Some(thread),
    })
}

/// Tokens a chat turn keeps free for the reply when old turns must go.
const CHAT_REPLY_ROOM: usize = 64;

/// The prompt of `messages`, dropping the oldest turns (after a leading
/// system message) while it leaves less than [`CHAT_REPLY_ROOM`] tokens
/// of `context` for the reply, and saying so on stderr. `None` when the
/// last message alone does not fit.
fn fit_history(
    messages: &mut Vec<Message>,
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    context: usize,
) -> Result<Option<Vec<u32>>> {
    let room = CHAT_REPLY_ROOM.min(context / 2);
    let first_turn = usize::from(messages.first().is_some_and(|m| m.role == "system"));
    let fits = |messages: &[Message]| -> Result<Option<Vec<u32>>> {
        let tokens = tokenizer.encode(&template.render(messages, true)?, true, true);
        Ok((tokens.len() + room <= context).then_some(tokens))
    };
    // The system message and the new one must fit on their own; otherwise
    // the history stays as it is.
    let mut alone: Vec<Message> = messages[..first_turn].to_vec();
    alone.extend(messages.last().cloned());
    if fits(&alone)?.is_none() {
        return Ok(None);
    }
    let mut dropped = 0;
    loop {
        if let Some(tokens) = fits(messages)? {
            if dropped > 0 {
                eprintln!(
                    "(the conversation passed the context of {context} tokens: the oldest {dropped} message{} were dropped)",
                    if dropped == 1 { "" } else { "s" }
                );
            }
            return Ok(Some(tokens));
        }
        // Keep the system message and the new user message; drop the oldest other one.
        messages.remove(first_turn);
        dropped += 1;
        // A turn starts with the user (templates may insist on alternation).
        while messages.len() > first_turn + 1 && messages[first_turn].role != "user" {
            messages.remove(first_turn);
            dropped += 1;
        }
    }
}

/// Size the CPU thread pool (all cores when not given).
pub fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(threads) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .context("setting the thread count")?;
    }
    Ok(())
}

fn report(f: &Finish, seed: u64) {
    let ttft = f.time_to_first_token.unwrap_or_default().as_secs_f64();
    // The first token comes with the prefill; the rest are decode steps.
    let decode_tokens = f.tokens_out.saturating_sub(1);
    eprintln!(
        "\n[prompt: {} tokens, {:.1} tok/s | generated: {} tokens, {:.1} tok/s | stop: {} | seed {seed}]",
        f.prompt_tokens,
        f.prompt_tokens as f64 / ttft.max(1e-9),
        f.tokens_out,
        decode_tokens as f64 / f.decode_time.as_secs_f64().max(1e-9),
        f.stop_reason.as_str(),
    );
}

fn stream_to_stdout(piece: &str) -> bool {
    let mut out = std::io::stdout().lock();
    // A closed stdout ends generation like a cancel.
    out.write_all(piece.as_bytes())
        .and_then(|()| out.flush())
        .is_ok()
}

/// End the streamed text with a newline; a closed stdout (`| head`) is not
/// an error here either (`println!` would panic on it).
fn end_line() {
    let _ = writeln!(std::io::stdout().lock());
}

/// Where `generate` takes its prompt from.
#[derive(Clone, Debug)]
pub enum PromptSource {
    /// `-p TEXT`.
    Text(String),
    /// `-p -`: standard input, to its end.
    Stdin,
    /// `-f FILE`.
    File(PathBuf),
}

impl PromptSource {
    fn read(&self) -> Result<String> {
        match self {
            PromptSource::Text(text) => Ok(text.clone()),
            PromptSource::Stdin => {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                    .context("reading the prompt from standard input")?;
                Ok(text)
            }
            PromptSource::File(path) => std::fs::read_to_string(path)
                .with_context(|| format!("reading the prompt from {}", path.display())),
        }
    }
}

pub fn run_generate(
    model_args: &ModelArgs,
    gpu: &GpuArgs,
    sampling: &SamplingArgs,
    prompt: &PromptSource,
    chat: bool,
) -> Result<()> {
    let prompt = prompt.read()?;
    anyhow::ensure!(!prompt.is_empty(), "the prompt is empty");
    let loaded = load(model_args, gpu)?;
    let text = if chat {
        let template = loaded.template.as_ref().context(
            "the model has no usable chat template; run without --chat or pass --chat-template FILE",
        )?;
        template.render(&[Message::new("user", prompt)], true)?
    } else {
        prompt
    };
    // Special tokens written in the prompt (`<|im_start|>`) are parsed, as
    // llama.cpp's CLI and the worker API do.
    let tokens = loaded.tokenizer.encode(&text, true, true);
    sampling.check_vocabulary(&loaded.tokenizer)?;
    let params = sampling.params();
    let seed = params.sampling.seed;
    let finish = generate_blocking(loaded.scheduler(), tokens, params, stream_to_stdout)?;
    end_line();
    report(&finish, seed);
    Ok(())
}

pub fn run_chat(
    model_args: &ModelArgs,
    gpu: &GpuArgs,
    sampling: &SamplingArgs,
    system: Option<&str>,
) -> Result<()> {
    let loaded = load(model_args, gpu)?;
    let template = loaded
        .template
        .as_ref()
        .context("the model has no usable chat template; pass one with --chat-template FILE")?;
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(Message::new("system", system));
    }
    let stdin = std::io::stdin();
    sampling.check_vocabulary(&loaded.tokenizer)?;
    let mut params = sampling.params();
    let context = loaded.scheduler().config().context;
    eprintln!(
        "chatting with {} (empty line or Ctrl-D to quit)",
        model_args
            .model
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| DEFAULT_MODEL.to_string())
    );
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        messages.push(Message::new("user", line.trim_end()));
        let Some(tokens) = fit_history(&mut messages, template, &loaded.tokenizer, context)? else {
            eprintln!(
                "this message alone does not fit the context of {context} tokens; it was dropped"
            );
            messages.pop();
            continue;
        };
        let finish =
            match generate_blocking(loaded.scheduler(), tokens, params.clone(), stream_to_stdout) {
                Ok(finish) => finish,
                Err(e) => {
                    end_line();
                    eprintln!("error: {e}");
                    messages.pop();
                    continue;
                }
            };
        end_line();
        report(&finish, params.sampling.seed);
        messages.push(Message::new("assistant", finish.text.trim()));
        params.sampling.seed = params.sampling.seed.wrapping_add(1);
    }
    Ok(())
}
