//! The listener's TLS setup: a rustls `ServerConfig` (ring provider, TLS 1.2/1.3, ALPN
//! `http/1.1`, no client certificates) from the certificate `[tls]` names.
//!
//! In `self-signed` mode the node makes its own certificate on first start and keeps it
//! in `data_dir/tls/` (see [`self_signed_paths`]), so clients can pin or trust one file
//! across restarts. It covers `localhost`, `127.0.0.1`, `::1`, the listen IP and the
//! `public_url` host as they were at generation time; delete both files to regenerate.

use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{Config, TlsMode, create_private_file};

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        /// Which file it is ("certificate file", "private key file").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// A generated certificate or key could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// A file is not usable PEM, or holds no item of the expected kind.
    #[error("{} holds no usable {what}: {message}", path.display())]
    Pem {
        /// What was expected ("certificate", "private key").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The parser's explanation.
        message: String,
    },
    /// `mode = "files"` without `cert_file` or `key_file`.
    #[error("tls.mode is \"files\" but {0} is not set")]
    MissingSetting(&'static str),
    /// The self-signed certificate could not be generated.
    #[error("cannot generate the self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the certificate or key (e.g. the key does not match the certificate).
    #[error("certificate {} with key {} is not usable: {source}", cert.display(), key.display())]
    Rustls {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's reason.
        source: rustls::Error,
    },
}

/// Where self-signed mode keeps its certificate and key: `(cert.pem, key.pem)` in
/// `data_dir/tls/`.
pub fn self_signed_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = data_dir.join("tls");
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// The rustls server configuration for `cfg`, or `None` when `tls.mode` is `off`.
pub fn server_config(cfg: &Config) -> Result<Option<Arc<rustls::ServerConfig>>, TlsError> {
    let (cert_path, key_path) = match cfg.tls.mode {
        TlsMode::Off => return Ok(None),
        TlsMode::Files => (
            cfg.tls
                .cert_file
                .clone()
                .ok_or(TlsError::MissingSetting("tls.cert_file"))?,
            cfg.tls
                .key_file
                .clone()
                .ok_or(TlsError::MissingSetting("tls.key_file"))?,
        ),
        TlsMode::SelfSigned => {
            let (cert, key) = self_signed_paths(&cfg.data_dir);
            if !(cert.exists() && key.exists()) {
                generate_self_signed(cfg, &cert, &key)?;
            }
            (cert, key)
        }
    };
    let chain = load_certs(&cert_path)?;
    let key = load_key(&key_path)?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let rustls_error = |source| TlsError::Rustls {
        cert: cert_path.clone(),
        key: key_path.clone(),
        source,
    };
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(rustls_error)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(rustls_error)?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(server)))
}

/// The names the self-signed certificate covers.
fn subject_alt_names(cfg: &Config) -> Vec<String> {
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let listen = cfg.listen.ip();
    if !listen.is_unspecified() {
        names.push(listen.to_string());
    }
    if let Some(host) = cfg.public_host() {
        // Normalise IPs so "::0001" and "::1" are not listed twice.
        names.push(match host.parse::<IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => host.to_ascii_lowercase(),
        });
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

fn generate_self_signed(cfg: &Config, cert_path: &Path, key_path: &Path) -> Result<(), TlsError> {
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(subject_alt_names(cfg))?;
    // Only one of the pair may exist (an interrupted earlier start): replace it.
    for path in [cert_path, key_path] {
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(TlsError::Write {
                    path: path.to_owned(),
                    source: e,
                });
            }
            _ => {}
        }
    }
    // The key first and the certificate last: the certificate's presence marks a complete pair.
    write_new(key_path, key_pair.serialize_pem().as_bytes())?;
    write_new(cert_path, cert.pem().as_bytes())
}

fn write_new(path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    create_private_file(path)
        .and_then(|mut file| {
            file.write_all(contents)?;
            file.sync_all()
        })
        .map_err(|source| TlsError::Write {
            path: path.to_owned(),
            source,
        })
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path, "certificate file")?;
    let pem_error = |message: String| TlsError::Pem {
        what: "certificate",
        path: path.to_owned(),
        message,
    };
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_error("no \"BEGIN CERTIFICATE\" section".to_owned()));
    }
    Ok(chain)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path, "private key file")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        what: "private key",
        path: path.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed_in(dir: &Path) -> Config {
        Config {
            data_dir: dir.join("data"),
            public_url: Some("https://relay.example.com:8443".to_owned()),
            ..Config::default()
        }
    }

    #[test]
    fn self_signed_is_generated_once_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = self_signed_in(dir.path());
        let (cert, key) = self_signed_paths(&cfg.data_dir);
        assert!(!cert.exists());

        let server = server_config(&cfg).expect("tls").expect("enabled");
        assert_eq!(server.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let first = fs::read(&cert).expect("cert written");
        assert!(key.exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&key).expect("metadata").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        server_config(&cfg).expect("tls").expect("enabled");
        assert_eq!(
            fs::read(&cert).expect("cert"),
            first,
            "reused, not regenerated"
        );
    }

    #[test]
    fn self_signed_covers_the_public_host() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = self_signed_in(dir.path());
        let names = subject_alt_names(&cfg);
        assert_eq!(
            names,
            ["localhost", "127.0.0.1", "::1", "relay.example.com"]
        );
    }

    #[test]
    fn files_mode_loads_the_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let generated = self_signed_in(dir.path());
        server_config(&generated).expect("generate");
        let (cert, key) = self_signed_paths(&generated.data_dir);

        let mut cfg = Config::default();
        cfg.tls.mode = TlsMode::Files;
        cfg.tls.cert_file = Some(cert);
        cfg.tls.key_file = Some(key);
        assert!(server_config(&cfg).expect("files").is_some());
    }

    #[test]
    fn files_mode_with_a_missing_file_names_it() {
        let mut cfg = Config::default();
        cfg.tls.mode = TlsMode::Files;
        cfg.tls.cert_file = Some("/nonexistent/fullchain.pem".into());
        cfg.tls.key_file = Some("/nonexistent/privkey.pem".into());
        let err = server_config(&cfg).expect_err("missing");
        assert!(matches!(err, TlsError::Read { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains("certificate file /nonexistent/fullchain.pem"),
            "{err}"
        );
    }

    #[test]
    fn files_mode_with_a_wrong_file_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let not_pem = dir.path().join("cert.pem");
        fs::write(&not_pem, "hello").expect("write");
        let mut cfg = Config::default();
        cfg.tls.mode = TlsMode::Files;
        cfg.tls.cert_file = Some(not_pem.clone());
        cfg.tls.key_file = Some(not_pem.clone());
        let err = server_config(&cfg).expect_err("not pem");
        assert!(matches!(err, TlsError::Pem { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&*not_pem.to_string_lossy()),
            "{err}"
        );
    }

    #[test]
    fn off_means_none() {
        let mut cfg = Config::default();
        cfg.tls.mode = TlsMode::Off;
        assert!(server_config(&cfg).expect("off").is_none());
    }
}
