//! The `/api/v1` routes.

pub mod batch;
pub mod dead_letters;
pub mod enqueue;
pub mod queues;
pub mod tasks;
pub mod workflows;

use crate::error::ApiError;

/// Longest task id, queue or task name the API takes, in characters.
pub const MAX_NAME_LEN: usize = 255;

/// The OpenAPI pattern of a name: what [`check_name`] accepts (no
/// whitespace, no control characters), so the document and the checks agree.
pub const NAME_PATTERN: &str = r"^[^\s\x00-\x1f\x7f-\x9f]+$";

/// A task id, queue or task name: 1 to [`MAX_NAME_LEN`] characters, no
/// whitespace or control characters (`what` names it in the error).
pub fn check_name(what: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid(format!("`{what}` must not be empty")));
    }
    let len = value.chars().count();
    if len > MAX_NAME_LEN {
        return Err(ApiError::invalid(format!(
            "`{what}` is {len} characters long; at most {MAX_NAME_LEN} are allowed"
        )));
    }
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ApiError::invalid(format!(
            "`{what}` {value:?} contains whitespace or control characters"
        )));
    }
    Ok(())
}
