//! The node's TLS identity, reloadable, and the QUIC and HTTPS server
//! configurations over it.
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

use parking_lot::RwLock;
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

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

/// The node's certificate, as every TLS handshake sees it: QUIC's and
/// HTTPS's. [`Certificates::reload`] swaps it for new handshakes; connections
/// already open keep the one they started with.
#[derive(Debug)]
pub struct Certificates {
    config: TlsConfig,
    current: RwLock<Arc<CertifiedKey>>,
    /// Where the development certificate is, when one is used.
    pub dev_cert: Option<PathBuf>,
}

impl Certificates {
    pub fn load(config: &TlsConfig) -> Result<Arc<Self>, TlsError> {
        let identity = load_or_create(config)?;
        Ok(Arc::new(Self {
            config: config.clone(),
            current: RwLock::new(certified(identity.chain, identity.key)?),
            dev_cert: identity.dev_cert,
        }))
    }

    /// Reads the configured certificate and key again. On an error the
    /// current ones stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let identity = load_or_create(&self.config)?;
        *self.current.write() = certified(identity.chain, identity.key)?;
        Ok(())
    }

    /// The certificate chain handshakes present now: what a peer's HTTPS
    /// client trusts, nodes of one cluster sharing a certificate or its CA.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.read().cert.clone()
    }

    /// The files a reload reads (none for a development certificate).
    pub fn files(&self) -> Vec<PathBuf> {
        [&self.config.cert, &self.config.key]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// A rustls server configuration over these certificates, with `alpn`.
    fn server(
        self: &Arc<Self>,
        versions: &[&'static rustls::SupportedProtocolVersion],
        alpn: Vec<Vec<u8>>,
    ) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut crypto = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        crypto.alpn_protocols = alpn;
        Ok(crypto)
    }

    /// The HTTPS (and WSS) server configuration: TLS 1.2 and 1.3, HTTP/1.1.
    pub fn https(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
        Ok(Arc::new(
            self.server(&versions, vec![b"http/1.1".to_vec()])?,
        ))
    }

    /// The QUIC server configuration: TLS 1.3 with ALPN `hexfleet/1` (and
    /// `hexfleet-probe/1`, the peers' probes of the client address), and a
    /// transport tuned for many small, mostly idle connections.
    pub fn quic(
        self: &Arc<Self>,
        transport: quinn::TransportConfig,
    ) -> Result<quinn::ServerConfig, TlsError> {
        let crypto = self.server(
            &[&rustls::version::TLS13],
            vec![
                hexfleet_protocol::ALPN.to_vec(),
                hexfleet_protocol::PROBE_ALPN.to_vec(),
            ],
        )?;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(Arc::new(transport));
        Ok(config)
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let provider = rustls::crypto::ring::default_provider();
    Ok(Arc::new(CertifiedKey::from_der(chain, key, &provider)?))
}
