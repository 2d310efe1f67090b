//! Who may connect, and as whom.
//!
//! Tokens are JWTs ([`hexfleet_protocol::token`]) checked by a [`Verifier`]
//! built from `[auth]`: the shared secret is the default key (tokens
//! without a `kid`), and the JWKS file holds keys by `kid`. The file is
//! read again when it changes or on SIGHUP ([`crate::reload`]), so keys
//! rotate without a restart: add the new key, let backends sign with it,
//! remove the old one once its tokens have expired.
//!
//! What each role may do:
//!
//! | role | QUIC | WebSocket `/v1/ws` | HTTP `/v1/...` |
//! |---|---|---|---|
//! | `driver` | publish fixes for the vehicle named by `sub`, only | no | no |
//! | `rider` | subscribe | no | no |
//! | `dashboard` | no | watch | read |

use std::{path::PathBuf, sync::Arc};

use hexfleet_protocol::{Claims, KeyError, Role, TokenError, Verifier};
use parking_lot::RwLock;

use crate::config::AuthConfig;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Keys { path: PathBuf, source: KeyError },
}

#[derive(Debug)]
pub struct Auth {
    config: AuthConfig,
    current: RwLock<Arc<Verifier>>,
}

impl Auth {
    pub fn load(config: &AuthConfig) -> Result<Self, AuthError> {
        Ok(Self {
            config: config.clone(),
            current: RwLock::new(Arc::new(build(config)?)),
        })
    }

    /// Reads the key set again; on an error the current keys stay. Returns
    /// the key ids now held.
    pub fn reload(&self) -> Result<Vec<String>, AuthError> {
        let verifier = build(&self.config)?;
        let kids = verifier.kids();
        *self.current.write() = Arc::new(verifier);
        Ok(kids)
    }

    /// The files a reload reads.
    pub fn files(&self) -> Vec<PathBuf> {
        self.config.jwks.iter().cloned().collect()
    }

    /// Checks a token presented for `role`, as of `now` (Unix seconds).
    pub fn verify_for(&self, token: &str, role: Role, now: u64) -> Result<Claims, TokenError> {
        let verifier = self.current.read().clone();
        verifier.verify_for(token, role, now)
    }
}

fn build(config: &AuthConfig) -> Result<Verifier, AuthError> {
    let mut verifier = Verifier::with_secret(config.token_secret.as_bytes())
        .with_audience(config.audience.clone());
    if let Some(path) = &config.jwks {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.clone(),
            source,
        })?;
        verifier.add_jwks(&text).map_err(|source| AuthError::Keys {
            path: path.clone(),
            source,
        })?;
    }
    Ok(verifier)
}
