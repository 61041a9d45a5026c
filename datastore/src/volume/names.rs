//! Volume names and sizes as operators type them.

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

/// Why a size string is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SizeError {
    /// Not `<digits>[K|M|G|T][i][B]`.
    #[error("size {0:?} is not a number with an optional K, M, G or T suffix")]
    Syntax(String),
    /// Does not fit in 64 bits.
    #[error("size {0:?} is too large")]
    Overflow(String),
}

/// Parse a size as operators write it: `4G`, `64M`, `512K`, `1T`, `4096`;
/// suffixes are binary (K = 1024) and may be followed by `i` and/or `B`
/// (`4GiB`, `4GB`); case-insensitive.
///
/// # Errors
/// [`SizeError`].
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(SizeError::Syntax(s.to_owned()));
    }
    let suffix = suffix.trim().to_ascii_lowercase();
    let suffix = suffix.strip_suffix('b').unwrap_or(&suffix);
    let suffix = suffix.strip_suffix('i').unwrap_or(suffix);
    let shift = match suffix {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(SizeError::Syntax(s.to_owned())),
    };
    let n: u64 = num.parse().map_err(|_| SizeError::Overflow(s.to_owned()))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(s.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("4 GB"), Ok(4 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 8B "), Ok(8));
        for bad in ["", "G", "4X", "4.5G", "-4G", "4GG", "4iG"] {
            assert!(
                matches!(parse_size(bad), Err(SizeError::Syntax(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("20000000T"),
            Err(SizeError::Overflow(_))
        ));
    }

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
