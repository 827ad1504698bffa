//! Expiry times as the marks carry them: seconds since the epoch inside
//! `stack`, RFC 3339 on EC2 tags, and back again.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `secs` since the epoch as an RFC 3339 time in UTC, to the second.
pub fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// An RFC 3339 time as seconds since the epoch; `None` when it is not one.
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    humantime::parse_rfc3339(text)
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
}

/// Now, in seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_rfc3339() {
        assert_eq!(rfc3339(1_796_300_000), "2026-12-03T12:13:20Z");
        assert_eq!(parse_rfc3339("2026-12-03T12:13:20Z"), Some(1_796_300_000));
        assert_eq!(parse_rfc3339("tomorrow"), None);
    }
}
