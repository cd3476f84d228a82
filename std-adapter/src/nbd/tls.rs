//! TLS as qemu-nbd offers it: `--object
//! tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=on|off]`
//! names a directory holding QEMU's file names: `ca-cert.pem` (the
//! authority client certificates must chain to), `server-cert.pem` and
//! `server-key.pem`. As in QEMU, `verify-peer` defaults to on: clients
//! must present a certificate signed by the authority.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// QEMU's `tls-creds-x509` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Creds {
    /// The object's id.
    pub id: String,
    /// The directory of PEM files.
    pub dir: PathBuf,
    /// `server` or `client`.
    pub endpoint: String,
    /// Whether the peer must present a certificate.
    pub verify_peer: bool,
}

impl X509Creds {
    /// Parses the properties after `tls-creds-x509,` of an `--object`.
    pub fn parse(props: &str) -> Result<X509Creds, String> {
        let (mut id, mut dir, mut endpoint, mut verify_peer) = (None, None, None, true);
        for p in props.split(',').filter(|p| !p.is_empty()) {
            match p.split_once('=') {
                Some(("id", v)) => id = Some(v.to_string()),
                Some(("dir", v)) => dir = Some(PathBuf::from(v)),
                Some(("endpoint", v @ ("server" | "client"))) => endpoint = Some(v.to_string()),
                Some(("verify-peer", v)) => {
                    verify_peer = match v {
                        "on" | "yes" | "true" => true,
                        "off" | "no" | "false" => false,
                        _ => {
                            return Err(format!(
                                "Parameter 'verify-peer' expects 'on' or 'off', got '{v}'"
                            ))
                        }
                    }
                }
                Some(("priority", _)) => {}
                _ => return Err(format!("Unsupported tls-creds-x509 property '{p}'")),
            }
        }
        Ok(X509Creds {
            id: id.ok_or("Parameter 'id' is missing")?,
            dir: dir.ok_or("Parameter 'dir' is missing")?,
            endpoint: endpoint.unwrap_or_else(|| "client".into()),
            verify_peer,
        })
    }

    /// The rustls configuration of a server with these credentials.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        if self.endpoint != "server" {
            return Err(format!(
                "Expecting TLS credentials with a server endpoint ('{}' has endpoint={})",
                self.id, self.endpoint
            ));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = read_certs(&self.dir.join("server-cert.pem"))?;
        let key = read_key(&self.dir.join("server-key.pem"))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        let builder = if self.verify_peer {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs(&self.dir.join("ca-cert.pem"))? {
                roots
                    .add(c)
                    .map_err(|e| format!("Unable to use the CA certificate: {e}"))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| format!("TLS client verification: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(certs, key)
            .map_err(|e| format!("Unable to use the server certificate and key: {e}"))?;
        Ok(Arc::new(config))
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("Unable to read certificates from '{}': {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("No certificate in '{}'", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("Unable to read the private key '{}': {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemus_properties() {
        let c = X509Creds::parse("id=tls0,dir=/etc/pki/qemu,endpoint=server").unwrap();
        assert_eq!(c.id, "tls0");
        assert_eq!(c.dir, PathBuf::from("/etc/pki/qemu"));
        assert!(c.verify_peer);
        let c = X509Creds::parse("id=t,dir=d,endpoint=server,verify-peer=off").unwrap();
        assert!(!c.verify_peer);
        assert!(X509Creds::parse("dir=d").unwrap_err().contains("'id'"));
        assert!(X509Creds::parse("id=t,dir=d,bogus=1")
            .unwrap_err()
            .contains("bogus"));
    }

    #[test]
    fn missing_files_are_named() {
        let c = X509Creds::parse("id=t,dir=/nonexistent-qcowkit,endpoint=server").unwrap();
        let e = c.server_config().unwrap_err();
        assert!(e.contains("/nonexistent-qcowkit/server-cert.pem"), "{e}");
        let c = X509Creds::parse("id=t,dir=/x,endpoint=client").unwrap();
        assert!(c.server_config().unwrap_err().contains("server endpoint"));
    }
}
