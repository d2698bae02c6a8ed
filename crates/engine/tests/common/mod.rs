//! What several of the engine's end-to-end tests share.

use std::path::PathBuf;

/// SmolLM2-135M-Instruct Q4_1 in the model cache (scripts/fetch-models.sh).
pub fn smollm_path() -> PathBuf {
    let dir = match std::env::var_os("WORKER_ORCD_MODELS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
            .join(".cache/worker-orcd/models"),
    };
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-models.sh",
        path.display()
    );
    path
}
