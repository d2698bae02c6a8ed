//! The served model: loaded once, its scheduler started, and the facts
//! about it that `/health`, `/v1/models` and the ready callback report,
//! computed at load so that answering them never touches the model.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{Context, Result};
use engine::convert::FileType;
use engine::cpu::CpuModel;
use engine::kv::PAGE_TOKENS;
use engine::scheduler::{self, SchedulerConfig, SchedulerHandle};
use gguf::GgufFile;
use tokenizer::{ChatTemplate, Tokenizer};

/// How to size the scheduler around the model.
#[derive(Clone, Debug)]
pub struct ModelOptions {
    /// Positions per sequence [default: the training context, at most 4096].
    pub ctx_size: Option<usize>,
    /// Sequences decoding at once.
    pub max_concurrent: usize,
    /// Jobs waiting beyond those before new ones get 503.
    pub max_queue: usize,
    /// Tokens per forward pass (decode tokens plus prefill chunks).
    pub step_tokens: usize,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            ctx_size: None,
            max_concurrent: 8,
            max_queue: 64,
            step_tokens: 512,
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
    /// Bytes of tensor data (the weights stay in the file mapping in their block format).
    pub weight_bytes: u64,
    /// Bytes of K and V for one KV page (`PAGE_TOKENS` positions, every layer, f32).
    pub kv_page_bytes: u64,
    pub max_concurrent: usize,
    pub max_queue: usize,
}

/// The loaded model: tokenizer, chat template, running scheduler.
pub struct Model {
    pub info: ModelInfo,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<ChatTemplate>,
    pub scheduler: SchedulerHandle,
}

impl Model {
    /// Load a GGUF file for the CPU backend and start its scheduler thread.
    pub fn load(path: &Path, options: &ModelOptions) -> Result<Model> {
        anyhow::ensure!(
            options.max_concurrent >= 1,
            "--max-concurrent must be at least 1"
        );
        let file =
            Arc::new(GgufFile::open(path).with_context(|| format!("reading {}", path.display()))?);
        let meta = file.metadata();
        let tokenizer = Tokenizer::from_gguf(meta).context("loading the tokenizer")?;
        // A base model without a template still serves /execute and /v1/completions.
        let template = ChatTemplate::from_gguf(meta).ok();
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
        let weight_bytes = file.tensor_bytes_total();
        let model = CpuModel::load(file).with_context(|| format!("loading {}", path.display()))?;
        let spec = model.spec().clone();
        let context = options
            .ctx_size
            .unwrap_or_else(|| spec.context_length.min(4096));
        anyhow::ensure!(
            context >= 2,
            "--ctx-size must be at least 2 (one prompt token and one generated)"
        );
        let pages_per_sequence = context.div_ceil(PAGE_TOKENS);
        let info = ModelInfo {
            id,
            path: path.display().to_string(),
            architecture: spec.arch.name().to_string(),
            quant,
            device: "cpu".into(),
            vocab_size: spec.vocab_size,
            context_length: context,
            weight_bytes,
            kv_page_bytes: (PAGE_TOKENS * spec.n_layers * spec.kv_dim() * 2 * 4) as u64,
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
                // Room for every slot at full context: pages are only a
                // budget (memory is taken as sequences reserve it), and with
                // this many an admitted request never waits on the others.
                kv_pages: pages_per_sequence * options.max_concurrent,
            },
        );
        Ok(Model {
            info,
            tokenizer,
            template,
            scheduler,
        })
    }

    /// Sequences decoding now. Every running sequence holds at least one KV
    /// page, and the scheduler's count can lag when its last sequence is
    /// cancelled between steps, so the page count bounds it.
    pub fn running(&self) -> usize {
        let running = self.scheduler.stats().running.load(Ordering::Acquire);
        running.min(self.scheduler.pool().used_pages())
    }

    /// Jobs waiting for a slot.
    pub fn queued(&self) -> usize {
        self.scheduler.stats().queued.load(Ordering::Acquire)
    }

    /// Bytes of KV cache held now.
    pub fn kv_bytes_used(&self) -> u64 {
        self.scheduler.pool().used_pages() as u64 * self.info.kv_page_bytes
    }
}
