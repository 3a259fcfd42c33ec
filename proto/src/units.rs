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

    /// The size for people to read: exact when it is a whole number of a
    /// unit (`8MiB`, as [`fmt::Display`] writes it), else rounded to one
    /// decimal of the largest unit it reaches (`852.4MiB`). `Display` stays
    /// exact, since it is also how sizes are stored and parsed back.
    pub fn human(self) -> String {
        for (name, multiplier) in [("TiB", 1u64 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if self.0 >= multiplier {
                if self.0.is_multiple_of(multiplier) {
                    return format!("{}{name}", self.0 / multiplier);
                }
                return format!("{:.1}{name}", self.0 as f64 / multiplier as f64);
            }
        }
        format!("{}B", self.0)
    }

    /// This size times `ratio`, rounded down.
    pub fn scaled(self, ratio: Overcommit) -> ByteSize {
        ByteSize(u64::try_from(u128::from(self.0) * u128::from(ratio.0) / 1000).unwrap_or(u64::MAX))
    }
}

/// How far a host lets placement overcommit its memory: reserved requests
/// may add up to its memory times this ratio (`1.5`: half as much again).
/// Requests are what replicas usually use, not what they may grow to, so a
/// ratio above 1 trades the chance that many replicas peak at once (met
/// by each instance's cap and a refused instance, never a crash) for
/// density. Kept in thousandths so that it compares exactly; written and
/// read as a decimal number between 1 and 100.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Overcommit(u32);

impl Overcommit {
    /// No overcommit: reservations add up to the host's memory at most.
    pub const NONE: Overcommit = Overcommit(1000);
    /// The largest ratio accepted.
    pub const MAX: Overcommit = Overcommit(100_000);

    /// The ratio in thousandths (1500 for 1.5).
    pub const fn per_mille(self) -> u32 {
        self.0
    }

    /// The ratio `per_mille / 1000`, if between 1 and [`Overcommit::MAX`].
    pub fn from_per_mille(per_mille: u32) -> Result<Overcommit, OvercommitError> {
        if !(Self::NONE.0..=Self::MAX.0).contains(&per_mille) {
            return Err(OvercommitError(format!("{}", f64::from(per_mille) / 1000.0)));
        }
        Ok(Overcommit(per_mille))
    }
}

impl Default for Overcommit {
    fn default() -> Self {
        Overcommit::NONE
    }
}

/// Why a number is not an overcommit ratio.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid memory overcommit ratio {0}: write a number from 1 (no overcommit) to 100, such as 1.5")]
pub struct OvercommitError(String);

impl FromStr for Overcommit {
    type Err = OvercommitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ratio: f64 = s.trim().parse().map_err(|_| OvercommitError(format!("{s:?}")))?;
        Overcommit::try_from(ratio)
    }
}

impl TryFrom<f64> for Overcommit {
    type Error = OvercommitError;

    fn try_from(ratio: f64) -> Result<Self, Self::Error> {
        if !ratio.is_finite() || !(1.0..=100.0).contains(&ratio) {
            return Err(OvercommitError(ratio.to_string()));
        }
        // In range, so the rounded product fits a u32.
        Overcommit::from_per_mille((ratio * 1000.0).round() as u32)
    }
}

impl fmt::Display for Overcommit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", f64::from(self.0) / 1000.0)
    }
}

impl fmt::Debug for Overcommit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Overcommit({self})")
    }
}

impl Serialize for Overcommit {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(f64::from(self.0) / 1000.0)
    }
}

impl<'de> Deserialize<'de> for Overcommit {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let ratio = f64::deserialize(deserializer)?;
        Overcommit::try_from(ratio).map_err(serde::de::Error::custom)
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

    #[test]
    fn human_sizes_round_to_one_decimal() {
        assert_eq!(ByteSize(893_855_334).human(), "852.4MiB");
        assert_eq!(ByteSize::gib(1).human(), "1GiB");
        assert_eq!(ByteSize(1_153_434).human(), "1.1MiB");
        assert_eq!(ByteSize(512).human(), "512B");
        assert_eq!(ByteSize(1536).human(), "1.5KiB");
        assert_eq!(ByteSize(893_855_334).to_string(), "893855334", "Display stays exact");
    }

    #[test]
    fn overcommit_ratios() {
        let ratio: Overcommit = "1.5".parse().expect("a ratio");
        assert_eq!(ratio.per_mille(), 1500);
        assert_eq!(ratio.to_string(), "1.5");
        assert_eq!(ByteSize::gib(2).scaled(ratio), ByteSize::gib(3));
        assert_eq!(ByteSize::gib(2).scaled(Overcommit::default()), ByteSize::gib(2));
        assert_eq!(Overcommit::default(), Overcommit::NONE);
        for bad in ["0.5", "0", "-1", "101", "NaN", "inf", "lots"] {
            let err = bad.parse::<Overcommit>().expect_err(bad).to_string();
            assert!(err.contains("write a number from 1 (no overcommit) to 100"), "{bad}: {err}");
        }
        assert_eq!(serde_json::to_string(&ratio).expect("serialises"), "1.5");
        assert_eq!(serde_json::from_str::<Overcommit>("2").expect("parses"), Overcommit::from_per_mille(2000).expect("in range"));
        assert!(serde_json::from_str::<Overcommit>("0.9").is_err());
    }

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
