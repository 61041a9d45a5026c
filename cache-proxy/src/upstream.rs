//! The upstream HTTP/1.1 client: `http://` and `https://`, connect and
//! handshake timeouts, a small keep-alive pool, and passive health reports.
//!
//! HTTPS is rustls (the aws-lc-rs provider, named explicitly so a process
//! that links another provider still works) over tokio-rustls, trusting the
//! Mozilla roots of `webpki-roots` plus any extra CA certificates the
//! operator lists (a relief agency's own tile server behind a private CA):
//! see [`tls_client_config`] and [`Client::set_tls`]. SNI is sent for DNS
//! names (not for IP literals, per RFC 6066); ALPN offers `http/1.1` only.
//! The handshake gets its own `connect_timeout`, after the TCP connect's:
//! a black hole that accepts TCP and then says nothing is a link failure,
//! like a connect timeout. A certificate that does not verify is a service
//! failure ([`FetchError::Certificate`]): nothing is fetched, so nothing is
//! stored, and the client gets a 502.
//!
//! Browsers reach HTTPS sites through `CONNECT`, which needs no TLS here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::health::{Health, Outcome};
use crate::policy::{kernel_is_local, Host as PolicyHost, Policy};

/// Idle connections kept per upstream host.
pub const MAX_IDLE_PER_HOST: usize = 16;
/// Upstream hosts with idle connections kept.
pub const MAX_POOLED_HOSTS: usize = 256;

/// Body type of requests we send upstream.
pub type UpBody = BoxBody<Bytes, hyper::Error>;

/// URL scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `http`.
    Http,
    /// `https`: TLS to the upstream (see the module docs).
    Https,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Scheme.
    pub scheme: Scheme,
    /// Host (no brackets for IPv6).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Origin-form request target (`/path?query`).
    pub path_and_query: String,
    /// A client's forward-proxy request: the destination policy
    /// ([`crate::policy`]) judges every address the host resolves to before
    /// any connection, and the connection goes to a checked address. False
    /// for upstreams named in `rack.toml` (tile sources, probes).
    pub judged: bool,
}

/// A URL we cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UrlError {
    /// Not parseable as an absolute URI.
    #[error("not an absolute URL")]
    Malformed,
    /// Not http or https.
    #[error("unsupported scheme")]
    Scheme,
    /// No host.
    #[error("URL has no host")]
    NoHost,
}

impl Target {
    /// Parses an absolute `http://` or `https://` URL.
    ///
    /// # Errors
    /// See [`UrlError`].
    pub fn parse(url: &str) -> Result<Target, UrlError> {
        let uri: Uri = url.parse().map_err(|_| UrlError::Malformed)?;
        Target::from_uri(&uri)
    }

    /// From an absolute-form request URI.
    ///
    /// # Errors
    /// See [`UrlError`].
    pub fn from_uri(uri: &Uri) -> Result<Target, UrlError> {
        let scheme = match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("http") => Scheme::Http,
            Some(s) if s.eq_ignore_ascii_case("https") => Scheme::Https,
            Some(_) => return Err(UrlError::Scheme),
            None => return Err(UrlError::Malformed),
        };
        let host = uri.host().ok_or(UrlError::NoHost)?;
        if host.is_empty() {
            return Err(UrlError::NoHost);
        }
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let port = uri.port_u16().unwrap_or(match scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
        });
        let path_and_query = uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/".into());
        Ok(Target {
            scheme,
            host,
            port,
            path_and_query,
            judged: false,
        })
    }

    /// `host:port` (IPv6 bracketed), the health and pool key.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The `Host` header value (port omitted when default).
    pub fn host_header(&self) -> String {
        let default = matches!(
            (self.scheme, self.port),
            (Scheme::Http, 80) | (Scheme::Https, 443)
        );
        let h = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if default {
            h
        } else {
            format!("{h}:{}", self.port)
        }
    }

    /// The normalised absolute URL: the primary cache key.
    pub fn url(&self) -> String {
        let s = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        format!("{s}://{}{}", self.host_header(), self.path_and_query)
    }
}

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// Link health says not to try.
    #[error("backhaul is down")]
    Offline,
    /// DNS failed.
    #[error("cannot resolve {0}")]
    Dns(String),
    /// TCP connect timed out.
    #[error("connect to {0} timed out")]
    ConnectTimeout(String),
    /// TCP connect failed.
    #[error("connect to {0}: {1}")]
    Connect(String, std::io::Error),
    /// No response head in time.
    #[error("{0} sent no response in time")]
    ResponseTimeout(String),
    /// HTTP-level failure.
    #[error("upstream protocol error: {0}")]
    Protocol(#[from] hyper::Error),
    /// The TLS handshake did not finish within the connect timeout.
    #[error("TLS handshake with {0} timed out")]
    HandshakeTimeout(String),
    /// The upstream's certificate does not verify against the trusted roots
    /// (expired, wrong name, unknown issuer...). Never retried insecurely.
    #[error(
        "the TLS certificate of {authority} does not verify ({reason}); refusing it \
         (for a server with a private CA, add that CA to the proxy's extra trusted CAs)"
    )]
    Certificate {
        /// `host:port`.
        authority: String,
        /// What rustls objected to.
        reason: rustls::CertificateError,
    },
    /// Any other TLS failure (protocol error, alert, reset mid-handshake).
    #[error("TLS handshake with {0} failed: {1}")]
    Tls(String, std::io::Error),
    /// The host cannot be a TLS server name.
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    /// The destination policy refused the destination; nothing was sent.
    #[error("refused: {}", .0.explain())]
    Refused(crate::policy::Refusal),
}

