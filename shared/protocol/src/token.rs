//! Tokens are JSON Web Tokens (RFC 7519), so a ride-hailing backend mints
//! them with any standard JWT library.
//!
//! - Claims: `sub` (the driver's vehicle id, the rider's or the dashboard's
//!   id), `role` (`driver`, `rider` or `dashboard`), `exp` and `iat` (Unix
//!   seconds), and optionally `aud`.
//! - Algorithms: HS256/384/512 with a shared secret, RS256/384/512 and
//!   PS256/384/512 with an RSA public key, ES256/384 with an EC public key,
//!   EdDSA with an Ed25519 public key.
//! - Keys are chosen by the header's `kid`, so keys rotate without downtime:
//!   during a rotation the [`Verifier`] holds the old and the new key, and
//!   tokens signed by either verify. A token without a `kid` is checked
//!   against the default key (the node's shared secret), if there is one.
//!
//! The algorithm a key may verify is fixed by the key (its JWK `alg`, or
//! its family's usual one), never taken from the token: a token cannot
//! choose `none`, or pass an RSA public key off as an HMAC secret.

use std::{collections::HashMap, str::FromStr};

use hexfleet_model::VehicleId;
use jsonwebtoken::{
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet},
    Algorithm, DecodingKey, EncodingKey, Header, Validation,
};
use serde::{Deserialize, Serialize};

use crate::Role;

/// What a token says. The wire names are the registered JWT claim names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub role: Role,
    /// Who the token speaks for. Same alphabet as a vehicle id.
    #[serde(rename = "sub")]
    pub subject: VehicleId,
    /// Unix seconds after which the token is refused, and a session it
    /// opened is closed (`token_expired`).
    #[serde(rename = "exp")]
    pub expires_at: u64,
    /// Unix seconds when the token was minted.
    #[serde(rename = "iat", default)]
    pub issued_at: u64,
    /// Who the token is for; checked when the node is configured with an
    /// audience.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub aud: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no token")]
    Missing,
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token key id {0:?} is not known")]
    UnknownKey(String),
    #[error("token has no key id, and this node has no default key")]
    NoKeyId,
    #[error("token algorithm {0} is not the one its key is for")]
    WrongAlgorithm(String),
    #[error("token audience is not this service's")]
    WrongAudience,
    #[error("token is for role {token} but the client says it is a {claimed}")]
    WrongRole {
        token: &'static str,
        claimed: &'static str,
    },
    #[error("signing a token: {0}")]
    Signing(String),
}

/// Why a key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not a JSON Web Key Set: {0}")]
    Jwks(#[from] serde_json::Error),
    #[error("a key in the set has no kid")]
    NoKeyId,
    #[error("key {kid}: {reason}")]
    Key { kid: String, reason: String },
}

/// A key that signs tokens (a backend's, or `hexfleet-node token`'s).
pub struct SigningKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: EncodingKey,
}

impl SigningKey {
    /// HS256 with a shared secret.
    pub fn hs256(secret: &[u8]) -> Self {
        Self {
            kid: None,
            algorithm: Algorithm::HS256,
            key: EncodingKey::from_secret(secret),
        }
    }

    /// An RSA (RS256) or EC (ES256, ES384) private key in PEM.
    pub fn from_pem(algorithm: Algorithm, pem: &[u8]) -> Result<Self, TokenError> {
        let key = match algorithm {
            Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(pem),
            _ => EncodingKey::from_rsa_pem(pem),
        }
        .map_err(|e| TokenError::Signing(e.to_string()))?;
        Ok(Self {
            kid: None,
            algorithm,
            key,
        })
    }

    /// Names the key in the token header, so verifiers pick the right one.
    pub fn with_kid(mut self, kid: impl Into<String>) -> Self {
        self.kid = Some(kid.into());
        self
    }
}

impl Claims {
    /// These claims, if they are a `role`'s.
    pub fn held_by(self, role: Role) -> Result<Self, TokenError> {
        if self.role != role {
            return Err(TokenError::WrongRole {
                token: self.role.as_str(),
                claimed: role.as_str(),
            });
        }
        Ok(self)
    }

