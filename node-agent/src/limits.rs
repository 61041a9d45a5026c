//! File descriptors: the open-file limit, raised at start, and each
//! listener's share of it.
//!
//! Every accepted TCP connection costs a descriptor, and so does every
//! file the agent itself opens (sled, chunk packs, the cache's SQLite and
//! packs, volume images, appliance pipes). When a flood of connections to
//! one listener reaches the process's limit, `accept` fails with `EMFILE`
//! for every listener and the agent cannot open its own files either. So
//! the soft limit is raised to the hard limit at start, a fixed reserve is
//! kept for the agent's own files, and each listener's connection cap is a
//! share of the rest: a flood of one listener hits its own cap, never the
//! process limit.

use std::sync::OnceLock;

/// Descriptors kept for the agent's own files and sockets (stores, packs,
/// SQLite, images, appliance pipes, the mesh's UDP socket, logs), never
/// handed to listeners. A rack holds a few dozen volumes and appliances;
/// this leaves an order of magnitude of room.
pub const RESERVED_FDS: u64 = 512;

/// Most admin API connections waiting to present a request with a valid
/// token, whatever the limit: the API serves operators and scrapers.
pub const MAX_API_HANDSHAKES: usize = 256;
/// Fewest such slots, however low the limit: enough that shedding the
/// oldest always leaves a fresh client time to send its request.
pub const MIN_API_HANDSHAKES: usize = 16;
/// Most authenticated admin API connections: a few operators' CLIs, a
/// scraper and the streaming import/export jobs they started.
pub const MAX_API_AUTHENTICATED: usize = 64;
/// Fewest authenticated API connections, however low the limit.
pub const MIN_API_AUTHENTICATED: usize = 8;
/// Most proxy client connections, whatever the limit: tens of relief
/// workers' phones and laptops per rack, each with a browser's handful
/// of connections, with ample room.
pub const MAX_PROXY_CONNECTIONS: usize = 16_384;
/// Fewest proxy client connections, however low the limit.
pub const MIN_PROXY_CONNECTIONS: usize = 32;

/// The open-file limit before and after [`raise_fd_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit the process started with.
    pub before: u64,
    /// The soft limit now.
    pub after: u64,
    /// The hard limit (the most an unprivileged process may set).
    pub hard: u64,
}

/// How the descriptors left after [`RESERVED_FDS`] are shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FdBudget {
    /// The soft open-file limit the budget was derived from.
    pub limit: u64,
    /// Admin API connections that have not yet sent an authorized request
    /// (the oldest is shed when a new one arrives and these are full).
    pub api_handshakes: usize,
    /// Admin API connections that sent a request with a valid token.
    pub api_authenticated: usize,
    /// Caching proxy client connections. Each may hold a second descriptor
    /// for its upstream connection, so this is counted twice.
    pub proxy_connections: usize,
}

impl FdBudget {
    /// The budget for a soft limit of `limit` descriptors: the API gets a
    /// sixteenth (handshakes) and a sixty-fourth (authenticated) of what is
    /// left after the reserve, within their bounds; the proxy three
    /// quarters of the remainder, halved (client + upstream); a quarter
    /// stays free for everything that is not a listener.
    pub fn for_limit(limit: u64) -> Self {
        let free = usize::try_from(limit.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
        let api_handshakes = (free / 16).clamp(MIN_API_HANDSHAKES, MAX_API_HANDSHAKES);
        let api_authenticated = (free / 64).clamp(MIN_API_AUTHENTICATED, MAX_API_AUTHENTICATED);
        let rest = free.saturating_sub(api_handshakes + api_authenticated);
        let proxy_connections =
            (rest / 4 * 3 / 2).clamp(MIN_PROXY_CONNECTIONS, MAX_PROXY_CONNECTIONS);
        Self {
            limit,
            api_handshakes,
            api_authenticated,
            proxy_connections,
        }
    }

    /// Descriptors the listeners may hold at most, all caps reached.
    pub fn listeners_total(&self) -> u64 {
        (self.api_handshakes + self.api_authenticated + 2 * self.proxy_connections) as u64
    }
}

/// Why the limit could not be read or raised.
#[derive(Debug, thiserror::Error)]
#[error("RLIMIT_NOFILE: {0}")]
pub struct FdLimitError(#[from] nix::Error);

/// Raise the soft open-file limit to the hard limit (once per process;
/// later calls return the first result).
///
/// # Errors
/// [`FdLimitError`] if the limit cannot be read or set.
pub fn raise_fd_limit() -> Result<FdLimit, FdLimitError> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (before, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if before < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    let (after, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok(FdLimit {
        before,
        after,
        hard,
    })
}

/// The budget for this process's current soft limit, computed once (call
/// [`raise_fd_limit`] first). Used by the agent for the API and the proxy.
pub fn fd_budget() -> FdBudget {
    static BUDGET: OnceLock<FdBudget> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024);
        FdBudget::for_limit(limit)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn budgets_for_common_limits() {
        // Table: soft limit -> (api handshakes, api authenticated, proxy).
        let table = [
            (256, (16, 8, 32)),
            (1_024, (32, 8, 177)),
            (20_000, (256, 64, 7_188)),
            (1 << 20, (256, 64, 16_384)),
        ];
        for (limit, (h, a, p)) in table {
            let b = FdBudget::for_limit(limit);
            assert_eq!(
                (b.api_handshakes, b.api_authenticated, b.proxy_connections),
                (h, a, p),
                "limit {limit}"
            );
        }
    }

    proptest! {
        /// Above the minimums, the listeners together never reach the
        /// limit: a flood of one listener cannot starve another or the
        /// agent's own files.
        #[test]
        fn listeners_stay_within_the_limit(limit in 0u64..(1 << 24)) {
            let b = FdBudget::for_limit(limit);
            prop_assert!(b.api_handshakes >= MIN_API_HANDSHAKES);
            prop_assert!(b.proxy_connections <= MAX_PROXY_CONNECTIONS);
            let floor = (MIN_API_HANDSHAKES + MIN_API_AUTHENTICATED + 2 * MIN_PROXY_CONNECTIONS) as u64;
            if limit >= RESERVED_FDS + 4 * floor {
                prop_assert!(RESERVED_FDS + b.listeners_total() < limit, "{b:?}");
            }
        }
    }

    #[test]
    fn raising_is_idempotent() {
        let first = raise_fd_limit().unwrap();
        assert_eq!(first.after, first.hard);
        let again = raise_fd_limit().unwrap();
        assert_eq!(again.before, again.after);
    }
}
