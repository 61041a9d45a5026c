//! HTTPS upstreams: a local HTTPS tile origin on 127.0.0.1 with a private CA
//! made by rcgen, trusted through the proxy's extra-CA knob.

use crate::common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cache_proxy::health::Health;
use cache_proxy::upstream::{self, Client, FetchError, Target, TlsConfigError};
use cache_proxy::{Config, Deps, TileFormat, TileSource};
use common::*;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A CA and a server certificate it signed.
struct Pki {
    ca_pem: String,
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
}

fn pki(names: &[&str]) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Relief Agency Test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    Pki {
        ca_pem: ca.pem(),
        chain: vec![cert.der().clone(), ca.der().clone()],
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
    }
}

/// An HTTPS origin serving PNG "tiles" at `/tile/...`.
struct TlsOrigin {
    addr: SocketAddr,
    /// HTTP requests answered.
    requests: Arc<AtomicU64>,
    /// TLS handshakes completed.
    handshakes: Arc<AtomicU64>,
    /// SNI of the last handshake.
    sni: Arc<Mutex<Option<String>>>,
    cancel: CancellationToken,
}

impl Drop for TlsOrigin {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn tls_origin(pki: &Pki) -> TlsOrigin {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(pki.chain.clone(), PrivateKeyDer::Pkcs8(pki.key.clone_key()))
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let o = TlsOrigin {
        addr,
        requests: Arc::default(),
        handshakes: Arc::default(),
        sni: Arc::default(),
        cancel: CancellationToken::new(),
    };
    let (requests, handshakes, sni, cancel) = (
        o.requests.clone(),
        o.handshakes.clone(),
        o.sni.clone(),
        o.cancel.clone(),
    );
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                _ = cancel.cancelled() => return,
                r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            };
            let (acceptor, requests, handshakes, sni) = (
                acceptor.clone(),
                requests.clone(),
                handshakes.clone(),
                sni.clone(),
            );
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return; // the client refused our certificate
                };
                handshakes.fetch_add(1, Ordering::SeqCst);
                *sni.lock().unwrap() = tls.get_ref().1.server_name().map(String::from);
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let requests = requests.clone();
                    async move {
                        requests.fetch_add(1, Ordering::SeqCst);
                        let body = tile_body(req.uri().path(), 0);
                        let mut r = Response::new(Full::new(body));
                        r.headers_mut()
                            .insert("content-type", "image/png".parse().unwrap());
                        r.headers_mut()
                            .insert("cache-control", "max-age=3600".parse().unwrap());
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    o
}

fn https_config(origin: &TlsOrigin, host: &str) -> Config {
    let mut c = Config::default();
    c.proxy.listen = "127.0.0.1:0".parse().unwrap();
    c.proxy.name = "rack-a".into();
    // Probes are GETs of tile 0/0/0: none may reach the origin while its
    // requests are counted.
    c.proxy.backhaul.probe_interval_ms = 600_000;
    c.proxy.backhaul.probe_interval_down_ms = 600_000;
    c.proxy.backhaul.probe_timeout_ms = 300;
    c.proxy.backhaul.connect_timeout_ms = 1000;
    c.proxy.backhaul.response_timeout_ms = 1000;
    c.tile_source = vec![TileSource {
        name: "agency".into(),
        url: format!(
            "https://{host}:{}/tile/{{z}}/{{x}}/{{y}}.png",
            origin.addr.port()
        ),
        format: TileFormat::Png,
        min_zoom: 0,
        max_zoom: 18,
        attribution: String::new(),
        allow_bulk: false,
        requests_per_sec: 0,
        user_agent: "fieldrack-test/1".into(),
    }];
    c
}

