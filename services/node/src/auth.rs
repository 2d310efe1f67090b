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

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use hexfleet_protocol::{Claims, KeyError, Role, TokenError, Verifier};
use parking_lot::{Mutex, RwLock};

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

/// Tokens verified lately, at most this many: past it the list starts over.
const VERIFIED_MAX: usize = 4096;

#[derive(Debug)]
pub struct Auth {
    config: AuthConfig,
    current: RwLock<Arc<Keys>>,
}

/// The keys, and the tokens they verified lately. An HTTP reader presents
/// the same token with every request, and checking its signature again
/// (decoding, JSON, HMAC) cost about as much as the nearby search itself.
/// A token is found by its whole text; its expiry and role are checked
/// every time. New keys start with an empty list, so a key that is removed
/// stops its tokens at once.
#[derive(Debug)]
struct Keys {
    verifier: Verifier,
    verified: Mutex<HashMap<Box<str>, Claims>>,
}

impl Keys {
    fn new(verifier: Verifier) -> Arc<Self> {
        Arc::new(Self {
            verifier,
            verified: Mutex::new(HashMap::new()),
        })
    }
}

impl Auth {
    pub fn load(config: &AuthConfig) -> Result<Self, AuthError> {
        Ok(Self {
            config: config.clone(),
            current: RwLock::new(Keys::new(build(config)?)),
        })
    }

    /// Reads the key set again; on an error the current keys stay. Returns
    /// the key ids now held.
    pub fn reload(&self) -> Result<Vec<String>, AuthError> {
        let verifier = build(&self.config)?;
        let kids = verifier.kids();
        *self.current.write() = Keys::new(verifier);
        Ok(kids)
    }

    fn keys(&self) -> Arc<Keys> {
        self.current.read().clone()
    }

    /// The files a reload reads.
    pub fn files(&self) -> Vec<PathBuf> {
        self.config.jwks.iter().cloned().collect()
    }

    /// Checks a token presented for `role`, as of `now` (Unix seconds).
    pub fn verify_for(&self, token: &str, role: Role, now: u64) -> Result<Claims, TokenError> {
        let keys = self.keys();
        let known = keys.verified.lock().get(token).cloned();
        if let Some(claims) = known.filter(|c| c.expires_at >= now) {
            return claims.held_by(role);
        }
        let claims = keys.verifier.verify(token, now)?;
        let mut verified = keys.verified.lock();
        if verified.len() >= VERIFIED_MAX {
            verified.clear();
        }
        verified.insert(token.into(), claims.clone());
        drop(verified);
        claims.held_by(role)
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

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use hexfleet_model::VehicleId;
    use hexfleet_protocol::{token::hs256_jwks, SigningKey};

    use super::*;

    #[test]
    fn a_token_verified_before_is_still_checked_for_expiry_role_and_its_key() {
        let mut jwks = tempfile::NamedTempFile::new().unwrap();
        jwks.write_all(hs256_jwks(&[("k1", b"first-secret-0123456789")]).as_bytes())
            .unwrap();
        let config = AuthConfig {
            token_secret: "default-secret-0123456789".into(),
            jwks: Some(jwks.path().to_path_buf()),
            audience: None,
        };
        let auth = Auth::load(&config).unwrap();
        let id = VehicleId::new("reader").unwrap();
        let key = SigningKey::hs256(b"first-secret-0123456789").with_kid("k1");
        let token = Claims::new(Role::Dashboard, id, 1_000).sign(&key).unwrap();

        for _ in 0..2 {
            assert_eq!(
                auth.verify_for(&token, Role::Dashboard, 900)
                    .unwrap()
                    .expires_at,
                1_000
            );
        }
        assert!(auth.keys().verified.lock().contains_key(token.as_str()));
        assert!(matches!(
            auth.verify_for(&token, Role::Driver, 900),
            Err(TokenError::WrongRole { .. })
        ));
        assert_eq!(
            auth.verify_for(&token, Role::Dashboard, 1_001),
            Err(TokenError::Expired)
        );
        assert!(auth.verify_for(&token, Role::Dashboard, 900).is_ok());

        // The key is removed: its tokens are refused at once.
        std::fs::write(
            jwks.path(),
            hs256_jwks(&[("k2", b"second-secret-0123456789")]),
        )
        .unwrap();
        auth.reload().unwrap();
        assert!(matches!(
            auth.verify_for(&token, Role::Dashboard, 900),
            Err(TokenError::UnknownKey(_))
        ));
    }

    #[test]
    fn the_verified_tokens_are_bounded() {
        let config = AuthConfig {
            token_secret: "default-secret-0123456789".into(),
            jwks: None,
            audience: None,
        };
        let auth = Auth::load(&config).unwrap();
        for i in 0..VERIFIED_MAX + 10 {
            let id = VehicleId::new(&format!("r{i}")).unwrap();
            let token = Claims::new(Role::Rider, id, 1_000).mint(config.token_secret.as_bytes());
            auth.verify_for(&token, Role::Rider, 900).unwrap();
        }
        assert!(auth.keys().verified.lock().len() <= VERIFIED_MAX);
    }
}
