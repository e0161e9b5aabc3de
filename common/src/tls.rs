//! TLS for the WebSocket hop (rustls with the aws-lc-rs provider, the one the other drivers of
//! the tree already use): the filter's server configuration from PEM files, and the generator's
//! client configuration trusting the system's roots plus an optional CA file.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certificates = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    anyhow::ensure!(
        !certificates.is_empty(),
        "{} holds no certificate",
        path.display()
    );
    Ok(certificates)
}

/// A server configuration from a PEM certificate chain and its PEM private key.
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the private key in {}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certificates(cert)?, key)
        .context("the certificate and the key do not go together")?;
    Ok(Arc::new(config))
}

/// A client configuration trusting the system's root certificates and, when given, the CA
/// certificates in `extra_ca` (PEM).
pub fn client_config(extra_ca: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for certificate in native.certs {
        // A system certificate rustls cannot use is skipped, as browsers do.
        let _ = roots.add(certificate);
    }
    if let Some(path) = extra_ca {
        for certificate in certificates(path)? {
            roots
                .add(certificate)
                .with_context(|| format!("a CA certificate in {} is not usable", path.display()))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// One line that says why a TLS handshake to the filter failed and how to fix it, when `err`
/// (or an error under it) is a certificate rustls refused; `None` for other errors.
///
/// The usual trap is a certificate made with `openssl req -x509 …`: OpenSSL 3 marks it a CA
/// (`basicConstraints CA:TRUE`), and TLS clients that follow RFC 5280 refuse a CA certificate
/// as a server's own.
pub fn explain(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current = Some(err);
    while let Some(error) = current {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(describe(tls));
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && let Some(tls) = io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())
        {
            return Some(describe(tls));
        }
        current = error.source();
    }
    None
}

fn describe(err: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    const MAKE: &str = "scripts/make-certs.sh makes a CA and a server certificate signed by it";
    let rustls::Error::InvalidCertificate(cause) = err else {
        return format!("TLS handshake with the filter failed: {err}");
    };
    match cause {
        C::Other(other) if format!("{other:?}").contains("CaUsedAsEndEntity") => format!(
            "the filter's certificate is a CA certificate (basicConstraints CA:TRUE, which `openssl req -x509` sets), and a CA certificate cannot be a server's own: serve a server certificate signed by a CA (FILTER_TLS_CERT) and trust that CA (FILTER_CA_FILE); {MAKE}"
        ),
        C::UnknownIssuer => format!(
            "the filter's certificate is not signed by a CA this generator trusts: set FILTER_CA_FILE (--ca-file) to the PEM of the CA that signed it; {MAKE}"
        ),
        C::NotValidForName | C::NotValidForNameContext { .. } => format!(
            "the filter's certificate does not name the host of FILTER_URL: use a certificate whose subjectAltName holds that host ({MAKE}, for the hosts you give it): {err}"
        ),
        C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. } => {
            format!("the filter's certificate is outside its validity period: renew it: {err}")
        }
        _ => format!("the filter's certificate was refused: {err}"),
    }
}