fn write_ca(dir: &tempfile::TempDir, pki: &Pki) -> PathBuf {
    let path = dir.path().join("agency-ca.pem");
    std::fs::write(&path, &pki.ca_pem).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_tile_source_with_a_private_ca_is_fetched_cached_and_served() {
    let pki = pki(&["localhost", "127.0.0.1"]);
    let o = tls_origin(&pki).await;
    let work = tempfile::tempdir().unwrap();
    let ca = write_ca(&work, &pki);
    // By name (SNI sent) and by address (no SNI; the IP SAN is checked).
    for host in ["localhost", "127.0.0.1"] {
        let p = start(https_config(&o, host), Deps::default()).await;
        p.handle
            .trust_upstream_cas(std::slice::from_ref(&ca))
            .unwrap();
        let before = o.requests.load(Ordering::SeqCst);
        let hs_before = o.handshakes.load(Ordering::SeqCst);
        let r = get(p.addr, "/tiles/agency/3/2/1.png").await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.body, tile_body("/tile/3/2/1.png", 0));
        assert_eq!(r.headers["content-type"], "image/png");
        assert!(r.cache_status().contains("stored"), "{}", r.cache_status());
        let expected_sni = (host == "localhost").then(|| "localhost".to_string());
        assert_eq!(*o.sni.lock().unwrap(), expected_sni);
        p.settle().await;
        // Cached: served without the origin.
        let r = get(p.addr, "/tiles/agency/3/2/1.png").await;
        assert!(
            r.cache_status().starts_with("rack-a; hit"),
            "{}",
            r.cache_status()
        );
        assert_eq!(o.requests.load(Ordering::SeqCst), before + 1);
        // Another tile reuses the pooled TLS connection.
        let r = get(p.addr, "/tiles/agency/3/2/2.png").await;
        assert_eq!(r.status, 200);
        assert_eq!(o.requests.load(Ordering::SeqCst), before + 2);
        assert_eq!(o.handshakes.load(Ordering::SeqCst), hs_before + 1, "pooled");
        p.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_that_do_not_verify_get_a_502_and_nothing_is_stored() {
    let pki_ok = pki(&["localhost"]);
    let o = tls_origin(&pki_ok).await;
    let work = tempfile::tempdir().unwrap();
    // 1. Its CA is not trusted (only the webpki roots are).
    let p = start(https_config(&o, "localhost"), Deps::default()).await;
    let t0 = Instant::now();
    let r = get(p.addr, "/tiles/agency/1/0/0.png").await;
    assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(!r.cache_status().contains("stored"));
    p.settle().await;
    assert_eq!(p.handle.status().objects, 0);
    assert_eq!(o.requests.load(Ordering::SeqCst), 0, "no request sent");
    // The backhaul is not declared down for it: the far end is at fault.
    assert_eq!(p.handle.status().backhaul, "up");
    p.stop().await;

    // 2. A trusted CA, but the certificate names another host.
    let other = pki(&["tiles.other.example"]);
    let o2 = tls_origin(&other).await;
    let ca = write_ca(&work, &other);
    let p = start(https_config(&o2, "localhost"), Deps::default()).await;
    p.handle.trust_upstream_cas(&[ca]).unwrap();
    let r = get(p.addr, "/tiles/agency/1/0/0.png").await;
    assert_eq!(r.status, 502);
    p.settle().await;
    assert_eq!(p.handle.status().objects, 0);
    assert_eq!(o2.requests.load(Ordering::SeqCst), 0);
    p.stop().await;
}

fn client(timeout_ms: u64) -> Client {
    Client::new(
        Health::new(false),
        Duration::from_millis(timeout_ms),
        Duration::from_millis(timeout_ms),
        std::sync::Arc::default(),
    )
}

fn get_req(t: &Target) -> Request<upstream::UpBody> {
    Request::get(&t.path_and_query)
        .header("host", t.host_header())
        .body(Empty::new().map_err(|e| match e {}).boxed())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_say_what_is_wrong() {
    let pki_ok = pki(&["localhost"]);
    let o = tls_origin(&pki_ok).await;
    let t = Target::parse(&format!(
        "https://localhost:{}/tile/0/0/0.png",
        o.addr.port()
    ))
    .unwrap();

    // Unknown issuer: a typed error that says so.
    let c = client(1000);
    let e = c.send(&t, get_req(&t)).await.err().unwrap();
    match &e {
        FetchError::Certificate { reason, .. } => {
            assert_eq!(*reason, rustls::CertificateError::UnknownIssuer)
        }
        other => panic!("{other:?}"),
    }
    assert!(!e.is_link_failure());
    let msg = e.to_string();
    assert!(
        msg.contains("does not verify") && msg.contains("UnknownIssuer"),
        "{msg}"
    );
    // For the link, a certificate it does not trust still proves that
    // bytes flow both ways: the probe passes.
    assert!(c.probe(&t, Duration::from_secs(1)).await.is_some());

    // Trusted: works, and probes pass.
    let work = tempfile::tempdir().unwrap();
    c.trust_extra_cas(&[write_ca(&work, &pki_ok)]).unwrap();
    let (resp, conn) = c.send(&t, get_req(&t)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, tile_body("/tile/0/0/0.png", 0));
    c.release(conn);
    assert!(c.probe(&t, Duration::from_secs(1)).await.is_some());

    // A black hole after TCP: the handshake times out, a link failure.
    let hole = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = hole.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut keep = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            keep.push(s);
        }
    });
    let t2 = Target::parse(&format!("https://127.0.0.1:{port}/")).unwrap();
    let t0 = Instant::now();
    let e = client(300).send(&t2, get_req(&t2)).await.err().unwrap();
    assert!(matches!(e, FetchError::HandshakeTimeout(_)), "{e:?}");
    assert!(e.is_link_failure());
    assert!(t0.elapsed() < Duration::from_secs(2));
    held.abort();

    // A plain-HTTP server behind an https:// URL: a TLS error, not a hang.
    let plain = origin().await;
    let t3 = Target::parse(&format!("https://127.0.0.1:{}/probe", plain.addr.port())).unwrap();
    let e = client(1000).send(&t3, get_req(&t3)).await.err().unwrap();
    assert!(matches!(e, FetchError::Tls(..)), "{e:?}");
}

#[test]
fn extra_ca_files_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    assert!(matches!(
        upstream::tls_client_config(&[missing]),
        Err(TlsConfigError::Read { .. })
    ));
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "no pem here\n").unwrap();
    let e = upstream::tls_client_config(&[empty]).unwrap_err();
    assert!(matches!(e, TlsConfigError::NoCertificates { .. }), "{e}");
    assert!(e.to_string().contains("empty.pem"), "{e}");
    let p = pki(&["localhost"]);
    let good = write_ca(&dir, &p);
    upstream::tls_client_config(&[good]).unwrap();
    upstream::tls_client_config(&[]).unwrap();
}
