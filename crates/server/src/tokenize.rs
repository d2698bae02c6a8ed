//! `/tokenize` and `/detokenize` as llama-server has them: the served
//! model's tokenizer, for clients that count or inspect tokens.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, OpenAiError, OpenAiJson};
use crate::AppState;

/// Other fields are accepted and ignored.
#[derive(Debug, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    /// The text to tokenize.
    pub content: String,
    /// Add the model's start (and end) tokens as a prompt gets them [false].
    pub add_special: Option<bool>,
    /// Read special tokens written in the text (`<|im_start|>`) as the
    /// control tokens they name [true, as llama-server].
    pub parse_special: Option<bool>,
    /// Give each token's text beside its id [false].
    pub with_pieces: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenizeResponse {
    /// Token ids, or with `with_pieces` `{"id", "piece"}` objects.
    pub tokens: Vec<TokenEntry>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum TokenEntry {
    Id(u32),
    WithPiece { id: u32, piece: Piece },
}

/// A token's text: a string, or its bytes where they are not UTF-8 alone
/// (part of a character).
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Piece {
    Text(String),
    Bytes(Vec<u8>),
}

/// Other fields are accepted and ignored.
#[derive(Debug, Deserialize, ToSchema)]
pub struct DetokenizeRequest {
    /// Token ids, each inside the vocabulary.
    pub tokens: Vec<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DetokenizeResponse {
    /// The tokens' text (special tokens written out).
    pub content: String,
}

/// The served model's tokens for a text.
#[utoipa::path(
    post,
    path = "/tokenize",
    tag = "tokenizer",
    request_body = TokenizeRequest,
    responses(
        (status = 200, description = "The tokens", body = TokenizeResponse),
        (status = 400, description = "Invalid request (`param` names the field)", body = crate::error::OpenAiErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with --api-key)", body = crate::error::OpenAiErrorBody),
        (status = 413, description = "Body over 1 MiB", body = crate::error::OpenAiErrorBody),
    )
)]
pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    OpenAiJson(request, type_errors): OpenAiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, OpenAiError> {
    if !type_errors.is_empty() {
        return Err(ApiError::Invalid(type_errors).openai());
    }
    let tokenizer = state.model.tokenizer.clone();
    // A megabyte of text takes a while: off the async threads.
    let tokens = tokio::task::spawn_blocking(move || {
        let ids = tokenizer.encode(
            &request.content,
            request.add_special.unwrap_or(false),
            request.parse_special.unwrap_or(true),
        );
        if !request.with_pieces.unwrap_or(false) {
            return ids.into_iter().map(TokenEntry::Id).collect();
        }
        ids.into_iter()
            .map(|id| {
                let bytes = tokenizer.token_to_piece(id, true);
                let piece = match std::str::from_utf8(bytes) {
                    Ok(text) => Piece::Text(text.to_string()),
                    Err(_) => Piece::Bytes(bytes.to_vec()),
                };
                TokenEntry::WithPiece { id, piece }
            })
            .collect()
    })
    .await
    .map_err(|e| ApiError::Internal(format!("tokenizing: {e}")).openai())?;
    Ok(Json(TokenizeResponse { tokens }))
}

/// The text of the served model's tokens.
#[utoipa::path(
    post,
    path = "/detokenize",
    tag = "tokenizer",
    request_body = DetokenizeRequest,
    responses(
        (status = 200, description = "The text", body = DetokenizeResponse),
        (status = 400, description = "Invalid request (`param` names the field: a token outside the vocabulary is `tokens[i]`)", body = crate::error::OpenAiErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with --api-key)", body = crate::error::OpenAiErrorBody),
        (status = 413, description = "Body over 1 MiB", body = crate::error::OpenAiErrorBody),
    )
)]
pub async fn detokenize(
    State(state): State<Arc<AppState>>,
    OpenAiJson(request, mut errors): OpenAiJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, OpenAiError> {
    let vocab = state.model.tokenizer.vocab_size();
    errors.extend(
        request
            .tokens
            .iter()
            .enumerate()
            .filter(|&(_, &id)| id as usize >= vocab)
            .take(8)
            .map(|(i, id)| {
                crate::error::FieldError::new(
                    format!("tokens[{i}]"),
                    "range",
                    format!("token {id} is outside the vocabulary of {vocab}"),
                )
            }),
    );
    if !errors.is_empty() {
        return Err(ApiError::Invalid(errors).openai());
    }
    Ok(Json(DetokenizeResponse {
        content: state.model.tokenizer.decode(&request.tokens, true),
    }))
}