    /// Claims issued now (this machine's clock), until `expires_at`.
    pub fn new(role: Role, subject: VehicleId, expires_at: u64) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            role,
            subject,
            expires_at,
            issued_at: now,
            aud: None,
        }
    }

    /// The same claims, issued at `at` (Unix seconds).
    pub fn issued(mut self, at: u64) -> Self {
        self.issued_at = at;
        self
    }

    /// The same claims, for this audience (`aud`).
    pub fn for_audience(mut self, aud: impl Into<String>) -> Self {
        self.aud = Some(aud.into());
        self
    }

    /// Signs the claims into a compact JWT.
    pub fn sign(&self, key: &SigningKey) -> Result<String, TokenError> {
        let mut header = Header::new(key.algorithm);
        header.kid = key.kid.clone();
        jsonwebtoken::encode(&header, self, &key.key)
            .map_err(|e| TokenError::Signing(e.to_string()))
    }

    /// Signs the claims with HS256 and no key id: what a node with only a
    /// shared secret verifies.
    pub fn mint(&self, secret: &[u8]) -> String {
        // HMAC signs with a key of any length: this cannot fail.
        self.sign(&SigningKey::hs256(secret))
            .unwrap_or_else(|e| unreachable!("HS256 signing failed: {e}"))
    }
}

/// One key a verifier holds: the key and the algorithms it may verify.
#[derive(Clone)]
struct Key {
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

/// Checks tokens against a set of keys.
#[derive(Clone, Default)]
pub struct Verifier {
    by_kid: HashMap<String, Key>,
    default: Option<Key>,
    audience: Option<String>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kids: Vec<_> = self.by_kid.keys().collect();
        kids.sort();
        f.debug_struct("Verifier")
            .field("kids", &kids)
            .field("default", &self.default.is_some())
            .field("audience", &self.audience)
            .finish()
    }
}

impl Verifier {
    /// A verifier whose default key (for tokens without a `kid`) is an
    /// HS256 shared secret.
    pub fn with_secret(secret: &[u8]) -> Self {
        Self {
            default: Some(Key {
                key: DecodingKey::from_secret(secret),
                algorithms: vec![Algorithm::HS256],
            }),
            ..Self::default()
        }
    }

    /// Tokens must carry this `aud`.
    pub fn with_audience(mut self, audience: Option<String>) -> Self {
        self.audience = audience;
        self
    }

    /// Adds every key of a JSON Web Key Set; each must have a `kid`. Returns
    /// how many were added.
    pub fn add_jwks(&mut self, json: &str) -> Result<usize, KeyError> {
        let set: JwkSet = serde_json::from_str(json)?;
        for jwk in &set.keys {
            let kid = jwk.common.key_id.clone().ok_or(KeyError::NoKeyId)?;
            let key = key_of(jwk).map_err(|reason| KeyError::Key {
                kid: kid.clone(),
                reason,
            })?;
            self.by_kid.insert(kid, key);
        }
        Ok(set.keys.len())
    }

    /// The key ids held, sorted.
    pub fn kids(&self) -> Vec<String> {
        let mut kids: Vec<_> = self.by_kid.keys().cloned().collect();
        kids.sort();
        kids
    }

    /// Checks a token's signature, expiry (`now` in Unix seconds) and
    /// audience, and returns its claims.
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        let key = match &header.kid {
            Some(kid) => self
                .by_kid
                .get(kid)
                .ok_or_else(|| TokenError::UnknownKey(kid.clone()))?,
            None => self.default.as_ref().ok_or(TokenError::NoKeyId)?,
        };
        if !key.algorithms.contains(&header.alg) {
            return Err(TokenError::WrongAlgorithm(format!("{:?}", header.alg)));
        }
        let mut validation = Validation::new(header.alg);
        validation.algorithms = key.algorithms.clone();
        // Expiry is checked below against the caller's clock.
        validation.validate_exp = false;
        validation.required_spec_claims = ["exp", "sub"].map(String::from).into();
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                match e.kind() {
                    K::InvalidSignature => TokenError::BadSignature,
                    K::InvalidAudience => TokenError::WrongAudience,
                    K::MissingRequiredClaim(c) if c == "aud" => TokenError::WrongAudience,
                    K::InvalidAlgorithm => TokenError::WrongAlgorithm(format!("{:?}", header.alg)),
                    _ => TokenError::Malformed(e.to_string()),
                }
            })?
            .claims;
        if claims.expires_at < now {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    /// Verifies a token presented by a client that says it has `role`.
    pub fn verify_for(&self, token: &str, role: Role, now: u64) -> Result<Claims, TokenError> {
        self.verify(token, now)?.held_by(role)
    }
}

/// A JSON Web Key Set of HS256 shared secrets by key id, as `auth.jwks`
/// reads it (`{"keys": [{"kty": "oct", "kid": ..., "alg": "HS256", "k": ...}]}`).
pub fn hs256_jwks(keys: &[(&str, &[u8])]) -> String {
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
    let keys: Vec<_> = keys
        .iter()
        .map(|(kid, secret)| {
            serde_json::json!({"kty": "oct", "kid": kid, "alg": "HS256", "k": URL_SAFE_NO_PAD.encode(secret)})
        })
        .collect();
    serde_json::json!({ "keys": keys }).to_string()
}

