//! Who may log in to the console: the rack's API token (operator), or a
//! password set at provisioning (`[console]` in `rack.toml`: an operator
//! and an optional read-only viewer password).
//!
//! Passwords are kept as `blake3:<salt hex>:<hash hex>`, the hash being
//! BLAKE3 keyed-derivation of the password with the salt
//! (`blake3::derive_key` with a fixed context over `salt || password`).
//! BLAKE3 is fast, so this is no defence against offline guessing of a weak
//! password if `rack.toml` leaks; it keeps the clear password out of the
//! file, and comparisons are constant-time. `fieldrack console
//! hash-password` prints a line for `rack.toml`.

use super::session::Role;

/// The BLAKE3 derivation context of console passwords.
const CONTEXT: &str = "fieldrack console password v1";

/// The credentials a rack accepts.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The API token (operator).
    pub api_token: String,
    /// Operator password hash, if set.
    pub operator_password: Option<String>,
    /// Viewer password hash, if set.
    pub viewer_password: Option<String>,
}

/// Hashes `password` with `salt` in the stored form.
pub fn hash_password(password: &str, salt: [u8; 16]) -> String {
    let mut input = salt.to_vec();
    input.extend_from_slice(password.as_bytes());
    let h = blake3::derive_key(CONTEXT, &input);
    format!("blake3:{}:{}", hex(&salt), hex(&h))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Whether `stored` (the `blake3:salt:hash` form) is well formed.
pub fn valid_hash(stored: &str) -> bool {
    parse(stored).is_some()
}

fn parse(stored: &str) -> Option<([u8; 16], Vec<u8>)> {
    let mut parts = stored.split(':');
    let (Some("blake3"), Some(salt), Some(hash), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let salt: [u8; 16] = unhex(salt)?.try_into().ok()?;
    let hash = unhex(hash)?;
    (hash.len() == 32).then_some((salt, hash))
}

/// Constant-time equality (length is not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn password_matches(given: &str, stored: &str) -> bool {
    let Some((salt, want)) = parse(stored) else {
        return false;
    };
    let mut input = salt.to_vec();
    input.extend_from_slice(given.as_bytes());
    ct_eq(&blake3::derive_key(CONTEXT, &input), &want)
}

impl Credentials {
    /// The role `secret` logs in as, if any. Every credential is checked
    /// (no early return), so timing does not tell which one matched.
    pub fn check(&self, secret: &str) -> Option<Role> {
        let token = ct_eq(secret.as_bytes(), self.api_token.as_bytes());
        let op = self
            .operator_password
            .as_deref()
            .is_some_and(|h| password_matches(secret, h));
        let viewer = self
            .viewer_password
            .as_deref()
            .is_some_and(|h| password_matches(secret, h));
        if token || op {
            Some(Role::Operator)
        } else if viewer {
            Some(Role::Viewer)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_credential_logs_in_with_its_role() {
        let c = Credentials {
            api_token: "tok-123".into(),
            operator_password: Some(hash_password("op pass", [7; 16])),
            viewer_password: Some(hash_password("look only", [8; 16])),
        };
        let table = [
            ("tok-123", Some(Role::Operator)),
            ("op pass", Some(Role::Operator)),
            ("look only", Some(Role::Viewer)),
            ("tok-12", None),
            ("", None),
            ("look only ", None),
        ];
        for (secret, want) in table {
            assert_eq!(c.check(secret), want, "{secret:?}");
        }
        let none = Credentials {
            api_token: "t".into(),
            operator_password: None,
            viewer_password: Some("garbage".into()),
        };
        assert_eq!(none.check("garbage"), None);
    }

    #[test]
    fn the_stored_form_is_salted_and_checked() {
        let a = hash_password("pw", [1; 16]);
        let b = hash_password("pw", [2; 16]);
        assert_ne!(a, b, "the salt changes the hash");
        assert!(valid_hash(&a));
        assert!(a.starts_with("blake3:") && a.len() == 7 + 32 + 1 + 64);
        for bad in [
            "",
            "blake3:00:00",
            "sha1:x:y",
            &a[..a.len() - 1],
            &format!("{a}:x"),
        ] {
            assert!(!valid_hash(bad), "{bad}");
        }
    }
}
