//! Human units used in specs and flags: byte sizes such as `64MiB` and
//! durations such as `500ms`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A number of bytes, parsed from `1048576`, `512KiB`, `64MiB`, `2GiB`, `1MB` and the like.
///
/// Serialised as its human form so manifests and API answers read naturally.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "ByteSizeRepr", into = "String")]
pub struct ByteSize(pub u64);

/// Why a string is not a byte size.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid size {input:?}: {reason} (write a number of bytes or a number with a unit such as 512KiB, 64MiB, 2GiB)")]
pub struct ByteSizeError {
    input: String,
    reason: &'static str,
}

const UNITS: &[(&str, u64)] = &[
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
    ("K", 1 << 10),
    ("M", 1 << 20),
    ("G", 1 << 30),
    ("B", 1),
];

impl ByteSize {
    /// `n` mebibytes.
    pub const fn mib(n: u64) -> Self {
        ByteSize(n << 20)
    }

    /// `n` gibibytes.
    pub const fn gib(n: u64) -> Self {
        ByteSize(n << 30)
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = ByteSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ByteSizeError { input: s.to_string(), reason };
        let trimmed = s.trim();
        let split = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        if number.is_empty() {
            return Err(err("it does not start with a number"));
        }
        let number: u64 = number.parse().map_err(|_| err("the number is too large"))?;
        let unit = unit.trim();
        let multiplier = if unit.is_empty() {
            1
        } else {
            UNITS
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(unit))
                .map(|(_, m)| *m)
                .ok_or_else(|| err("unknown unit"))?
        };
        number.checked_mul(multiplier).map(ByteSize).ok_or_else(|| err("the size is too large"))
    }
}

/// Manifests may write a size as a bare number of bytes or as a string.
#[derive(Deserialize)]
#[serde(untagged)]
enum ByteSizeRepr {
    Number(u64),
    Text(String),
}

impl TryFrom<ByteSizeRepr> for ByteSize {
    type Error = ByteSizeError;
    fn try_from(value: ByteSizeRepr) -> Result<Self, Self::Error> {
        match value {
            ByteSizeRepr::Number(n) => Ok(ByteSize(n)),
            ByteSizeRepr::Text(s) => s.parse(),
        }
    }
}

impl From<ByteSize> for String {
    fn from(value: ByteSize) -> Self {
        value.to_string()
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, multiplier) in [("TiB", 1u64 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if self.0 >= multiplier && self.0.is_multiple_of(multiplier) {
                return write!(f, "{}{name}", self.0 / multiplier);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ByteSize({self})")
    }
}

/// Why a string is not a duration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid duration {input:?}: {reason} (write a number with a unit, such as 500ms, 5s or 2m)"
)]
pub struct DurationError {
    input: String,
    reason: String,
}

/// Parses a duration written the human way: `500ms`, `5s`, `2m`, `1m 30s`.
///
/// A unit is required: a bare `5` could mean seconds or milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    humantime::parse_duration(s.trim()).map_err(|e| DurationError {
        input: s.to_string(),
        reason: e.to_string(),
    })
}

/// Writes a duration the way [`parse_duration`] reads it, e.g. `5s` or `1s 500ms`.
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Serde for a [`Duration`] written as text (`5s`, `500ms`), for `#[serde(with = "...")]`.
pub mod duration_text {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};
    use std::time::Duration;

    /// Writes `d` with [`super::format_duration`].
    pub fn serialize<S: Serializer>(d: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::format_duration(*d))
    }

    /// Reads a duration with [`super::parse_duration`].
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        super::parse_duration(&text).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(input: &str, expected: Result<u64, &str>) {
        match (input.parse::<ByteSize>(), expected) {
            (Ok(got), Ok(want)) => assert_eq!(got.bytes(), want, "{input}"),
            (Err(got), Err(want)) => assert!(got.to_string().contains(want), "{input}: {got}"),
            (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn parses_sizes() {
        check("1048576", Ok(1 << 20));
        check("64MiB", Ok(64 << 20));
        check("64mib", Ok(64 << 20));
        check("2GiB", Ok(2 << 30));
        check("512 KiB", Ok(512 << 10));
        check("1MB", Ok(1_000_000));
        check("MiB", Err("does not start with a number"));
        check("12 parsecs", Err("unknown unit"));
        check("-5", Err("does not start with a number"));
        check("99999999999999999999", Err("too large"));
        check("99999999999TiB", Err("too large"));
    }

    #[test]
    fn displays_in_the_largest_exact_unit() {
        assert_eq!(ByteSize::mib(64).to_string(), "64MiB");
        assert_eq!(ByteSize(1500).to_string(), "1500");
        assert_eq!(ByteSize::gib(2).to_string(), "2GiB");
    }

    #[test]
    fn parses_and_formats_durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        let err = parse_duration("5")
            .expect_err("a unit is required")
            .to_string();
        assert!(err.contains("\"5\"") && err.contains("500ms"), "{err}");
        assert!(parse_duration("fast").is_err());
        for d in [
            Duration::from_millis(500),
            Duration::from_secs(5),
            Duration::from_millis(1500),
            Duration::from_secs(600),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        assert_eq!(format_duration(Duration::from_secs(5)), "5s");
        assert_eq!(format_duration(Duration::from_millis(500)), "500ms");
    }
}
