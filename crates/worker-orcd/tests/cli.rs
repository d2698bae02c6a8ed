//! The command line as a user meets it: a closed pipe, prompts from files
//! and standard input, settings that can never work, a corrupt model.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_worker-orcd"))
}

fn smollm_path() -> PathBuf {
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

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = binary()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The prompt token count `generate` reports on stderr.
fn prompt_tokens(output: &Output) -> usize {
    let text = stderr(output);
    let at = text.find("[prompt: ").unwrap_or_else(|| panic!("{text}"));
    text[at + 9..].split(' ').next().unwrap().parse().unwrap()
}

fn tokens_of(text: &str) -> usize {
    let file = gguf::GgufFile::open(smollm_path()).unwrap();
    let tokenizer = tokenizer::Tokenizer::from_gguf(file.metadata()).unwrap();
    tokenizer.encode(text, true, true).len()
}

#[test]
fn a_closed_stdout_ends_generation_quietly() {
    let model = smollm_path();
    let mut child = binary()
        .args([
            "generate",
            "-m",
            model.to_str().unwrap(),
            "-p",
            "1, 2, 3,",
            "-n",
            "200",
        ])
        .args(["--temperature", "0", "--threads", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `| head -c 20`: read 20 bytes, then close the pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 20];
    stdout.read_exact(&mut first).unwrap();
    drop(stdout);
    let output = child.wait_with_output().unwrap();
    let err = stderr(&output);
    assert!(output.status.success(), "{:?}: {err}", output.status);
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{err}"
    );
}

#[test]
fn prompts_come_from_files_and_standard_input_with_special_tokens_parsed() {
    let model = smollm_path();
    let model = model.to_str().unwrap();
    let text =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    // Special tokens typed in the prompt are parsed, as llama.cpp's CLI does:
    // far fewer tokens than the same text read as plain characters.
    let expected = tokens_of(text);
    let output = run(
        &[
            "generate",
            "-m",
            model,
            "-p",
            text,
            "-n",
            "2",
            "--temperature",
            "0",
        ],
        None,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(prompt_tokens(&output), expected);
    assert!(
        expected < 25,
        "{expected} tokens: the specials were not parsed"
    );

    let output = run(
        &[
            "generate",
            "-m",
            model,
            "-p",
            "-",
            "-n",
            "2",
            "--temperature",
            "0",
        ],
        Some(text),
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(prompt_tokens(&output), expected);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prompt.txt");
    std::fs::write(&file, text).unwrap();
    let output = run(
        &[
            "generate",
            "-m",
            model,
            "-f",
            file.to_str().unwrap(),
            "-n",
            "2",
            "--temperature",
            "0",
        ],
        None,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(prompt_tokens(&output), expected);

    let output = run(&["generate", "-m", model, "-p", "-", "-n", "2"], Some(""));
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("the prompt is empty"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_context_past_training_is_refused() {
    let model = smollm_path();
    let output = run(
        &[
            "generate",
            "-m",
            model.to_str().unwrap(),
            "-p",
            "hi",
            "--ctx-size",
            "4294967296",
        ],
        None,
    );
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains("is more than the 8192 positions the model was trained on"),
        "{err}"
    );
    assert!(!err.contains("memory allocation"), "{err}");
}

/// `serve` refuses at once what can never work: an empty API key (an unset
/// variable in a deploy script), a callback URL that is not one.
#[test]
fn serve_refuses_settings_that_cannot_work_before_loading() {
    let model = smollm_path();
    let model = model.to_str().unwrap();
    for (args, env, needle) in [
        (vec!["--api-key", ""], None, "the API key is empty"),
        (vec![], Some(""), "the API key is empty"),
        (
            vec!["--callback-url", "notaurl"],
            None,
            "--callback-url \"notaurl\" is not a URL",
        ),
        (
            vec!["--callback-url", "ftp://orchestrator/ready"],
            None,
            "the scheme must be http or https",
        ),
        (vec!["--cors-origin", "*"], None, "--cors-origin"),
    ] {
        let start = Instant::now();
        let mut command = binary();
        command
            .args(["serve", "-m", model, "--port", "0"])
            .args(&args);
        if let Some(value) = env {
            command.env("WORKER_ORCD_API_KEY", value);
        } else {
            command.env_remove("WORKER_ORCD_API_KEY");
        }
        let output = command.output().unwrap();
        assert!(!output.status.success(), "{args:?}");
        let err = stderr(&output);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(start.elapsed() < Duration::from_secs(20));
    }
}

/// Starts `serve` on a free port; the child, its address and its log up to
/// the line that names the address. The caller kills and waits for the child.
#[allow(clippy::zombie_processes)]
fn serve(extra: &[&str], env: &[(&str, &str)]) -> (std::process::Child, String, String) {
    let model = smollm_path();
    let mut command = binary();
    command
        .args([
            "serve",
            "-m",
            model.to_str().unwrap(),
            "--port",
            "0",
            "--ctx-size",
            "256",
        ])
        .args(extra)
        .env_remove("WORKER_ORCD_API_KEY")
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().unwrap();
    let mut reader = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    loop {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        if n == 0 {
            let status = child.wait().unwrap();
            panic!("serve exited ({status}): {log}");
        }
        log.push_str(&line);
        if let Some(at) = line.find("http://127.0.0.1:") {
            let uri: String = line[at..]
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '"')
                .collect();
            // Keep draining stderr so that the child never blocks on it.
            std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
            return (child, uri, log);
        }
    }
}

fn get_status(uri: &str, authorization: Option<&str>) -> u16 {
    let url = format!("{uri}/v1/models");
    let host = uri.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {url} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response[9..12].parse().unwrap()
}

#[test]
fn json_logs_are_one_object_a_line() {
    let (mut child, _uri, log) = serve(&["--log-format", "json"], &[]);
    child.kill().unwrap();
    child.wait().unwrap();
    let line = log.lines().next().unwrap();
    let value: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(value["level"], "INFO", "{line}");
    assert_eq!(value["fields"]["message"], "serving", "{line}");
    assert!(
        value["fields"]["uri"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:"),
        "{line}"
    );
}

#[test]
fn the_api_key_comes_from_the_environment_or_a_file() {
    let (mut child, uri, _) = serve(&[], &[("WORKER_ORCD_API_KEY", "from-env")]);
    assert_eq!(get_status(&uri, None), 401);
    assert_eq!(get_status(&uri, Some("bearer from-env")), 200);
    child.kill().unwrap();
    child.wait().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "from-file\n").unwrap();
    let (mut child, uri, _) = serve(&["--api-key-file", key_file.to_str().unwrap()], &[]);
    assert_eq!(get_status(&uri, Some("Bearer from-file")), 200);
    assert_eq!(get_status(&uri, Some("Bearer from-env")), 401);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A NaN inside a quantized matrix is not scanned at load (too slow for
/// every start); `inspect --check` finds and names it.
#[test]
fn inspect_check_names_a_tensor_with_non_finite_values() {
    let source = gguf::GgufFile::open(smollm_path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sound = dir.path().join("sound.gguf");
    let corrupt = dir.path().join("corrupt.gguf");
    for (path, poison) in [(&sound, false), (&corrupt, true)] {
        let mut writer = gguf::GgufWriter::with_metadata(source.metadata().clone());
        for t in source.tensors() {
            let mut data = source.tensor_data(t).to_vec();
            if poison && t.name == "blk.3.ffn_down.weight" {
                // Q4_1 blocks start with an f16 scale: make the second block's NaN.
                assert_eq!(t.ty, gguf::GgmlType::Q4_1);
                data[20..22].copy_from_slice(&half::f16::NAN.to_le_bytes());
            }
            writer
                .add_tensor(t.name.clone(), t.ty, &t.dims, data)
                .unwrap();
        }
        writer.write_to_path(path).unwrap();
    }
    let output = run(&["inspect", sound.to_str().unwrap(), "--check"], None);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(text.contains("272 tensors, 0 with problems"), "{text}");

    let output = run(&["inspect", corrupt.to_str().unwrap(), "--check"], None);
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains("blk.3.ffn_down.weight") && l.contains("non-finite"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains("32 non-finite values, the first at 32"),
        "{line}"
    );
    assert!(text.contains("1 with problems"), "{text}");
}

/// A chat longer than the context drops its oldest turns (keeping the
/// system message) and says so, instead of ending; a message that alone
/// does not fit is dropped with a notice, and the chat goes on.
#[test]
fn chat_drops_the_oldest_turns_when_the_history_passes_the_context() {
    let model = smollm_path();
    let long_line = "Tell me about the sea and the sky and the mountains. ".repeat(3);
    let too_long = "word ".repeat(400);
    let input = format!("{long_line}\n{long_line}\n{too_long}\n{long_line}\n");
    let output = run(
        &[
            "chat",
            "-m",
            model.to_str().unwrap(),
            "--ctx-size",
            "192",
            "-n",
            "24",
            "--temperature",
            "0",
            "--system",
            "Be brief.",
        ],
        Some(&input),
    );
    let err = stderr(&output);
    assert!(output.status.success(), "{err}");
    assert!(err.contains("were dropped"), "{err}");
    assert!(
        err.contains("this message alone does not fit the context of 192 tokens"),
        "{err}"
    );
    // Every message that fits was answered: three replies.
    assert_eq!(err.matches("[prompt: ").count(), 3, "{err}");
}
