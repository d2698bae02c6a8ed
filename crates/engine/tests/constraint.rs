//! Constrained decoding end to end on the CPU backend with SmolLM2: sampled
//! outputs under JSON schemas (nested objects, enums, arrays, bounded
//! numbers), a regular expression and a Lark grammar are always valid,
//! checked with an independent JSON-schema validator.

use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};

use engine::constraint::{Grammar, Grammars};
use engine::cpu::{CpuModel, Logits};
use engine::generate::{GenerateParams, StopReason};
use engine::sampler::SamplingParams;
use engine::scheduler::{self, Event, Finish, Job, SchedulerConfig, SchedulerHandle};
use gguf::GgufFile;
use serde_json::{json, Value};
use tokenizer::Tokenizer;

mod common;

struct Setup {
    handle: SchedulerHandle,
    tokenizer: Arc<Tokenizer>,
    grammars: Grammars,
}

fn setup() -> Setup {
    let file = Arc::new(GgufFile::open(common::smollm_path()).unwrap());
    let tokenizer = Arc::new(Tokenizer::from_gguf(file.metadata()).unwrap());
    let model = Arc::new(CpuModel::load(file).unwrap());
    let vocab = model.spec().vocab_size;
    let (handle, _) = scheduler::spawn(
        model,
        tokenizer.clone(),
        SchedulerConfig {
            context: 512,
            max_running: 16,
            max_queued: 128,
            step_tokens: 512,
            kv_pages: 16 * 512 / 16,
            prefix_cache: true,
        },
    );
    let grammars = Grammars::new(tokenizer.clone(), vocab).unwrap();
    Setup {
        handle,
        tokenizer,
        grammars,
    }
}

/// Submits a job; its events come on the receiver.
fn submit(setup: &Setup, prompt: &[u32], params: GenerateParams) -> mpsc::Receiver<Event> {
    let (tx, rx) = mpsc::channel();
    setup
        .handle
        .submit(Job {
            prompt: prompt.to_vec(),
            params,
            cancel: Arc::new(AtomicBool::new(false)),
            sink: Box::new(move |e| tx.send(e).is_ok()),
        })
        .unwrap();
    rx
}

/// Run `n` sampled jobs (seeds 0..n) under `grammar` at once; their texts and ends.
fn generate(setup: &Setup, prompt: &str, grammar: &Grammar, n: u64) -> Vec<(String, Finish)> {
    let prompt = setup.tokenizer.encode(prompt, true, false);
    let receivers: Vec<_> = (0..n)
        .map(|seed| {
            let params = GenerateParams {
                max_tokens: 200,
                sampling: SamplingParams {
                    temperature: 0.8,
                    top_k: 40,
                    seed,
                    ..SamplingParams::default()
                },
                stop: vec![],
                logprobs: None,
                constraint: Some(setup.grammars.compile(grammar).unwrap()),
            };
            submit(setup, &prompt, params)
        })
        .collect();
    receivers
        .into_iter()
        .map(|rx| {
            for event in rx {
                match event {
                    Event::End(finish) => return (finish.text.clone(), finish),
                    Event::Error { message } => panic!("{message}"),
                    _ => {}
                }
            }
            panic!("no end event")
        })
        .collect()
}

