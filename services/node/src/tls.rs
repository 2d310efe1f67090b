//! The node's TLS identity and QUIC server configuration.
//!
//! A configured certificate and key (PEM) are used as is. Without them the
//! node makes a self-signed development certificate for `localhost` and keeps
//! it in the dev directory, where clients on the same machine load it; a
//! certificate already there is reused, so restarting a node does not break
//! the clients that trust it.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::config::TlsConfig;
use hexfleet_protocol::dev::{DEV_CERT_FILE, DEV_KEY_FILE, DEV_SERVER_NAME};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("writing the development certificate to {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("making the development certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("QUIC TLS configuration: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// Where the development certificate is, when one is used.
    pub dev_cert: Option<PathBuf>,
}

pub fn load_or_create(config: &TlsConfig) -> Result<Identity, TlsError> {
    if let (Some(cert), Some(key)) = (&config.cert, &config.key) {
        let read_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TlsError::Read { path, source }
        };
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(read_err(cert))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(read_err(cert))?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(read_err(key))?;
        return Ok(Identity {
            chain,
            key,
            dev_cert: None,
        });
    }
    dev_identity(&config.dev_dir)
}

fn dev_identity(dir: &Path) -> Result<Identity, TlsError> {
    let (cert_path, key_path) = (dir.join(DEV_CERT_FILE), dir.join(DEV_KEY_FILE));
    if let (Ok(cert), Ok(key)) = (std::fs::read(&cert_path), std::fs::read(&key_path)) {
        return Ok(Identity {
            chain: vec![CertificateDer::from(cert)],
            key: PrivatePkcs8KeyDer::from(key).into(),
            dev_cert: Some(cert_path),
        });
    }
    let made = rcgen::generate_simple_self_signed(vec![
        DEV_SERVER_NAME.to_string(),
        "127.0.0.1".into(),
        "::1".into(),
    ])?;
    let cert = made.cert.der().to_vec();
    let key = made.signing_key.serialize_der();
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    // Key first, certificate last: a client that finds the certificate can
    // rely on the node that wrote it. Each file is renamed into place whole.
    write_atomically(&key_path, &key).map_err(write_err(&key_path))?;
    write_atomically(&cert_path, &cert).map_err(write_err(&cert_path))?;
    tracing::info!(path = %cert_path.display(), "wrote a development certificate");
    Ok(Identity {
        chain: vec![CertificateDer::from(cert)],
        key: PrivatePkcs8KeyDer::from(key).into(),
        dev_cert: Some(cert_path),
    })
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::rename(&tmp, path)
}

/// The QUIC server configuration: TLS 1.3 with ALPN `hexfleet/1`, and a
/// transport tuned for many small, mostly idle connections.
pub fn server_config(
    identity: Identity,
    transport: quinn::TransportConfig,
) -> Result<quinn::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.chain, identity.key)?;
    crypto.alpn_protocols = vec![hexfleet_protocol::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    Ok(config)
}
