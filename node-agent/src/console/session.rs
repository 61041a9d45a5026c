//! Console sessions, sans-IO: who logged in, with which role, until when,
//! and the per-session token that state-changing requests must echo
//! (CSRF). Time and randomness are passed in, so the table is tested
//! without a clock.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Sessions held at once. A rack has a handful of operators; past this the
/// session closest to expiry is dropped, so a flood of logins costs a
/// bounded table, never memory without end.
pub const MAX_SESSIONS: usize = 256;
/// How long a login lasts: one relief shift.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// What a session may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Sees everything and may start, stop and move appliances.
    Operator,
    /// Sees everything, changes nothing.
    Viewer,
}

/// One logged-in browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Its role.
    pub role: Role,
    /// The token its state-changing requests carry in `X-CSRF-Token`.
    pub csrf: String,
    /// When it ends.
    pub expires: Instant,
}

/// The session table.
#[derive(Debug, Default)]
pub struct Sessions {
    by_id: HashMap<String, Session>,
}

/// 256 random bits as hex.
pub fn random_token(bytes: [u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Sessions {
    /// A new session; returns its id (the cookie value). `id` and `csrf`
    /// are 32 random bytes each, from the caller's RNG.
    pub fn create(
        &mut self,
        role: Role,
        now: Instant,
        id: [u8; 32],
        csrf: [u8; 32],
    ) -> (String, Session) {
        self.by_id.retain(|_, s| s.expires > now);
        if self.by_id.len() >= MAX_SESSIONS {
            if let Some(oldest) = self
                .by_id
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
            {
                self.by_id.remove(&oldest);
            }
        }
        let s = Session {
            role,
            csrf: random_token(csrf),
            expires: now + SESSION_TTL,
        };
        let id = random_token(id);
        self.by_id.insert(id.clone(), s.clone());
        (id, s)
    }

    /// The live session with this id (an expired one is removed).
    pub fn get(&mut self, id: &str, now: Instant) -> Option<Session> {
        match self.by_id.get(id) {
            Some(s) if s.expires > now => Some(s.clone()),
            Some(_) => {
                self.by_id.remove(id);
                None
            }
            None => None,
        }
    }

    /// Ends a session (logout).
    pub fn remove(&mut self, id: &str) {
        self.by_id.remove(id);
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// No sessions.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sessions_expire_and_log_out() {
        let t0 = Instant::now();
        let mut s = Sessions::default();
        let (id, sess) = s.create(Role::Viewer, t0, [1; 32], [2; 32]);
        assert_eq!(id.len(), 64);
        assert_ne!(sess.csrf, id);
        assert_eq!(s.get(&id, t0 + SESSION_TTL / 2).unwrap().role, Role::Viewer);
        assert!(s.get(&id, t0 + SESSION_TTL).is_none(), "expired at the TTL");
        assert!(s.is_empty(), "an expired session is dropped when seen");
        let (id, _) = s.create(Role::Operator, t0, [3; 32], [4; 32]);
        s.remove(&id);
        assert!(s.get(&id, t0).is_none());
        assert!(s.get("nope", t0).is_none());
    }

    proptest! {
        /// However many logins arrive, the table stays bounded and the
        /// newest login always works.
        #[test]
        fn the_table_is_bounded(n in 1usize..600, step_ms in 0u64..5000) {
            let t0 = Instant::now();
            let mut s = Sessions::default();
            let mut last = String::new();
            for i in 0..n {
                let mut id = [0u8; 32];
                id[..8].copy_from_slice(&(i as u64).to_le_bytes());
                let now = t0 + Duration::from_millis(step_ms * i as u64);
                last = s.create(Role::Operator, now, id, [9; 32]).0;
                prop_assert!(s.len() <= MAX_SESSIONS);
            }
            let end = t0 + Duration::from_millis(step_ms * (n as u64 - 1));
            prop_assert!(s.get(&last, end).is_some());
        }
    }
}
