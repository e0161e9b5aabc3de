//! The WebSocket hop over TLS: a filter serving `wss://` with a certificate this test makes, a
//! generator that trusts it through `FILTER_CA_FILE` and sends its token from a file, and a
//! client with a wrong token refused with 401 over TLS.

use std::time::Duration;

use flowmesh_filter::testkit::TestFilter;
use flowmesh_generator::config::Rate;
use flowmesh_generator::{Application, GeneratorConfig};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "a-token-of-enough-characters";

/// A certificate for 127.0.0.1 and localhost, its key, and a token file, in `dir`.
fn credentials(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let generated =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("certificate");
    let (cert, key, token) = (dir.join("cert.pem"), dir.join("key.pem"), dir.join("token"));
    std::fs::write(&cert, generated.cert.pem()).expect("cert");
    std::fs::write(&key, generated.signing_key.serialize_pem()).expect("key");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("token");
    (cert, key, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generator_reaches_a_tls_filter_with_its_token_file_and_a_wrong_token_gets_401() {
    let dir = tempfile::tempdir().expect("dir");
    let (cert, key, token) = credentials(dir.path());
    let filter = {
        let (cert, key, token) = (cert.clone(), key.clone(), token.clone());
        TestFilter::start("tls", move |c| {
            c.tls_cert = Some(cert);
            c.tls_key = Some(key);
            c.token.file = Some(token);
        })
        .await
    };
    filter.wait_connected().await;
    let url = format!("wss://127.0.0.1:{}/ingest", filter.ws_addr.port());

    assert_eq!(send(&url, &cert, Some(&token), 300).await, 300);

    // Over TLS, a wrong token still gets 401 at the upgrade.
    let refused = upgrade(&url, Some(&cert), Some("a-wrong-token-of-enough-length")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => panic!("expected 401, got {other:?}"),
    }
    // And a plain ws:// client gets no WebSocket at all.
    let plain = format!("ws://127.0.0.1:{}/ingest", filter.ws_addr.port());
    assert!(tokio_tungstenite::connect_async(plain).await.is_err());
    filter.finish().await;
}

/// Runs a generator for `count` records against `url`, trusting `ca` and sending the token in
/// `token` (a file) if given; returns how many were acked.
async fn send(url: &str, ca: &std::path::Path, token: Option<&std::path::Path>, count: u64) -> u64 {
    let mut config = GeneratorConfig::for_tests(url);
    config.rate = Rate::Max;
    config.count = Some(count);
    config.ca_file = Some(ca.to_owned());
    config.token.file = token.map(std::path::Path::to_owned);
    let summary = tokio::time::timeout(
        Duration::from_secs(120),
        Application::build(config)
            .await
            .expect("builds")
            .run_until_stopped(CancellationToken::new()),
    )
    .await
    .expect("finishes")
    .expect("runs");
    summary.counts.acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificates_make_certs_sh_makes_carry_records_over_wss() {
    let dir = tempfile::tempdir().expect("dir");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-certs.sh");
    let made = std::process::Command::new("bash")
        .arg(&script)
        .arg(dir.path())
        .args(["127.0.0.1", "localhost"])
        .status()
        .expect("bash runs the script");
    assert!(made.success(), "make-certs.sh failed");
    let (cert, key) = (
        dir.path().join("server.pem"),
        dir.path().join("server-key.pem"),
    );
    let filter = TestFilter::start("tls-made", move |c| {
        c.tls_cert = Some(cert);
        c.tls_key = Some(key);
    })
    .await;
    filter.wait_connected().await;
    let url = format!("wss://127.0.0.1:{}/ingest", filter.ws_addr.port());
    assert_eq!(send(&url, &dir.path().join("ca.pem"), None, 200).await, 200);
    filter.finish().await;
}

/// A `wss://` upgrade to `url`, trusting the system's roots and `ca`, with `token` if given.
async fn upgrade(
    url: &str,
    ca: Option<&std::path::Path>,
    token: Option<&str>,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let tls = flowmesh_common::tls::client_config(ca).expect("client config");
    let mut request = url.into_client_request().expect("request");
    if let Some(token) = token {
        let header = format!("Bearer {token}").parse().expect("header");
        request.headers_mut().insert("authorization", header);
    }
    tokio_tungstenite::connect_async_tls_with_config(
        request,
        None,
        true,
        Some(tokio_tungstenite::Connector::Rustls(tls)),
    )
    .await
    .map(|_| ())
}

/// The error a `wss://` handshake to a filter serving `cert` ends with, for a client trusting
/// `ca` (none: the system's roots only), as the generator explains it.
async fn refusal(cert: &rcgen::Certificate, key: &rcgen::KeyPair, ca: Option<&str>) -> String {
    let dir = tempfile::tempdir().expect("dir");
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).expect("cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("key");
    let filter = TestFilter::start("tls-refused", move |c| {
        c.tls_cert = Some(cert_path);
        c.tls_key = Some(key_path);
    })
    .await;
    let ca_path = dir.path().join("ca.pem");
    if let Some(ca) = ca {
        std::fs::write(&ca_path, ca).expect("ca");
    }
    let url = format!("wss://127.0.0.1:{}/ingest", filter.ws_addr.port());
    let refused = upgrade(&url, ca.map(|_| ca_path.as_path()), None).await;
    filter.finish().await;
    match refused {
        Err(err) => {
            flowmesh_common::tls::explain(&err).unwrap_or_else(|| format!("unexplained: {err}"))
        }
        Ok(_) => panic!("the handshake succeeded"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_made_the_usual_wrong_ways_is_refused_with_its_cause_and_its_fix() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    // As `openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=localhost` makes it: self-signed,
    // and marked a CA.
    let key = KeyPair::generate().expect("key");
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_as_leaf = params.self_signed(&key).expect("certificate");
    let why = refusal(&ca_as_leaf, &key, Some(&ca_as_leaf.pem())).await;
    assert!(
        why.contains("is a CA certificate") && why.contains("make-certs.sh"),
        "{why}"
    );

    // A good certificate the client was not told to trust.
    let plain = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).expect("cert");
    let why = refusal(&plain.cert, &plain.signing_key, None).await;
    assert!(why.contains("FILTER_CA_FILE"), "{why}");

    // One made for another host.
    let other = rcgen::generate_simple_self_signed(vec!["filter.example".into()]).expect("cert");
    let why = refusal(&other.cert, &other.signing_key, Some(&other.cert.pem())).await;
    assert!(why.contains("does not name the host"), "{why}");
}