impl FetchError {
    /// Whether this means the path is broken (vs the far end).
    pub fn is_link_failure(&self) -> bool {
        match self {
            FetchError::Offline
            | FetchError::Dns(_)
            | FetchError::ConnectTimeout(_)
            | FetchError::HandshakeTimeout(_)
            | FetchError::ResponseTimeout(_) => true,
            FetchError::Connect(_, e) => !matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
            ),
            _ => false,
        }
    }
}

/// Why the extra trusted CA certificates could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// The file could not be read or is not PEM.
    #[error("reading CA certificates from {path}: {source}")]
    Read {
        /// The PEM file.
        path: PathBuf,
        /// Cause.
        source: rustls::pki_types::pem::Error,
    },
    /// The file holds no `CERTIFICATE` block.
    #[error("{path} holds no PEM CERTIFICATE block")]
    NoCertificates {
        /// The PEM file.
        path: PathBuf,
    },
    /// A certificate is not a usable trust anchor.
    #[error("{path}: certificate {index} is not a usable CA: {source}")]
    BadCertificate {
        /// The PEM file.
        path: PathBuf,
        /// Position of the certificate in the file (0-based).
        index: usize,
        /// Cause.
        source: rustls::Error,
    },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The client TLS configuration: the `webpki-roots` (Mozilla) trust store
/// plus every certificate in `extra_ca_files` (PEM, any number of
/// `CERTIFICATE` blocks per file) as additional roots. Blocking (reads the
/// files); call it at startup or from `spawn_blocking`.
///
/// # Errors
/// See [`TlsConfigError`]: a file that cannot be read, holds no certificate
/// or holds an unusable one is an error, never silently skipped (an operator
/// who configured a CA expects it to be trusted).
pub fn tls_client_config(
    extra_ca_files: &[PathBuf],
) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for path in extra_ca_files {
        let read = |source| TlsConfigError::Read {
            path: path.clone(),
            source,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(read)?
            .collect::<Result<_, _>>()
            .map_err(read)?;
        if certs.is_empty() {
            return Err(TlsConfigError::NoCertificates { path: path.clone() });
        }
        for (index, cert) in certs.into_iter().enumerate() {
            roots
                .add(cert)
                .map_err(|source| TlsConfigError::BadCertificate {
                    path: path.clone(),
                    index,
                    source,
                })?;
        }
    }
    Ok(Arc::new(build_tls(roots)))
}

fn build_tls(roots: rustls::RootCertStore) -> rustls::ClientConfig {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the aws-lc-rs provider supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    // hyper speaks HTTP/1.1 only here.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg
}

/// The default configuration (webpki roots only), built once per process:
/// parsing ~150 roots per client would be wasted work.
fn default_tls() -> Arc<rustls::ClientConfig> {
    static DEFAULT: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    DEFAULT
        .get_or_init(|| {
            Arc::new(build_tls(rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            }))
        })
        .clone()
}

/// A pooled connection checked out for one exchange; give it back with
/// [`Client::release`] once the response body is fully read.
pub struct Conn {
    /// Pool key: scheme and authority (a plain and a TLS connection to the
    /// same `host:port` are not interchangeable).
    key: String,
    sender: SendRequest<UpBody>,
}

