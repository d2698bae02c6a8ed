//! The served model: loaded once, its scheduler started, and the facts
//! about it that `/health`, `/v1/models` and the ready callback report,
//! computed at load so that answering them never touches the model.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use engine::backend::Backend;
use engine::constraint::Grammars;
use engine::convert::FileType;
use engine::cpu::CpuModel;
use engine::kv::PAGE_TOKENS;
use engine::scheduler::{self, SchedulerConfig, SchedulerHandle};
use engine::spec::ModelSpec;
use gguf::GgufFile;
use tokenizer::{ChatTemplate, Tokenizer, TokenizerError};
use tracing::{info, warn};

/// How to size the scheduler around the model.
#[derive(Clone, Debug)]
pub struct ModelOptions {
    /// Positions per sequence [default: the training context, at most 4096].
    pub ctx_size: Option<usize>,
    /// Sequences decoding at once.
    pub max_concurrent: usize,
    /// Jobs waiting beyond those before new ones get 503.
    pub max_queue: usize,
    /// Most tokens per forward pass (decode tokens plus prefill chunks).
    pub step_tokens: usize,
    /// Keep finished sequences' caches for prompts sharing their prefix.
    pub prefix_cache: bool,
    /// Allow a `ctx_size` past the model's training context.
    pub ctx_beyond_training: bool,
    /// A chat template's source to use instead of the file's (`--chat-template`).
    pub chat_template: Option<String>,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            ctx_size: None,
            max_concurrent: 8,
            max_queue: 64,
            step_tokens: 512,
            prefix_cache: true,
            ctx_beyond_training: false,
            chat_template: None,
        }
    }
}

/// Facts about the model, fixed at load.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// The name clients see (`model` in events and the OpenAI API): the file name without `.gguf`.
    pub id: String,
    /// The model file as given on the command line.
    pub path: String,
    pub architecture: String,
    /// Quantization mix from `general.file_type` (`Q4_K_M`, …), or `unknown`.
    pub quant: String,
    pub device: String,
    pub vocab_size: usize,
    /// Positions per sequence as served (`--ctx-size`).
    pub context_length: usize,
    /// Bytes the weights take on the device (on the CPU, the file's tensor
    /// data, which stays in the mapping in its block format).
    pub weight_bytes: u64,
    /// Bytes of K and V for one KV page (`PAGE_TOKENS` positions, every layer).
    pub kv_page_bytes: u64,
    /// Device memory taken at load (a GPU's), KV cache included.
    pub device_bytes: Option<u64>,
    pub max_concurrent: usize,
    pub max_queue: usize,
}

/// The loaded model: tokenizer, chat template, running scheduler.
pub struct Model {
    pub info: ModelInfo,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<ChatTemplate>,
    pub scheduler: SchedulerHandle,
    /// The vocabulary indexed for output grammars, built at the first
    /// request that has one.
    grammars: OnceLock<Result<Grammars, String>>,
}

/// How the scheduler is sized, handed to a backend's loader so that it can
/// allocate its KV cache and workspace to match.
#[derive(Clone, Copy, Debug)]
pub struct Sizing {
    /// Positions per sequence.
    pub context: usize,
    /// KV pages of [`PAGE_TOKENS`] positions for all sequences together.
    pub kv_pages: usize,
    /// Tokens per forward pass.
    pub step_tokens: usize,
}

/// What a loaded backend reports about itself.
#[derive(Clone, Debug)]
pub struct BackendInfo {
    /// `cpu`, or the GPU's name.
    pub device: String,
    /// Bytes the weights take where they are used.
    pub weight_bytes: u64,
    /// Bytes of K and V for one KV page, every layer.
    pub kv_page_bytes: u64,
    /// Device memory taken at load, all of it (a GPU's; `None` on the CPU).
    pub device_bytes: Option<u64>,
}

/// The CPU backend for [`Model::load_with`], for sequences of up to `context` positions.
pub fn cpu_backend(
    file: Arc<GgufFile>,
    spec: &ModelSpec,
    context: usize,
) -> Result<(CpuModel, BackendInfo)> {
    let weight_bytes = file.tensor_bytes_total();
    let model = CpuModel::load_for_context(file, Some(context))?;
    let info = BackendInfo {
        device: "cpu".into(),
        weight_bytes,
        kv_page_bytes: engine::kv::cpu_page_bytes(spec.n_layers, spec.kv_dim()),
        device_bytes: None,
    };
    Ok((model, info))
}

/// The chat template to serve: a given one must work; the file's may be
/// absent (a base model still serves /execute and /v1/completions) or
/// broken, which is logged with its error (the chat route then refuses).
fn chat_template(meta: &gguf::Metadata, explicit: Option<&str>) -> Result<Option<ChatTemplate>> {
    match ChatTemplate::load(meta, explicit) {
        Ok(template) => Ok(Some(template)),
        Err(e) if explicit.is_some() => Err(e).context("the template given with --chat-template"),
        Err(TokenizerError::NoTemplate(why)) => {
            info!("no chat template: {why}; /v1/chat/completions is refused");
            Ok(None)
        }
        Err(e) => {
            warn!(
                error = e.to_string(),
                "the model's chat template cannot be used; /v1/chat/completions is refused until one is given with --chat-template"
            );
            Ok(None)
        }
    }
}

