//! Signed tokens: `hf1.<role>.<subject>.<expires>.<signature>`, where the
//! signature is HMAC-SHA256 over everything before it with the cluster's
//! shared secret, base64url without padding. A token binds one role to one
//! subject (a driver's vehicle id, a rider id) until it expires.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use hexfleet_model::VehicleId;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::Role;

const PREFIX: &str = "hf1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub role: Role,
    /// Who the token speaks for. Same alphabet as a vehicle id.
    pub subject: VehicleId,
    /// Unix seconds after which the token is refused.
    pub expires_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no token")]
    Missing,
    #[error("token is malformed")]
    Malformed,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token is for role {token} but the client says it is a {claimed}")]
    WrongRole {
        token: &'static str,
        claimed: &'static str,
    },
}

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length")
}

impl Claims {
    pub fn new(role: Role, subject: VehicleId, expires_at: u64) -> Self {
        Self {
            role,
            subject,
            expires_at,
        }
    }

    /// Signs the claims into a token string.
    pub fn mint(&self, secret: &[u8]) -> String {
        let payload = format!(
            "{PREFIX}.{}.{}.{}",
            self.role.as_str(),
            self.subject,
            self.expires_at
        );
        let mut mac = mac(secret);
        mac.update(payload.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{payload}.{signature}")
    }

    /// Checks a token's signature and expiry (`now` in Unix seconds) and
    /// returns its claims. The signature is compared in constant time.
    pub fn verify(token: &str, secret: &[u8], now: u64) -> Result<Claims, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        let (payload, signature) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Malformed)?;
        let mut parts = payload.split('.');
        let (Some(PREFIX), Some(role), Some(subject), Some(expires), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Malformed);
        };
        let mut mac = mac(secret);
        mac.update(payload.as_bytes());
        mac.verify_slice(&signature)
            .map_err(|_| TokenError::BadSignature)?;
        // Signed by us: the fields below were written by `mint`.
        let role = Role::parse(role).ok_or(TokenError::Malformed)?;
        let subject = VehicleId::new(subject).map_err(|_| TokenError::Malformed)?;
        let expires_at: u64 = expires.parse().map_err(|_| TokenError::Malformed)?;
        if expires_at < now {
            return Err(TokenError::Expired);
        }
        Ok(Claims {
            role,
            subject,
            expires_at,
        })
    }

    /// Verifies a token presented by a client that says it has `role`.
    pub fn verify_for(
        token: &str,
        role: Role,
        secret: &[u8],
        now: u64,
    ) -> Result<Claims, TokenError> {
        let claims = Self::verify(token, secret, now)?;
        if claims.role != role {
            return Err(TokenError::WrongRole {
                token: claims.role.as_str(),
                claimed: role.as_str(),
            });
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"test-secret";
    const NOW: u64 = 1_800_000_000;

    fn driver(id: &str, expires_at: u64) -> Claims {
        Claims::new(Role::Driver, VehicleId::new(id).unwrap(), expires_at)
    }

    #[test]
    fn a_minted_token_verifies_with_its_claims() {
        let claims = driver("drv-1", NOW + 60);
        let token = claims.mint(SECRET);
        assert_eq!(
            Claims::verify_for(&token, Role::Driver, SECRET, NOW),
            Ok(claims)
        );
    }

    #[test]
    fn forged_expired_and_misused_tokens_are_refused() {
        let token = driver("drv-1", NOW + 60).mint(SECRET);
        assert_eq!(
            Claims::verify(&token, b"other", NOW),
            Err(TokenError::BadSignature)
        );
        let forged = token.replacen("drv-1", "drv-2", 1);
        assert_eq!(
            Claims::verify(&forged, SECRET, NOW),
            Err(TokenError::BadSignature)
        );
        let expired = driver("drv-1", NOW - 1).mint(SECRET);
        assert_eq!(
            Claims::verify(&expired, SECRET, NOW),
            Err(TokenError::Expired)
        );
        assert!(matches!(
            Claims::verify_for(&token, Role::Rider, SECRET, NOW),
            Err(TokenError::WrongRole { .. })
        ));
        assert_eq!(Claims::verify("", SECRET, NOW), Err(TokenError::Missing));
        for junk in ["x", "hf1.driver", "a.b.c.d.e.f", "hf1.driver.d.1.!!!"] {
            assert_eq!(
                Claims::verify(junk, SECRET, NOW),
                Err(TokenError::Malformed),
                "{junk}"
            );
        }
    }
}
