//! Bearer-token authentication of `/api/*`.
//!
//! Tokens are kept as SHA-256 digests and a presented token is hashed and
//! compared with every one of them in constant time, so neither a token's
//! content nor its length leaks through response timing.

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ring::digest::{SHA256, digest};
use subtle::ConstantTimeEq;
use taskstack::secret::Secret;

/// The accepted API tokens.
#[derive(Clone)]
pub struct Tokens {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} configured)", self.digests.len())
    }
}

fn sha256(s: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, s).as_ref());
    out
}

impl Tokens {
    pub fn new(tokens: &[Secret]) -> Self {
        Self {
            digests: tokens
                .iter()
                .map(|t| sha256(t.expose().as_bytes()))
                .collect(),
        }
    }

    /// Whether `presented` is one of the tokens. Every digest is compared,
    /// without stopping at a match.
    pub fn accepts(&self, presented: &str) -> bool {
        let d = sha256(presented.as_bytes());
        let mut ok = subtle::Choice::from(0);
        for t in &self.digests {
            ok |= t.ct_eq(&d);
        }
        ok.into()
    }
}

/// Rejects a request to `/api/*` without a valid `Authorization: Bearer`.
pub async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let error = match presented {
        Some(token) if state.tokens.accepts(token) => return next.run(req).await,
        Some(_) => "the API token is not valid",
        None => "an API token is required: send `Authorization: Bearer <token>`",
    };
    let mut resp = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", error).into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"taskstack\""),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::{Secret, Tokens};

    #[test]
    fn accepts_only_configured_tokens() {
        let t = Tokens::new(&[
            Secret::from("first-token-0123456789"),
            Secret::from("second-token-0123456789"),
        ]);
        assert!(t.accepts("first-token-0123456789"));
        assert!(t.accepts("second-token-0123456789"));
        assert!(!t.accepts("first-token-012345678"));
        assert!(!t.accepts(""));
        assert!(!Tokens::new(&[]).accepts("anything"));
    }
}