impl Model {
    /// Load a GGUF file for the CPU backend and start its scheduler thread.
    pub fn load(path: &Path, options: &ModelOptions) -> Result<Model> {
        Model::load_with(path, options, |file, spec, sizing| {
            cpu_backend(file, spec, sizing.context)
        })
    }

    /// Load a GGUF file with the backend `make` builds (given the open file,
    /// its spec and the scheduler's sizing) and start its scheduler thread.
    pub fn load_with<B, F>(path: &Path, options: &ModelOptions, make: F) -> Result<Model>
    where
        B: Backend,
        F: FnOnce(Arc<GgufFile>, &ModelSpec, &Sizing) -> Result<(B, BackendInfo)>,
    {
        anyhow::ensure!(
            options.max_concurrent >= 1,
            "--max-concurrent must be at least 1"
        );
        let file =
            Arc::new(GgufFile::open(path).with_context(|| format!("reading {}", path.display()))?);
        let meta = file.metadata();
        let tokenizer = Tokenizer::from_gguf(meta).context("loading the tokenizer")?;
        let template = chat_template(meta, options.chat_template.as_deref())?;
        let id = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let quant = meta
            .get_u32("general.file_type")
            .ok()
            .and_then(|v| FileType::ALL.into_iter().find(|t| t.llama_ftype() == v))
            .map_or("unknown", FileType::name)
            .to_string();
        let spec =
            ModelSpec::from_gguf(&file).with_context(|| format!("loading {}", path.display()))?;
        let context = spec.serving_context(options.ctx_size, options.ctx_beyond_training)?;
        let kv_pages = context
            .div_ceil(PAGE_TOKENS)
            .checked_mul(options.max_concurrent)
            .context("--ctx-size × --max-concurrent overflows")?;
        let sizing = Sizing {
            context,
            // Room for every slot at full context: pages are only a budget
            // (memory is taken as sequences reserve it), and with this many an
            // admitted request never waits on the others.
            kv_pages,
            step_tokens: options.step_tokens,
        };
        let (model, backend) =
            make(file, &spec, &sizing).with_context(|| format!("loading {}", path.display()))?;
        if backend.device_bytes.is_none() {
            // On the CPU the budget is taken as sequences grow: check now that
            // the machine can hold all of it, so that no request finds out later.
            // (A GPU backend allocates its whole KV cache at load.)
            engine::kv::check_host_budget(
                kv_pages as u128 * u128::from(backend.kv_page_bytes),
                &format!(
                    "--ctx-size {context} with --max-concurrent {}",
                    options.max_concurrent
                ),
            )?;
        }
        let info = ModelInfo {
            id,
            path: path.display().to_string(),
            architecture: spec.arch.name().to_string(),
            quant,
            device: backend.device,
            vocab_size: spec.vocab_size,
            context_length: context,
            weight_bytes: backend.weight_bytes,
            kv_page_bytes: backend.kv_page_bytes,
            device_bytes: backend.device_bytes,
            max_concurrent: options.max_concurrent,
            max_queue: options.max_queue,
        };
        let tokenizer = Arc::new(tokenizer);
        let (scheduler, _thread) = scheduler::spawn(
            Arc::new(model),
            tokenizer.clone(),
            SchedulerConfig {
                context,
                max_running: options.max_concurrent,
                max_queued: options.max_queue,
                step_tokens: options.step_tokens,
                kv_pages: sizing.kv_pages,
                prefix_cache: options.prefix_cache,
            },
        );
        Ok(Model {
            info,
            tokenizer,
            template,
            scheduler,
            grammars: OnceLock::new(),
        })
    }

    /// The vocabulary indexed for output grammars (built on first use).
    pub fn grammars(&self) -> Result<&Grammars, String> {
        self.grammars
            .get_or_init(|| Grammars::new(self.tokenizer.clone(), self.info.vocab_size))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Sequences decoding now.
    pub fn running(&self) -> usize {
        self.scheduler.running()
    }

    /// Jobs queued behind full slots (those a free slot takes at the next
    /// step are not counted; `--max-queue` limits this number).
    pub fn queued(&self) -> usize {
        self.scheduler.queued()
    }

    /// Bytes of KV cache held now (kept prefix caches included).
    pub fn kv_bytes_used(&self) -> u64 {
        self.scheduler.pool().used_pages() as u64 * self.info.kv_page_bytes
    }

    /// KV pages held by finished sequences' caches kept for prefix reuse:
    /// taken back whenever a new sequence needs them.
    pub fn kv_pages_cached(&self) -> usize {
        self.scheduler
            .stats()
            .kept_pages
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// KV pages held by running sequences: those in use less the kept
    /// caches' (exact on the CPU; on the GPU, where caches share pages, a
    /// page shared by several kept caches counts once per cache, so this
    /// may read low).
    pub fn kv_pages_in_use(&self) -> usize {
        self.scheduler
            .pool()
            .used_pages()
            .saturating_sub(self.kv_pages_cached())
    }
}
