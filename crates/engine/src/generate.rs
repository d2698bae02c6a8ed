//! A blocking helper that runs one request through the scheduler.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use crate::request::{Event, Finish, Job};
pub use crate::request::{GenerateParams, StopReason};
use crate::scheduler::SchedulerHandle;
use crate::EngineError;

/// Run one job through the scheduler and wait for it, calling `on_text`
/// on this thread with each piece of text as it becomes final; returning
/// `false` from `on_text` cancels the job.
pub fn generate_blocking(
    scheduler: &SchedulerHandle,
    prompt: Vec<u32>,
    params: GenerateParams,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<Finish, EngineError> {
    let (tx, rx) = mpsc::channel();
    let cancel = Arc::new(AtomicBool::new(false));
    scheduler
        .submit(Job {
            prompt,
            params,
            cancel: cancel.clone(),
            sink: Box::new(move |event| tx.send(event).is_ok()),
        })
        .map_err(|e| EngineError::Invalid(e.to_string()))?;
    for event in rx {
        match event {
            Event::Started { .. } => {}
            Event::Token { text, .. } => {
                if !text.is_empty() && !on_text(&text) {
                    cancel.store(true, Ordering::Release);
                }
            }
            Event::End(finish) => return Ok(finish),
            Event::Error { message } => return Err(EngineError::Invalid(message)),
        }
    }
    Err(EngineError::Invalid(
        "the scheduler stopped before the job ended".into(),
    ))
}