/// The client.
#[derive(Clone)]
pub struct Client {
    pool: Arc<Mutex<HashMap<String, Vec<SendRequest<UpBody>>>>>,
    /// Judges the destinations of clients' forward-proxy requests.
    policy: Arc<Policy>,
    health: Health,
    connect_timeout: Duration,
    response_timeout: Duration,
    /// Trust for `https://` upstreams; replaceable at run time (the agent
    /// loads the operator's extra CAs after the engine is built).
    tls: Arc<RwLock<Arc<rustls::ClientConfig>>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

impl Client {
    /// A client reporting to `health`, trusting the `webpki-roots` only
    /// (see [`Client::set_tls`]).
    pub fn new(
        health: Health,
        connect_timeout: Duration,
        response_timeout: Duration,
        policy: Arc<Policy>,
    ) -> Client {
        Client {
            pool: Arc::default(),
            policy,
            health,
            connect_timeout,
            response_timeout,
            tls: Arc::new(RwLock::new(default_tls())),
        }
    }

    /// Replaces the TLS configuration (from [`tls_client_config`]) for new
    /// connections, and drops idle pooled TLS connections made under the old
    /// one. Every clone of this client shares the change.
    pub fn set_tls(&self, config: Arc<rustls::ClientConfig>) {
        *self.tls.write().expect("lock") = config;
        self.pool
            .lock()
            .expect("lock")
            .retain(|k, _| !k.contains("https://"));
    }

    /// Loads `extra_ca_files` (see [`tls_client_config`]) and trusts them
    /// from now on, besides the webpki roots. Blocking (reads the files).
    ///
    /// # Errors
    /// See [`TlsConfigError`]; on error the trust in force is unchanged.
    pub fn trust_extra_cas(&self, extra_ca_files: &[PathBuf]) -> Result<(), TlsConfigError> {
        self.set_tls(tls_client_config(extra_ca_files)?);
        Ok(())
    }

    /// The destination policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Resolves `host` (within the connect timeout) and checks every
    /// address against the destination policy: the addresses to connect to.
    ///
    /// # Errors
    /// [`FetchError::Refused`], or DNS errors.
    pub async fn resolve_checked(
        &self,
        host: &str,
        port: u16,
    ) -> Result<Vec<SocketAddr>, FetchError> {
        let addrs = match Policy::parse_host(host).map_err(FetchError::Refused)? {
            PolicyHost::Ip(ip) => vec![SocketAddr::new(ip, port)],
            PolicyHost::Name(name) => {
                let lookup = tokio::net::lookup_host((name.as_str(), port));
                match tokio::time::timeout(self.connect_timeout, lookup).await {
                    Ok(Ok(a)) => a.collect(),
                    Ok(Err(_)) => return Err(FetchError::Dns(host.to_string())),
                    Err(_) => return Err(FetchError::ConnectTimeout(format!("{host}:{port}"))),
                }
            }
        };
        if addrs.is_empty() {
            return Err(FetchError::Dns(host.to_string()));
        }
        self.policy
            .check(&addrs, &kernel_is_local)
            .map_err(FetchError::Refused)?;
        Ok(addrs)
    }

    /// Opens a TCP connection with the connect timeout, reporting link
    /// failures to health. `judged`: a client's destination, checked by the
    /// destination policy and connected to at a checked address only.
    ///
    /// # Errors
    /// [`FetchError::Refused`], DNS, timeout or connect errors.
    pub async fn connect_tcp(
        &self,
        host: &str,
        port: u16,
        judged: bool,
    ) -> Result<TcpStream, FetchError> {
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let r = if judged {
            match self.resolve_checked(host, port).await {
                Ok(addrs) => connect_addrs(&addrs, &authority, self.connect_timeout).await,
                Err(e) => Err(e),
            }
        } else {
            connect_tcp(host, port, self.connect_timeout).await
        };
        match &r {
            Ok(_) => self.health.record(&authority, Outcome::Connected),
            Err(FetchError::Refused(_)) => {}
            Err(e) if e.is_link_failure() => self.health.record(&authority, Outcome::LinkFailure),
            Err(_) => self.health.record(&authority, Outcome::ServiceFailure),
        }
        r
    }

