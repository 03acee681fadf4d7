//! Human-written quantities in `proxy.toml`: durations (`"10s"`, `"250ms"`)
//! and byte sizes (`"1MB"`).
//!
//! Sizes follow PostgreSQL's and Patroni's convention, where `kB`, `MB`,
//! `GB` and `TB` are powers of 1024, because `max_replica_lag` is compared
//! with the lag Patroni reports and passed to its `?lag=` check.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// A duration written as text, e.g. `"10s"`, `"1m 30s"`, `"250ms"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(std::time::Duration);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(std::time::Duration::from_secs(secs))
    }

    pub const fn from_millis(millis: u64) -> Self {
        Self(std::time::Duration::from_millis(millis))
    }

    pub fn get(self) -> std::time::Duration {
        self.0
    }
}

impl std::str::FromStr for Duration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        humantime::parse_duration(text.trim())
            .map(Self)
            .map_err(|e| format!("{text:?} is not a duration such as \"10s\" or \"250ms\" ({e})"))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A byte count written as text, e.g. `"1MB"`, `"512kB"`, `"0"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(u64);

impl ByteSize {
    pub const fn new(bytes: u64) -> Self {
        Self(bytes)
    }

    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a size such as \"1MB\", \"512kB\" or \"0\"");
        let trimmed = text.trim();
        let split = trimmed
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        let number: u64 = number.parse().map_err(|_| bad())?;
        let multiplier: u64 = match unit.trim() {
            "" | "B" => 1,
            "kB" | "KB" | "k" | "K" => 1 << 10,
            "MB" | "M" => 1 << 20,
            "GB" | "G" => 1 << 30,
            "TB" | "T" => 1 << 40,
            _ => return Err(bad()),
        };
        number.checked_mul(multiplier).map(Self).ok_or_else(bad)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}B", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(n) => Ok(Self(n)),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!("10s".parse::<Duration>(), Ok(Duration::from_secs(10)));
        assert_eq!("250ms".parse::<Duration>(), Ok(Duration::from_millis(250)));
        assert_eq!("1m 30s".parse::<Duration>(), Ok(Duration::from_secs(90)));
        assert!("10".parse::<Duration>().is_err());
        assert!("soon".parse::<Duration>().is_err());
    }

    #[test]
    fn sizes_use_postgres_units() {
        assert_eq!("1MB".parse::<ByteSize>(), Ok(ByteSize::new(1_048_576)));
        assert_eq!("512kB".parse::<ByteSize>(), Ok(ByteSize::new(524_288)));
        assert_eq!("0".parse::<ByteSize>(), Ok(ByteSize::new(0)));
        assert_eq!("16 MB".parse::<ByteSize>(), Ok(ByteSize::new(16 << 20)));
        assert!("1XB".parse::<ByteSize>().is_err());
        assert!("MB".parse::<ByteSize>().is_err());
        assert!("99999999999TB".parse::<ByteSize>().is_err());
    }
}
