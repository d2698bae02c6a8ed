//! Decode steps as CUDA graphs: captured per shape on first use, replayed
//! after (a step of a few hundred small kernels costs less to replay than
//! to launch one by one).

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};

use super::workspace::{Graph, GraphKey, StepAddresses, Workspace};
use super::CudaModel;
use crate::error::{DriverContext, Result};
use crate::kernels::MATVEC_MAX_TOKENS;

/// Most step shapes kept as graphs (tokens × rows × pick: mixed steps of
/// prompt chunks and decodes come in many); a graph of a step holds a few
/// hundred kernel nodes, well under a megabyte.
const MAX_GRAPHS: usize = 256;

impl CudaModel {
    /// A decode step (every address and size fixed by `key`) as a CUDA graph:
    /// captured on first use, replayed after. The step's metadata is already
    /// on the device; the results are left in `work.logits` / `work.ids`.
    /// Returns false, having run nothing, if graphs cannot be used here.
    pub(super) fn replay(
        &self,
        work: &mut Workspace,
        key: GraphKey,
        at: &StepAddresses,
    ) -> Result<bool> {
        if work.graphs_unavailable || work.uncapturable.contains(&key) {
            return Ok(false);
        }
        if !work.graphs.contains_key(&key) && work.graphs.len() >= MAX_GRAPHS {
            // Enough shapes held: the rare others run directly.
            return Ok(false);
        }
        if !work.graphs.contains_key(&key) {
            let stream = self.device.stream();
            stream
                .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .context(|| "starting a CUDA graph capture".into())?;
            let captured = self
                .layers_forward(
                    work,
                    key.tokens,
                    key.attention_warps,
                    at.tokens,
                    at.positions,
                    at.table_offsets,
                    at.tables,
                    &mut None,
                )
                .and_then(|()| self.head_kernels(work, key.rows, 0, at.wanted, key.greedy));
            let graph = stream.end_capture(CUgraphInstantiate_flags(0));
            match (captured, graph) {
                (Ok(()), Ok(Some(graph))) => {
                    work.graphs.insert(key, Graph(graph));
                }
                (captured, graph) => {
                    // Run without graphs from now on; the caller runs this step directly.
                    let why = match (captured, graph) {
                        (Err(e), _) => e.to_string(),
                        (_, Err(e)) => e.to_string(),
                        _ => "the capture produced no graph".to_string(),
                    };
                    if key.tokens <= MATVEC_MAX_TOKENS {
                        eprintln!("CUDA graphs unavailable ({why}); launching kernels one by one");
                        work.graphs_unavailable = true;
                    } else {
                        eprintln!(
                            "CUDA graph capture of a {}-token step failed ({why}); such steps run without one",
                            key.tokens
                        );
                        work.uncapturable.insert(key);
                    }
                    return Ok(false);
                }
            }
        }
        work.graphs[&key]
            .0
            .launch()
            .context(|| "launching a decode step's CUDA graph".into())?;
        Ok(true)
    }
}
