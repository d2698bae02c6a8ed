//! gguf-py (the Python `gguf` package, 0.19.0) as a reference implementation.
//!
//! Tests that compare against it call [`dequantize`] / [`quantize`], which
//! run `tests/gguf_ref.py` with raw bytes on stdin and stdout. The Python is
//! `$WORKER_ORCD_PYTHON` if set, else the workspace's `target/pyenv`, which
//! `scripts/setup-python.sh` creates. A missing interpreter or package fails
//! the test with that instruction: a reference test that silently passes
//! would be worse than none. To use this from another crate's tests, copy
//! this file and point `SCRIPT` at a copy of `gguf_ref.py`.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use quant::GgmlType;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/gguf_ref.py");
const WORKSPACE_ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// The Python interpreter that has gguf-py installed.
pub fn python() -> PathBuf {
    match std::env::var_os("WORKER_ORCD_PYTHON") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(WORKSPACE_ROOT).join("target/pyenv/bin/python"),
    }
}

/// Runs `gguf_ref.py OP TYPE` with `input` on stdin and returns its stdout.
fn run(op: &str, ty: GgmlType, input: &[u8]) -> Vec<u8> {
    let python = python();
    assert!(
        python.exists(),
        "no Python at {} for the gguf-py reference tests: run scripts/setup-python.sh \
         (or set WORKER_ORCD_PYTHON to a Python with gguf==0.19.0 and numpy)",
        python.display()
    );
    let mut child = Command::new(&python)
        .arg(SCRIPT)
        .arg(op)
        .arg(ty.name())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", python.display()));
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let output = std::thread::scope(|scope| {
        // write from another thread so a full stdout pipe cannot deadlock us
        scope.spawn(move || stdin.write_all(input).expect("write to gguf_ref.py"));
        child.wait_with_output().expect("wait for gguf_ref.py")
    });
    assert!(
        output.status.success(),
        "gguf_ref.py {op} {ty} failed ({}); if gguf or numpy is missing run scripts/setup-python.sh:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// gguf-py's `gguf.quants.dequantize` of whole blocks of `ty`.
pub fn dequantize(ty: GgmlType, blocks: &[u8]) -> Vec<f32> {
    let bytes = run("dequantize", ty, blocks);
    assert_eq!(bytes.len() % 4, 0);
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// gguf-py's `gguf.quants.quantize` of `values` to `ty`.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Vec<u8> {
    let input: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    run("quantize", ty, &input)
}