    /// Opens a TCP connection and completes a TLS handshake with `target`
    /// (SNI and certificate checked against `target.host`), each step within
    /// the connect timeout, reporting to health: a handshake timeout is a
    /// link failure, a refused certificate a service failure.
    ///
    /// # Errors
    /// TCP errors as [`Client::connect_tcp`], then
    /// [`FetchError::HandshakeTimeout`], [`FetchError::Certificate`],
    /// [`FetchError::Tls`] or [`FetchError::ServerName`].
    pub async fn connect_tls(&self, target: &Target) -> Result<TlsStream<TcpStream>, FetchError> {
        let authority = target.authority();
        let name = ServerName::try_from(target.host.clone())
            .map_err(|_| FetchError::ServerName(target.host.clone()))?;
        let tcp = self
            .connect_tcp(&target.host, target.port, target.judged)
            .await?;
        let config = self.tls.read().expect("lock").clone();
        let r = tls_handshake(config, name, tcp, self.connect_timeout, &authority).await;
        match &r {
            Ok(_) => {}
            Err(e) if e.is_link_failure() => self.health.record(&authority, Outcome::LinkFailure),
            Err(e) => {
                if matches!(e, FetchError::Certificate { .. }) {
                    tracing::warn!(
                        event = "upstream_certificate_refused",
                        upstream = %authority,
                        error = %e,
                        "refused an upstream TLS certificate"
                    );
                }
                self.health.record(&authority, Outcome::ServiceFailure);
            }
        }
        r
    }

    fn checkout(&self, key: &str) -> Option<SendRequest<UpBody>> {
        let mut pool = self.pool.lock().expect("lock");
        let conns = pool.get_mut(key)?;
        while let Some(s) = conns.pop() {
            if s.is_ready() && !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    async fn handshake_http<I>(&self, io: I) -> Result<SendRequest<UpBody>, FetchError>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Sends `req` (origin-form URI, headers final) to `target`, over TLS
    /// for `https://`. Fails fast with [`FetchError::Offline`] when health
    /// says the host is unusable.
    ///
    /// # Errors
    /// See [`FetchError`].
    pub async fn send(
        &self,
        target: &Target,
        req: Request<UpBody>,
    ) -> Result<(Response<hyper::body::Incoming>, Conn), FetchError> {
        let key = target.authority();
        if !self.health.host_usable(&key) {
            return Err(FetchError::Offline);
        }
        let pool_key = pool_key(target);
        let mut sender = match self.checkout(&pool_key) {
            Some(s) => s,
            None => match target.scheme {
                Scheme::Http => {
                    let stream = self
                        .connect_tcp(&target.host, target.port, target.judged)
                        .await?;
                    self.handshake_http(stream).await?
                }
                Scheme::Https => {
                    let stream = self.connect_tls(target).await?;
                    self.handshake_http(stream).await?
                }
            },
        };
        let resp = match tokio::time::timeout(self.response_timeout, sender.send_request(req)).await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.health.record(&key, Outcome::ServiceFailure);
                return Err(FetchError::Protocol(e));
            }
            Err(_) => {
                self.health.record(&key, Outcome::LinkFailure);
                return Err(FetchError::ResponseTimeout(key));
            }
        };
        self.health.record(&key, Outcome::Success);
        Ok((
            resp,
            Conn {
                key: pool_key,
                sender,
            },
        ))
    }

    /// Returns a connection to the pool (its last response fully read).
    pub fn release(&self, conn: Conn) {
        if conn.sender.is_closed() {
            return;
        }
        let mut pool = self.pool.lock().expect("lock");
        if pool.len() >= MAX_POOLED_HOSTS && !pool.contains_key(&conn.key) {
            return;
        }
        let v = pool.entry(conn.key).or_default();
        if v.len() < MAX_IDLE_PER_HOST {
            v.push(conn.sender);
        }
    }