/// The decoding key of a JWK and the algorithms it may verify: its `alg`
/// if it names one, else its family's usual one.
fn key_of(jwk: &Jwk) -> Result<Key, String> {
    let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    let algorithm = match &jwk.common.key_algorithm {
        Some(alg) => Algorithm::from_str(&alg.to_string()).map_err(|e| e.to_string())?,
        None => match &jwk.algorithm {
            AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => Algorithm::ES256,
                EllipticCurve::P384 => Algorithm::ES384,
                ref other => return Err(format!("curve {other:?} is not supported")),
            },
            AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
        },
    };
    if algorithm.family() != key.family() {
        return Err(format!("alg {algorithm:?} does not fit the key's type"));
    }
    Ok(Key {
        key,
        algorithms: vec![algorithm],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};

    const SECRET: &[u8] = b"test-secret-of-some-length";
    const NOW: u64 = 1_800_000_000;

    fn driver(id: &str, expires_at: u64) -> Claims {
        Claims::new(Role::Driver, VehicleId::new(id).unwrap(), expires_at).issued(NOW)
    }

    #[test]
    fn a_minted_token_is_a_standard_jwt_and_verifies_with_its_claims() {
        let claims = driver("drv-1", NOW + 60);
        let token = claims.mint(SECRET);
        assert_eq!(token.split('.').count(), 3);
        let body = URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["sub"], "drv-1");
        assert_eq!(body["role"], "driver");
        assert_eq!(body["exp"], NOW + 60);
        assert_eq!(body["iat"], NOW);
        let verifier = Verifier::with_secret(SECRET);
        assert_eq!(verifier.verify_for(&token, Role::Driver, NOW), Ok(claims));
    }

    #[test]
    fn forged_expired_and_misused_tokens_are_refused() {
        let verifier = Verifier::with_secret(SECRET);
        let token = driver("drv-1", NOW + 60).mint(SECRET);
        assert_eq!(
            Verifier::with_secret(b"other-secret").verify(&token, NOW),
            Err(TokenError::BadSignature)
        );
        // Same header and signature, another subject.
        let parts: Vec<_> = token.split('.').collect();
        let forged_body = URL_SAFE_NO_PAD.encode(
            serde_json::json!({"sub": "drv-2", "role": "driver", "exp": NOW + 60, "iat": NOW})
                .to_string(),
        );
        let forged = format!("{}.{}.{}", parts[0], forged_body, parts[2]);
        assert_eq!(verifier.verify(&forged, NOW), Err(TokenError::BadSignature));
        let expired = driver("drv-1", NOW - 1).mint(SECRET);
        assert_eq!(verifier.verify(&expired, NOW), Err(TokenError::Expired));
        assert!(matches!(
            verifier.verify_for(&token, Role::Rider, NOW),
            Err(TokenError::WrongRole { .. })
        ));
        assert_eq!(verifier.verify("", NOW), Err(TokenError::Missing));
        for junk in ["x", "a.b", "a.b.c.d", "hf1.driver.d.1.sig", "..."] {
            assert!(
                matches!(verifier.verify(junk, NOW), Err(TokenError::Malformed(_))),
                "{junk}"
            );
        }
        // alg "none" is never accepted.
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
            parts[1]
        );
        assert!(verifier.verify(&none, NOW).is_err());
        // A subject that is not an id.
        let bad_sub = Claims {
            subject: VehicleId::new("x").unwrap(),
            ..driver("drv-1", NOW + 60)
        };
        let mut json = serde_json::to_value(&bad_sub).unwrap();
        json["sub"] = "has spaces and ☃".into();
        let token =
            jsonwebtoken::encode(&Header::default(), &json, &EncodingKey::from_secret(SECRET))
                .unwrap();
        assert!(matches!(
            verifier.verify(&token, NOW),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn keys_rotate_by_kid_old_and_new_verify_during_the_rotation() {
        let old = SigningKey::hs256(b"old-secret-0123456789").with_kid("2026-10");
        let new = SigningKey::hs256(b"new-secret-0123456789").with_kid("2026-11");
        let old_token = driver("drv-1", NOW + 60).sign(&old).unwrap();
        let new_token = driver("drv-1", NOW + 60).sign(&new).unwrap();

        let mut before = Verifier::default();
        before
            .add_jwks(&hs256_jwks(&[("2026-10", b"old-secret-0123456789")]))
            .unwrap();
        assert!(before.verify(&old_token, NOW).is_ok());
        assert_eq!(
            before.verify(&new_token, NOW),
            Err(TokenError::UnknownKey("2026-11".into()))
        );

        let mut during = Verifier::default();
        during
            .add_jwks(&hs256_jwks(&[
                ("2026-10", b"old-secret-0123456789"),
                ("2026-11", b"new-secret-0123456789"),
            ]))
            .unwrap();
        assert_eq!(during.kids(), ["2026-10", "2026-11"]);
        assert!(during.verify(&old_token, NOW).is_ok());
        assert!(during.verify(&new_token, NOW).is_ok());

        let mut after = Verifier::default();
        after
            .add_jwks(&hs256_jwks(&[("2026-11", b"new-secret-0123456789")]))
            .unwrap();
        assert!(after.verify(&old_token, NOW).is_err());
        assert!(after.verify(&new_token, NOW).is_ok());
        // Without a default key, a token without a kid is refused.
        assert_eq!(
            after.verify(&driver("drv-1", NOW + 60).mint(SECRET), NOW),
            Err(TokenError::NoKeyId)
        );
    }

    #[test]
    fn es256_tokens_verify_with_the_public_key_and_cannot_pose_as_hmac() {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let signing = SigningKey::from_pem(Algorithm::ES256, pair.serialize_pem().as_bytes())
            .unwrap()
            .with_kid("ec-1");
        let token = driver("drv-1", NOW + 60).sign(&signing).unwrap();
        // The public key as a JWK: x and y from the uncompressed point.
        let point = pair.public_key_raw();
        assert_eq!(point[0], 4);
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "ec-1",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }]});
        let mut verifier = Verifier::default();
        verifier.add_jwks(&jwks.to_string()).unwrap();
        assert_eq!(
            verifier.verify(&token, NOW).map(|c| c.subject.to_string()),
            Ok("drv-1".into())
        );
        // HS256 "signed" with the public key's bytes: refused by algorithm.
        let confused = Claims::new(Role::Driver, VehicleId::new("drv-1").unwrap(), NOW + 60)
            .sign(&SigningKey::hs256(point).with_kid("ec-1"))
            .unwrap();
        assert!(matches!(
            verifier.verify(&confused, NOW),
            Err(TokenError::WrongAlgorithm(_))
        ));
    }

    #[test]
    fn rs256_tokens_verify_with_the_public_key() {
        let private = include_str!("../testdata/rsa-private.pem");
        let public = include_str!("../testdata/rsa-public.jwk.json");
        let signing = SigningKey::from_pem(Algorithm::RS256, private.as_bytes())
            .unwrap()
            .with_kid("rsa-1");
        let token = driver("drv-9", NOW + 60).sign(&signing).unwrap();
        let mut verifier = Verifier::default();
        verifier
            .add_jwks(&format!(r#"{{"keys": [{public}]}}"#))
            .unwrap();
        assert!(verifier.verify(&token, NOW).is_ok());
    }

    #[test]
    fn an_audience_when_configured_must_match() {
        let verifier = Verifier::with_secret(SECRET).with_audience(Some("hexfleet".into()));
        let with = driver("drv-1", NOW + 60)
            .for_audience("hexfleet")
            .mint(SECRET);
        let other = driver("drv-1", NOW + 60)
            .for_audience("billing")
            .mint(SECRET);
        let without = driver("drv-1", NOW + 60).mint(SECRET);
        assert!(verifier.verify(&with, NOW).is_ok());
        assert_eq!(verifier.verify(&other, NOW), Err(TokenError::WrongAudience));
        assert_eq!(
            verifier.verify(&without, NOW),
            Err(TokenError::WrongAudience)
        );
        // A node without an audience accepts tokens with one.
        assert!(Verifier::with_secret(SECRET).verify(&other, NOW).is_ok());
    }

    #[test]
    fn bad_key_sets_are_refused_with_a_reason() {
        let mut v = Verifier::default();
        assert!(matches!(v.add_jwks("not json"), Err(KeyError::Jwks(_))));
        assert!(matches!(
            v.add_jwks(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#),
            Err(KeyError::NoKeyId)
        ));
        assert!(matches!(
            v.add_jwks(r#"{"keys":[{"kty":"oct","kid":"a","alg":"RS256","k":"c2VjcmV0"}]}"#),
            Err(KeyError::Key { .. })
        ));
    }
}
