//! Volume names as operators type them (sizes: `deploy::appliance::parse_size`).

/// Longest volume name. Names become file names and appear in status JSON
/// and logs; 64 characters is plenty and keeps them readable.
pub const MAX_NAME_LEN: usize = 64;

/// Why a volume name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// Empty name.
    #[error("volume name is empty")]
    Empty,
    /// Longer than [`MAX_NAME_LEN`].
    #[error("volume name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    /// A character outside `[a-z0-9-]`.
    #[error("volume name may only contain a-z, 0-9 and '-' (found {0:?})")]
    BadChar(char),
}

/// Check a volume name: 1 to 64 characters from `[a-z0-9-]`. The charset
/// makes names safe as file names and unambiguous in keys (no separators).
///
/// # Errors
/// [`NameError`].
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    match name
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-'))
    {
        Some(c) => Err(NameError::BadChar(c)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("web-01").is_ok());
        assert!(validate_name(&"a".repeat(64)).is_ok());
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert_eq!(validate_name(&"a".repeat(65)), Err(NameError::TooLong));
        assert_eq!(validate_name("Web"), Err(NameError::BadChar('W')));
        assert_eq!(validate_name("a/b"), Err(NameError::BadChar('/')));
        assert_eq!(validate_name("a.img"), Err(NameError::BadChar('.')));
        assert_eq!(validate_name("é"), Err(NameError::BadChar('é')));
    }
}
