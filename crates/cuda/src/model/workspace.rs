//! The forward pass's buffers: one device allocation carved into the
//! activations of `max_batch_tokens` rows, the weight scratch, the logits
//! and the step's metadata; and what identifies a captured decode step.

use std::collections::{HashMap, HashSet};

use cudarc::driver::CudaGraph;
use engine::spec::ModelSpec;

use super::LOGIT_ROWS;
use crate::memory::{DeviceBuffer, Layout};

/// Buffers of one forward pass, carved from one allocation; T = max_batch_tokens.
pub(super) struct Workspace {
    pub(super) _buffer: DeviceBuffer,
    pub(super) max_tokens: usize,
    pub(super) x: u64,       // T × n_embd, the residual stream
    pub(super) normed: u64,  // T × n_embd
    pub(super) q: u64,       // T × q_dim
    pub(super) k: u64,       // T × kv_dim
    pub(super) v: u64,       // T × kv_dim
    pub(super) attn: u64,    // T × q_dim
    pub(super) tmp: u64,     // T × n_embd, a block's output before its post-norm
    pub(super) gate: u64,    // T × n_ff
    pub(super) up: u64,      // T × n_ff
    pub(super) act_f16: u64, // T × max(n_embd, q_dim, n_ff), f16: GEMM input
    pub(super) scratch: u64, // scratch_values f16: a matrix dequantized for a GEMM
    pub(super) scratch_values: usize,
    pub(super) final_rows: u64, // LOGIT_ROWS × n_embd
    pub(super) logits: u64,     // LOGIT_ROWS × vocab
    pub(super) ids: u64,        // T u64 argmax keys
    pub(super) meta: u64,       // meta_len u32
    pub(super) meta_len: usize,
    pub(super) masks: u64, // LOGIT_ROWS u32 mask numbers, then LOGIT_ROWS token masks
    pub(super) bytes: usize,
    /// Decode steps captured as CUDA graphs, by shape.
    pub(super) graphs: HashMap<GraphKey, Graph>,
    /// A capture of a mat-vec-sized step failed: launch kernels one by one.
    pub(super) graphs_unavailable: bool,
    /// Larger steps (through cuBLAS) whose capture failed: run directly.
    pub(super) uncapturable: HashSet<GraphKey>,
}

/// What fixes a decode step's graph: every address is the workspace's, so
/// only the sizes differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct GraphKey {
    pub(super) tokens: usize,
    pub(super) rows: usize,
    pub(super) greedy: bool,
    /// Warps per attention block (the launch's shape is part of the graph).
    pub(super) attention_warps: u32,
}

/// Where a step's metadata lies on the device.
pub(super) struct StepAddresses {
    pub(super) tokens: u64,
    pub(super) positions: u64,
    pub(super) table_offsets: u64,
    pub(super) wanted: u64,
    pub(super) tables: u64,
}

/// A captured graph.
pub(super) struct Graph(pub(super) CudaGraph);

// SAFETY: a graph is used only under the workspace's lock, so never from two
// threads at once (what CUDA requires of graph objects); its handles are
// valid on any thread of the process.
unsafe impl Send for Graph {}

/// Offsets of the workspace's buffers (bytes), before the allocation exists.
pub(super) struct WorkspaceParts {
    pub(super) offsets: [usize; 16],
    pub(super) meta_len: usize,
}

pub(super) fn workspace_layout(
    spec: &ModelSpec,
    max_tokens: usize,
    scratch_values: usize,
    kv_pages: usize,
) -> (Layout, WorkspaceParts) {
    let t = max_tokens;
    let (embd, q_dim, kv_dim, ff, vocab) = (
        spec.n_embd,
        spec.q_dim(),
        spec.kv_dim(),
        spec.n_ff,
        spec.vocab_size,
    );
    let widest = embd.max(q_dim).max(ff);
    let meta_len = 4 * t + kv_pages;
    let mut layout = Layout::default();
    let offsets = [
        layout.add(4 * t * embd),                             // x
        layout.add(4 * t * embd),                             // normed
        layout.add(4 * t * q_dim),                            // q
        layout.add(4 * t * kv_dim),                           // k
        layout.add(4 * t * kv_dim),                           // v
        layout.add(4 * t * q_dim),                            // attn
        layout.add(4 * t * embd),                             // tmp
        layout.add(4 * t * ff),                               // gate
        layout.add(4 * t * ff),                               // up
        layout.add(2 * t * widest),                           // act_f16
        layout.add(2 * scratch_values),                       // scratch
        layout.add(4 * LOGIT_ROWS * embd),                    // final_rows
        layout.add(4 * LOGIT_ROWS * vocab),                   // logits
        layout.add(8 * t),                                    // ids: argmax keys
        layout.add(4 * meta_len),                             // meta
        layout.add(4 * LOGIT_ROWS * (1 + mask_words(vocab))), // masks
    ];
    (layout, WorkspaceParts { offsets, meta_len })
}

impl WorkspaceParts {
    pub(super) fn place(
        &self,
        buffer: DeviceBuffer,
        max_tokens: usize,
        scratch_values: usize,
    ) -> Workspace {
        let base = buffer.ptr();
        let at = |i: usize| base + self.offsets[i] as u64;
        Workspace {
            max_tokens,
            x: at(0),
            normed: at(1),
            q: at(2),
            k: at(3),
            v: at(4),
            attn: at(5),
            tmp: at(6),
            gate: at(7),
            up: at(8),
            act_f16: at(9),
            scratch: at(10),
            scratch_values,
            final_rows: at(11),
            logits: at(12),
            ids: at(13),
            meta: at(14),
            meta_len: self.meta_len,
            masks: at(15),
            bytes: buffer.bytes(),
            graphs: HashMap::new(),
            graphs_unavailable: false,
            uncapturable: HashSet::new(),
            _buffer: buffer,
        }
    }
}

/// u32 words of a token mask over `vocab` tokens.
pub(super) fn mask_words(vocab: usize) -> usize {
    vocab.div_ceil(32)
}