    /// A link probe: GET `target` (`http://` or `https://`, certificate
    /// checked) and wait for the response head (any status: the far end
    /// answered), all within `timeout`; the time to the head when it came.
    /// Does not report to health (the prober decides what a round means)
    /// and uses no pooled connection (a probe must prove the path works
    /// now). A judged target (a client's destination being re-probed) is
    /// connected to at a policy-checked address only.
    pub async fn probe(&self, target: &Target, timeout: Duration) -> Option<Duration> {
        let start = tokio::time::Instant::now();
        let fut = async {
            let tcp = if target.judged {
                let addrs = self.resolve_checked(&target.host, target.port).await.ok()?;
                connect_addrs(&addrs, &target.authority(), timeout)
                    .await
                    .ok()?
            } else {
                connect_tcp(&target.host, target.port, timeout).await.ok()?
            };
            let mut sender = match target.scheme {
                Scheme::Http => self.handshake_http(tcp).await.ok()?,
                Scheme::Https => {
                    let name = ServerName::try_from(target.host.clone()).ok()?;
                    let config = self.tls.read().expect("lock").clone();
                    let authority = target.authority();
                    match tls_handshake(config, name, tcp, timeout, &authority).await {
                        Ok(s) => self.handshake_http(s).await.ok()?,
                        // The far end answered with a certificate: the link
                        // carries bytes both ways. Whether that origin is
                        // trusted is for requests to decide, not the link.
                        Err(FetchError::Certificate { .. }) => return Some(()),
                        Err(_) => return None,
                    }
                }
            };
            let req = Request::builder()
                .method(hyper::Method::GET)
                .uri(&target.path_and_query)
                .header(hyper::header::HOST, target.host_header())
                .header(hyper::header::USER_AGENT, "fieldrack-probe")
                .body(http_body_util::Empty::new().map_err(|e| match e {}).boxed())
                .ok()?;
            sender.send_request(req).await.ok().map(|_| ())
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(Some(_)) => Some(start.elapsed()),
            _ => None,
        }
    }
}

/// The pool key of a target: scheme and authority, and whether it was
/// judged (a connection made for a trusted upstream by name was never
/// checked, so a client's request must not reuse it).
fn pool_key(target: &Target) -> String {
    let s = match target.scheme {
        Scheme::Http => "http",
        Scheme::Https => "https",
    };
    let j = if target.judged { "judged+" } else { "" };
    format!("{j}{s}://{}", target.authority())
}

/// One TLS handshake within `timeout`, errors classified.
async fn tls_handshake(
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    tcp: TcpStream,
    timeout: Duration,
    authority: &str,
) -> Result<TlsStream<TcpStream>, FetchError> {
    let connector = TlsConnector::from(config);
    match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(classify_tls_error(authority, e)),
        Err(_) => Err(FetchError::HandshakeTimeout(authority.to_string())),
    }
}

fn classify_tls_error(authority: &str, e: std::io::Error) -> FetchError {
    let cert = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|r| match r {
            rustls::Error::InvalidCertificate(c) => Some(c.clone()),
            _ => None,
        });
    match cert {
        Some(reason) => FetchError::Certificate {
            authority: authority.to_string(),
            reason,
        },
        None => FetchError::Tls(authority.to_string(), e),
    }
}

impl crate::ProxyHandle {
    /// Trusts the CA certificates in `pem_files` (besides the webpki roots)
    /// for `https://` upstreams from now on: a relief agency's own tile
    /// server behind a private CA. The agent calls this at startup with the
    /// configured files (until `rack.toml` carries the list itself). Blocking
    /// (reads the files).
    ///
    /// # Errors
    /// See [`TlsConfigError`]; on error the trust in force is unchanged.
    pub fn trust_upstream_cas(&self, pem_files: &[PathBuf]) -> Result<(), TlsConfigError> {
        self.engine.client.trust_extra_cas(pem_files)
    }
}

/// Connects to the first of `addrs` that answers, within one timeout.
///
/// # Errors
/// Timeout or connect errors.
pub async fn connect_addrs(
    addrs: &[SocketAddr],
    authority: &str,
    timeout: Duration,
) -> Result<TcpStream, FetchError> {
    let fut = async {
        let mut last = None;
        for a in addrs {
            match TcpStream::connect(a).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) => FetchError::Connect(authority.to_string(), e),
            None => FetchError::Dns(authority.to_string()),
        })
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(FetchError::ConnectTimeout(authority.to_string())),
    }
}

/// Resolves and connects with one overall timeout.
///
/// # Errors
/// DNS, timeout or connect errors.
pub async fn connect_tcp(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, FetchError> {
    let authority = format!("{host}:{port}");
    let deadline = tokio::time::Instant::now() + timeout;
    let addrs: Vec<SocketAddr> =
        match tokio::time::timeout_at(deadline, tokio::net::lookup_host((host, port))).await {
            Ok(Ok(addrs)) => addrs.collect(),
            Ok(Err(_)) => return Err(FetchError::Dns(host.to_string())),
            Err(_) => return Err(FetchError::ConnectTimeout(authority)),
        };
    if addrs.is_empty() {
        return Err(FetchError::Dns(host.to_string()));
    }
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    connect_addrs(&addrs, &authority, left).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = Target::parse("http://Example.org/a?b=1").unwrap();
        assert_eq!(t.authority(), "example.org:80");
        assert_eq!(t.url(), "http://example.org/a?b=1");
        let t = Target::parse("http://[::1]:8080").unwrap();
        assert_eq!(t.authority(), "[::1]:8080");
        assert_eq!(t.path_and_query, "/");
        assert_eq!(t.host_header(), "[::1]:8080");
        assert!(Target::parse("ftp://x/").is_err());
        assert!(Target::parse("/relative").is_err());
    }
}
