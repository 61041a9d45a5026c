//! The typed header every bulk stream starts with: which protocol the
//! stream speaks. One QUIC connection per peer pair carries the streams of
//! every bulk protocol; the header is what libp2p's multistream-select does
//! on the mesh, in two bytes plus the name and without a negotiation round
//! trip (the opener knows the protocol is served: it is in the registry).
//!
//! Layout: `[version: u8 = 1][len: u8][protocol name: len bytes, UTF-8]`.

use futures::{AsyncRead, AsyncReadExt};

/// The header's format version; a different one is refused (a newer rack
/// must keep speaking version 1 to older ones, or bump and fall back).
pub const HEADER_VERSION: u8 = 1;

/// Longest protocol name: ours are about 30 bytes; the bound keeps a peer
/// from making us read (or allocate) more before it is routed.
pub const MAX_PROTOCOL_LEN: usize = 64;

/// Why a stream header could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The stream ended or failed before the header was complete.
    #[error("reading the stream header: {0}")]
    Io(#[from] std::io::Error),
    /// Unknown header version.
    #[error("unsupported stream header version {0}")]
    Version(u8),
    /// Empty or longer than [`MAX_PROTOCOL_LEN`].
    #[error("protocol name of {0} bytes (1..={MAX_PROTOCOL_LEN} allowed)")]
    Length(usize),
    /// The name is not UTF-8.
    #[error("protocol name is not UTF-8")]
    Utf8,
}

/// Why a header could not be built.
#[derive(Debug, thiserror::Error)]
#[error("protocol name {name:?} is empty or longer than {MAX_PROTOCOL_LEN} bytes")]
pub struct NameError {
    /// The refused name.
    pub name: String,
}

/// The bytes of the header naming `protocol`.
///
/// # Errors
/// [`NameError`] if the name is empty or too long.
pub fn encode(protocol: &str) -> Result<Vec<u8>, NameError> {
    let len = protocol.len();
    if len == 0 || len > MAX_PROTOCOL_LEN {
        return Err(NameError {
            name: protocol.to_owned(),
        });
    }
    let mut out = Vec::with_capacity(2 + len);
    out.push(HEADER_VERSION);
    out.push(u8::try_from(len).expect("bounded by MAX_PROTOCOL_LEN"));
    out.extend_from_slice(protocol.as_bytes());
    Ok(out)
}

/// Read a header: the protocol name the stream speaks. Reads exactly the
/// header's bytes, so what follows is the protocol's own.
///
/// # Errors
/// [`HeaderError`].
///
/// Not cancel-safe (bytes read are lost): callers time the whole read out
/// and drop the stream.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<String, HeaderError> {
    let mut head = [0u8; 2];
    r.read_exact(&mut head).await?;
    if head[0] != HEADER_VERSION {
        return Err(HeaderError::Version(head[0]));
    }
    let len = usize::from(head[1]);
    if len == 0 || len > MAX_PROTOCOL_LEN {
        return Err(HeaderError::Length(len));
    }
    let mut name = vec![0u8; len];
    r.read_exact(&mut name).await?;
    String::from_utf8(name).map_err(|_| HeaderError::Utf8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn read_sync(bytes: &[u8]) -> Result<String, HeaderError> {
        futures::executor::block_on(read(&mut futures::io::Cursor::new(bytes)))
    }

    #[test]
    fn round_trip_leaves_the_payload() {
        let mut bytes = encode("/fieldrack/volume-push/1").unwrap();
        bytes.extend_from_slice(b"payload");
        let mut cur = futures::io::Cursor::new(&bytes[..]);
        let name = futures::executor::block_on(read(&mut cur)).unwrap();
        assert_eq!(name, "/fieldrack/volume-push/1");
        let mut rest = Vec::new();
        futures::executor::block_on(cur.read_to_end(&mut rest)).unwrap();
        assert_eq!(rest, b"payload");
    }

    #[test]
    fn refuses_bad_headers() {
        assert!(matches!(
            read_sync(&[2, 1, b'a']),
            Err(HeaderError::Version(2))
        ));
        assert!(matches!(read_sync(&[1, 0]), Err(HeaderError::Length(0))));
        assert!(matches!(read_sync(&[1, 65]), Err(HeaderError::Length(65))));
        assert!(matches!(
            read_sync(&[1, 2, 0xff, 0xfe]),
            Err(HeaderError::Utf8)
        ));
        assert!(matches!(read_sync(&[1, 5, b'a']), Err(HeaderError::Io(_))));
        assert!(matches!(read_sync(&[]), Err(HeaderError::Io(_))));
    }

    #[test]
    fn refuses_bad_names() {
        assert!(encode("").is_err());
        assert!(encode(&"x".repeat(MAX_PROTOCOL_LEN + 1)).is_err());
        assert!(encode(&"x".repeat(MAX_PROTOCOL_LEN)).is_ok());
    }

    proptest! {
        #[test]
        fn any_valid_name_round_trips(name in "[ -~]{1,64}") {
            let bytes = encode(&name).unwrap();
            prop_assert_eq!(read_sync(&bytes).unwrap(), name);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = read_sync(&bytes);
        }
    }
}
