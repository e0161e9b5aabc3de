//! The WebSocket hop over TLS: a filter serving `wss://` with a certificate this test makes, a
//! generator that trusts it through `FILTER_CA_FILE` and sends its token from a file, and a
//! client with a wrong token refused with 401 over TLS.

use std::time::Duration;

use flowmesh_filter::testing::TestFilter;
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

    let mut config = GeneratorConfig::for_tests(&url);
    config.source = Some("tls".into());
    config.rate = Rate::Max;
    config.count = Some(300);
    config.ca_file = Some(cert.clone());
    config.token.file = Some(token);
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
    assert_eq!(summary.counts.acked, 300);

    // Over TLS, a wrong token still gets 401 at the upgrade.
    let tls = flowmesh_common::tls::client_config(Some(&cert)).expect("client config");
    let mut request = url.as_str().into_client_request().expect("request");
    request.headers_mut().insert(
        "authorization",
        "Bearer a-wrong-token-of-enough-length"
            .parse()
            .expect("header"),
    );
    let refused = tokio_tungstenite::connect_async_tls_with_config(
        request,
        None,
        true,
        Some(tokio_tungstenite::Connector::Rustls(tls)),
    )
    .await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => panic!("expected 401, got {:?}", other.map(|_| "a connection")),
    }
    // And a plain ws:// client gets no WebSocket at all.
    let plain = format!("ws://127.0.0.1:{}/ingest", filter.ws_addr.port());
    assert!(tokio_tungstenite::connect_async(plain).await.is_err());
    filter.finish().await;
}
