//! TLS for bulk connections: the rack's libp2p identity, exactly as on the
//! mesh. `libp2p_tls` builds rustls configs whose self-signed certificate
//! carries the libp2p extension (the identity key signing the TLS key);
//! its verifiers accept a peer only if that extension verifies, so the
//! remote PeerId read from the certificate is authenticated. Fleet
//! membership is not a TLS matter: the plane checks the PeerId against
//! the mesh's admitted set before anything else.

use std::sync::Arc;

use libp2p::identity::Keypair;
use libp2p::PeerId;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::rustls::pki_types::CertificateDer;

/// The server name a client dials with: unused (the certificate is checked
/// against the expected PeerId, not a name), as on libp2p-quic.
pub const SERVER_NAME: &str = "l";

/// Why the TLS configs could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// libp2p-tls could not build a certificate for the identity.
    #[error("building the libp2p TLS certificate: {0}")]
    Certificate(#[from] libp2p_tls::certificate::GenError),
    /// The rustls config has no TLS 1.3 suite QUIC can use.
    #[error("the TLS config does not suit QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// Server crypto for the bulk endpoint.
///
/// # Errors
/// [`TlsError`].
pub fn server(keypair: &Keypair) -> Result<Arc<QuicServerConfig>, TlsError> {
    let tls = libp2p_tls::make_server_config(keypair)?;
    Ok(Arc::new(QuicServerConfig::try_from(tls)?))
}

/// Client crypto for dialling `peer`: the handshake fails unless the
/// server proves it holds `peer`'s identity key.
///
/// # Errors
/// [`TlsError`].
pub fn client(keypair: &Keypair, peer: PeerId) -> Result<Arc<QuicClientConfig>, TlsError> {
    let tls = libp2p_tls::make_client_config(keypair, Some(peer))?;
    Ok(Arc::new(QuicClientConfig::try_from(tls)?))
}

/// The authenticated PeerId of an established connection: from the
/// certificate the handshake verified. None if there is none (cannot
/// happen with our configs, which require client certificates).
#[must_use]
pub fn remote_peer(conn: &quinn::Connection) -> Option<PeerId> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let leaf = chain.first()?;
    libp2p_tls::certificate::parse(leaf)
        .ok()
        .map(|c| c.peer_id())
}