#[test]
fn sampled_json_is_always_valid_for_its_schema() {
    let setup = setup();
    let schemas = [
        // Nested objects, an enum, a bounded integer.
        json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 20},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "role": {"enum": ["admin", "user", "guest"]},
                "address": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string", "maxLength": 20},
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"}
                    },
                    "required": ["city", "zip"],
                    "additionalProperties": false
                }
            },
            "required": ["name", "age", "role", "address"],
            "additionalProperties": false
        }),
        // An array of bounded numbers and booleans.
        json!({
            "type": "object",
            "properties": {
                "scores": {"type": "array", "items": {"type": "number", "minimum": -5, "maximum": 5},
                           "minItems": 1, "maxItems": 4},
                "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}
            },
            "required": ["scores", "flags"],
            "additionalProperties": false
        }),
        // An array of objects with an enum, at the top level.
        json!({
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "color": {"enum": ["red", "green", "blue"]},
                    "count": {"type": "integer", "minimum": 1, "maximum": 9}
                },
                "required": ["color", "count"],
                "additionalProperties": false
            },
            "minItems": 1,
            "maxItems": 3
        }),
        // Strings with a format-free pattern, and a const.
        json!({
            "type": "object",
            "properties": {
                "id": {"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"},
                "version": {"const": 2},
                "note": {"type": ["string", "null"], "maxLength": 16}
            },
            "required": ["id", "version", "note"],
            "additionalProperties": false
        }),
    ];
    let mut checked = 0;
    for schema in &schemas {
        let validator = jsonschema::validator_for(schema).unwrap();
        let outputs = generate(
            &setup,
            "Write one JSON value describing a person, some scores or some colored items:\n",
            &Grammar::JsonSchema(schema.clone()),
            25,
        );
        for (text, finish) in outputs {
            assert_eq!(
                finish.stop_reason,
                StopReason::Eos,
                "the grammar completes within the token limit: {text}"
            );
            let value: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
            if let Err(e) = validator.validate(&value) {
                panic!("{text} is not valid for {schema}: {e}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 100);

    // JSON mode: any object, which nothing bounds, so some run into the
    // token limit; those that end are objects.
    let outputs = generate(&setup, "A short JSON object:\n", &Grammar::JsonObject, 8);
    let ended: Vec<&String> = outputs
        .iter()
        .filter(|(_, f)| f.stop_reason == StopReason::Eos)
        .map(|(text, _)| text)
        .collect();
    assert!(!ended.is_empty());
    for text in ended {
        let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert!(value.is_object(), "{text}");
    }
}

#[test]
fn regular_expressions_and_lark_grammars_hold() {
    let setup = setup();
    let date = regex::Regex::new(r"^20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]$").unwrap();
    let grammar = Grammar::Regex(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]".into());
    for (text, finish) in generate(&setup, "Today's date is ", &grammar, 8) {
        assert!(date.is_match(&text), "{text:?}");
        assert_eq!(finish.stop_reason, StopReason::Eos);
    }
    let lark = Grammar::Lark(
        r#"start: "The answer is " ANSWER "."
ANSWER: "yes" | "no" | "maybe""#
            .into(),
    );
    for (text, _) in generate(&setup, "Question: is the sky blue?\n", &lark, 8) {
        assert!(
            [
                "The answer is yes.",
                "The answer is no.",
                "The answer is maybe."
            ]
            .contains(&text.as_str()),
            "{text:?}"
        );
    }
    // A grammar that does not compile is an error naming the problem.
    let err = setup
        .grammars
        .compile(&Grammar::JsonSchema(
            json!({"type": "object", "minProperties": "x"}),
        ))
        .unwrap_err();
    assert!(!err.is_empty());
    assert!(setup
        .grammars
        .compile(&Grammar::Lark("start: undefined_rule".into()))
        .is_err());
}

/// Greedy and constrained, batched with an unconstrained greedy stream: each
/// token is the best one the grammar allows, as a direct loop over the CPU
/// backend's logits picks it (the scheduler's masked greedy path, which the
/// GPU backend runs on the device).
#[test]
fn greedy_constrained_output_is_the_best_allowed_token_each_step() {
    let setup = setup();
    let file = Arc::new(GgufFile::open(common::smollm_path()).unwrap());
    let model = CpuModel::load(file).unwrap();
    let grammars = [
        Grammar::JsonSchema(json!({"type": "array", "items": {"type": "integer"}, "maxItems": 6})),
        Grammar::Regex(r"(yes|no), because [a-z ]{1,40}\.".into()),
    ];
    let prompt_text = "Answer in the requested format:\n";
    let prompt = setup.tokenizer.encode(prompt_text, true, false);
    let direct: Vec<String> = grammars
        .iter()
        .map(|grammar| {
            let mut constraint = setup.grammars.compile(grammar).unwrap();
            let mut cache = model.new_cache(512);
            let mut logits = model.forward(&mut cache, &prompt, Logits::Last).unwrap();
            let mut ids = Vec::new();
            for _ in 0..60 {
                constraint.restrict(&mut logits).unwrap();
                let token = engine::sampler::argmax(&logits);
                if setup.tokenizer.is_eog(token) {
                    break;
                }
                constraint.accept(token).unwrap();
                ids.push(token);
                if constraint.is_finished() {
                    break;
                }
                logits = model.forward(&mut cache, &[token], Logits::Last).unwrap();
            }
            setup.tokenizer.decode(&ids, false)
        })
        .collect();
    let receivers: Vec<_> = grammars
        .iter()
        .map(Some)
        .chain([None])
        .map(|grammar| {
            let params = GenerateParams {
                max_tokens: 60,
                sampling: SamplingParams::default(),
                stop: vec![],
                logprobs: None,
                constraint: grammar.map(|g| setup.grammars.compile(g).unwrap()),
            };
            submit(&setup, &prompt, params)
        })
        .collect();
    let texts: Vec<String> = receivers
        .into_iter()
        .map(|rx| loop {
            match rx.recv().unwrap() {
                Event::End(finish) => break finish.text,
                Event::Error { message } => panic!("{message}"),
                _ => {}
            }
        })
        .collect();
    assert_eq!(
        texts[..2],
        direct[..],
        "greedy under a grammar, scheduled against direct"
    );
    assert!(texts[0].starts_with('['), "{}", texts[0]);
    assert!(
        texts[1].starts_with("yes") || texts[1].starts_with("no"),
        "{}",
        texts[1]
    );
    // The unconstrained stream beside them is not held to their masks.
    assert!(!texts[2].is_empty());
}
