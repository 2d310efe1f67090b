//! Development conventions shared by the node and its clients on one machine:
//! where the node writes its self-signed certificate and which token secret is
//! used when none is configured. Never rely on these in production.

use std::path::PathBuf;

/// The token secret used when `HEXFLEET_TOKEN_SECRET` is not set.
pub const DEV_TOKEN_SECRET: &str = "hexfleet-dev-secret-do-not-use-in-production";

/// The file name of the development certificate (DER) in the dev directory.
pub const DEV_CERT_FILE: &str = "cert.der";
/// The file name of the development private key (DER) in the dev directory.
pub const DEV_KEY_FILE: &str = "key.der";

/// The server name the development certificate is issued for.
pub const DEV_SERVER_NAME: &str = "localhost";

/// Where a node without a configured certificate writes its development
/// certificate, and where clients look for it: `$HEXFLEET_DEV_DIR`, else
/// `hexfleet-dev` in the system temporary directory.
pub fn default_dev_dir() -> PathBuf {
    std::env::var_os("HEXFLEET_DEV_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("hexfleet-dev"))
}

/// The development certificate clients trust by default.
pub fn default_dev_cert() -> PathBuf {
    default_dev_dir().join(DEV_CERT_FILE)
}
