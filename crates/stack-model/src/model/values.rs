//! Value types of the stack file that need their own parsing: sizes, image
//! references, names, durations, cron expressions, version requirements
//! and tag patterns.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

/// A size in bytes, written with a unit (`20GiB`, `512Mi`, `10GB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(into = "String")]
pub struct ByteSize(pub u64);

const GIB: u64 = 1 << 30;

impl ByteSize {
    pub fn gib(n: u64) -> Self {
        ByteSize(n * GIB)
    }

    /// Whole GiB, rounded up (EC2 volumes are sized in GiB).
    pub fn as_gib_ceil(self) -> u64 {
        self.0.div_ceil(GIB)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let digits_end = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(digits_end);
        if number.is_empty() {
            return Err("a size such as 20GiB".to_string());
        }
        let multiplier: u64 = match unit.trim() {
            "" => return Err("a size with a unit such as 20GiB".to_string()),
            "KiB" | "Ki" => 1 << 10,
            "MiB" | "Mi" => 1 << 20,
            "GiB" | "Gi" => 1 << 30,
            "TiB" | "Ti" => 1 << 40,
            "kB" | "KB" | "k" => 1_000,
            "MB" | "M" => 1_000_000,
            "GB" | "G" => 1_000_000_000,
            "TB" | "T" => 1_000_000_000_000,
            _ => return Err("a size unit (KiB, MiB, GiB, TiB, kB, MB, GB, TB)".to_string()),
        };
        let number: u64 = number
            .parse()
            .map_err(|_| "a size that fits in 64 bits".to_string())?;
        number
            .checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| "a size that fits in 64 bits".to_string())
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, size) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl From<ByteSize> for String {
    fn from(size: ByteSize) -> String {
        size.to_string()
    }
}

/// A container image reference: `[registry[:port]/]path[:tag][@sha256:digest]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct ImageRef {
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl From<ImageRef> for String {
    fn from(image: ImageRef) -> String {
        image.to_string()
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl ImageRef {
    /// The registry host (`host[:port]`) as written, when the first path
    /// component names one (it has a `.` or a `:`, or is `localhost`, as
    /// Docker reads it); `None`: Docker Hub.
    pub fn registry_host(&self) -> Option<&str> {
        self.repository
            .split_once('/')
            .filter(|(first, _)| is_registry_host(first))
            .map(|(first, _)| first)
    }

    /// The repository path within its registry, as written (`couchdb`,
    /// `franzinc/agraph`, `team/app`).
    pub fn path(&self) -> &str {
        match self.registry_host() {
            Some(host) => &self.repository[host.len() + 1..],
            None => &self.repository,
        }
    }

    /// Parses a reference following the distribution spec's grammar; the
    /// error says what a valid reference looks like.
    pub fn parse(text: &str) -> Result<Self, String> {
        const EXPECTED: &str = "an image reference such as couchdb:3.5.1 or registry.example:5000/team/app@sha256:<64 hex>";
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => {
                let hex = digest.strip_prefix("sha256:").ok_or(EXPECTED)?;
                if hex.len() != 64 || !hex.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')) {
                    return Err(EXPECTED.to_string());
                }
                (rest, Some(digest.to_string()))
            }
            None => (text, None),
        };
        // A tag is after the last ':' that follows the last '/'.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (repository, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(tag) = tag {
            let valid = !tag.is_empty()
                && tag.len() <= 128
                && tag
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && tag
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if !valid {
                return Err(EXPECTED.to_string());
            }
        }
        let mut components: Vec<&str> = repository.split('/').collect();
        if components.len() > 1 && is_registry_host(components[0]) {
            components.remove(0);
        }
        if repository.is_empty() || !components.iter().all(|c| is_path_component(c)) {
            return Err(EXPECTED.to_string());
        }
        Ok(ImageRef {
            repository: repository.to_string(),
            tag: tag.map(str::to_string),
            digest,
        })
    }
}

fn is_registry_host(component: &str) -> bool {
    let host = component.split(':').next().unwrap_or("");
    (component.contains('.') || component.contains(':') || component == "localhost")
        && !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
        && component
            .split_once(':')
            .is_none_or(|(_, port)| port.parse::<u16>().is_ok())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn is_path_component(component: &str) -> bool {
    if component.is_empty() {
        return false;
    }
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &component[start..i];
        let dashes = sep.chars().all(|c| c == '-');
        if !(sep == "." || sep == "_" || sep == "__" || dashes) {
            return false;
        }
    }
    true
}

/// A DNS label: lowercase letters, digits and '-', starting with a letter,
/// not ending with '-', at most `max` characters.
pub fn is_dns_label(text: &str, max: usize) -> bool {
    !text.is_empty()
        && text.len() <= max
        && text.starts_with(|c: char| c.is_ascii_lowercase())
        && !text.ends_with('-')
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// A DNS name made of labels separated by dots.
pub fn is_dns_name(text: &str) -> bool {
    text.len() <= 253
        && text.contains('.')
        && text.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

/// A Kubernetes object name (DNS-1123 subdomain): lowercase letters,
/// digits, '-' and '.', at most 253 characters.
pub fn is_dns_subdomain(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 253
        && text.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

/// The longest CouchDB database name.
pub const COUCH_NAME_MAX: usize = 238;

/// A user database name as CouchDB accepts it (`^[a-z][a-z0-9_$()+/-]*$`).
pub fn is_couch_database_name(text: &str) -> bool {
    text.len() <= COUCH_NAME_MAX
        && text.starts_with(|c: char| c.is_ascii_lowercase())
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_$()+-/".contains(c))
}

/// A replication target URL: `http` or `https`, a host, a database path,
/// and no credentials in it (they belong in a Secret).
pub fn check_couch_url(text: &str) -> Result<(), String> {
    const EXPECTED: &str = "an http:// or https:// URL of a CouchDB database, such as https://backup.example.com/orders";
    let rest = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"))
        .ok_or_else(|| EXPECTED.to_string())?;
    let (authority, database) = rest.split_once('/').ok_or_else(|| EXPECTED.to_string())?;
    if authority.contains('@') {
        return Err(
            "a URL without credentials (name a Secret in `credentials` instead)".to_string(),
        );
    }
    if authority.is_empty()
        || database.trim_end_matches('/').is_empty()
        || text.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(EXPECTED.to_string());
    }
    Ok(())
}

/// The checksum a downloaded image must have: `sha256` or `sha512` (the
/// one Debian publishes), as lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct Checksum {
    pub algorithm: HashAlgorithm,
    pub hex: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HashAlgorithm {
    Sha256,
    Sha512,
}

impl HashAlgorithm {
    /// Both, as the keys of an image's settings.
    pub const ALL: [HashAlgorithm; 2] = [HashAlgorithm::Sha256, HashAlgorithm::Sha512];

    pub fn name(self) -> &'static str {
        match self {
            HashAlgorithm::Sha256 => "sha256",
            HashAlgorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            HashAlgorithm::Sha256 => 64,
            HashAlgorithm::Sha512 => 128,
        }
    }
}

impl Checksum {
    pub fn parse(algorithm: HashAlgorithm, text: &str) -> Result<Self, String> {
        if text.len() == algorithm.hex_len() && text.chars().all(|c| c.is_ascii_hexdigit()) {
            Ok(Checksum {
                algorithm,
                hex: text.to_lowercase(),
            })
        } else {
            Err(format!("{} hex digits", algorithm.hex_len()))
        }
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

impl From<Checksum> for String {
    fn from(checksum: Checksum) -> String {
        checksum.to_string()
    }
}

/// A semver requirement (`>=3.5, <4`) that a candidate version must meet,
/// with the text it was written as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct VersionRange(pub semver::VersionReq);

impl VersionRange {
    pub fn parse(text: &str) -> Result<Self, String> {
        semver::VersionReq::parse(text)
            .map(VersionRange)
            .map_err(|err| format!("a semver requirement such as \">=3.5, <4\" ({err})"))
    }
}

impl From<VersionRange> for String {
    fn from(range: VersionRange) -> String {
        range.0.to_string()
    }
}

/// The largest compiled form a tag pattern may take: a pattern is the
/// user's, matched against every tag of a registry.
const TAG_PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// A regular expression that a whole tag must match, with the text it was
/// written as.
#[derive(Debug, Clone, Serialize)]
#[serde(into = "String")]
pub struct TagPattern {
    pub text: String,
    #[serde(skip)]
    whole: regex::Regex,
}

impl TagPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        const EXPECTED: &str =
            "a regular expression the whole tag must match, such as 3\\.5\\.\\d+";
        let whole = regex::RegexBuilder::new(&format!("^(?:{text})$"))
            .size_limit(TAG_PATTERN_SIZE_LIMIT)
            .build()
            .map_err(|err| match err {
                regex::Error::CompiledTooBig(_) => {
                    format!("{EXPECTED} (this one compiles to more than 1 MiB)")
                }
                _ => {
                    let shown = err.to_string();
                    let last = shown.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
                    format!("{EXPECTED} ({})", last.trim().trim_start_matches("error: "))
                }
            })?;
        Ok(TagPattern {
            text: text.to_string(),
            whole,
        })
    }

    /// Whether the whole tag matches.
    pub fn matches(&self, tag: &str) -> bool {
        self.whole.is_match(tag)
    }
}

impl PartialEq for TagPattern {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl From<TagPattern> for String {
    fn from(pattern: TagPattern) -> String {
        pattern.text
    }
}

/// A registry named as container tools name one: `host` or `host:port`,
/// the host a DNS name or an IPv4 address, or `[IPv6]:port`.
pub fn check_registry_host(text: &str) -> Result<(), String> {
    const EXPECTED: &str = "a registry as host or host:port, such as registry.internal:5000";
    let (host, port) = match text.strip_prefix('[') {
        Some(rest) => {
            let (address, port) = rest.split_once("]:").ok_or(EXPECTED)?;
            address
                .parse::<std::net::Ipv6Addr>()
                .map_err(|_| EXPECTED)?;
            (None, Some(port))
        }
        None => match text.split_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(text), None),
        },
    };
    let host_ok = host.is_none_or(|host| {
        !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            })
    });
    let port_ok = port.is_none_or(|port| port.parse::<u16>().is_ok_and(|p| p > 0));
    if host_ok && port_ok {
        Ok(())
    } else {
        Err(EXPECTED.to_string())
    }
}

/// `30s`, `5m`, `1h30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|_| "a duration such as 30s, 5m or 1h30m".to_string())
}

/// The longest `ttl` a stack may have: an expiry is a safety net for
/// environments that were meant to be short-lived.
pub const MAX_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

/// A stack's `ttl`: from one minute to [`MAX_TTL`].
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    const EXPECTED: &str = "a duration from 1m to 90d such as 2h or 3d";
    match humantime::parse_duration(text) {
        Ok(ttl) if ttl >= Duration::from_secs(60) && ttl <= MAX_TTL => Ok(ttl),
        _ => Err(EXPECTED.to_string()),
    }
}

/// A PostgreSQL URL for the state: `postgres://USER@HOST[:PORT]/DATABASE`
/// with optional query parameters, and never a password (that comes from
/// `PGPASSWORD` or `~/.pgpass`, so the stack file can be shared).
pub fn check_postgres_url(text: &str) -> Result<(), String> {
    const EXPECTED: &str =
        "a URL such as postgres://stack@db.example.com:5432/stack, without a password";
    let rest = text
        .strip_prefix("postgres://")
        .or_else(|| text.strip_prefix("postgresql://"))
        .ok_or_else(|| EXPECTED.to_string())?;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    if let Some((userinfo, _)) = authority.rsplit_once('@') {
        if userinfo.contains(':') {
            return Err(format!(
                "{EXPECTED} (the password comes from PGPASSWORD or ~/.pgpass, never the stack file)"
            ));
        }
    }
    let query = rest.split_once('?').map_or("", |(_, q)| q);
    if query
        .split('&')
        .any(|pair| pair.split('=').next() == Some("password"))
    {
        return Err(format!(
            "{EXPECTED} (the password comes from PGPASSWORD or ~/.pgpass, never the stack file)"
        ));
    }
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.is_empty() && !rest.contains("host=") {
        return Err(EXPECTED.to_string());
    }
    Ok(())
}

/// A URL with the password of its user info, if any, shown as `***`.
pub fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{user}:***@{host}")
        }
        _ => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some(("password", _)) => "password=***".to_string(),
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", pairs.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// A five-field cron expression (minute hour day-of-month month day-of-week).
pub fn check_cron(text: &str) -> Result<(), String> {
    const EXPECTED: &str = "a cron expression of five fields such as \"0 3 * * 0\"";
    if text.split_whitespace().count() != 5 {
        return Err(EXPECTED.to_string());
    }
    text.parse::<croner::Cron>()
        .map(|_| ())
        .map_err(|_| EXPECTED.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_url_never_carries_a_password_and_one_is_never_shown() {
        assert!(check_postgres_url("postgres://stack@db:5432/stack?sslmode=require").is_ok());
        assert!(check_postgres_url("postgres://stack:pw@db/stack").is_err());
        assert!(
            check_postgres_url("postgres://stack@db/stack?sslmode=require&password=pw").is_err()
        );
        assert!(check_postgres_url("mysql://db/stack").is_err());
        assert_eq!(
            without_password("postgres://stack:pw@db/stack?password=pw&sslmode=require"),
            "postgres://stack:***@db/stack?password=***&sslmode=require"
        );
        assert_eq!(
            without_password("postgres://stack@db/stack"),
            "postgres://stack@db/stack"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("20GiB"), Ok(ByteSize(20 << 30)));
        assert_eq!(ByteSize::parse("512Mi"), Ok(ByteSize(512 << 20)));
        assert_eq!(ByteSize::parse("10GB"), Ok(ByteSize(10_000_000_000)));
        assert!(ByteSize::parse("20").is_err());
        assert!(ByteSize::parse("20 parsecs").is_err());
        assert!(ByteSize::parse("GiB").is_err());
        assert_eq!(ByteSize(20 << 30).to_string(), "20GiB");
        assert_eq!(ByteSize(10_000_000_000).as_gib_ceil(), 10);
    }

    #[test]
    fn checksums() {
        let sha256 = "AB".repeat(32);
        let parsed = Checksum::parse(HashAlgorithm::Sha256, &sha256).unwrap();
        assert_eq!(parsed.to_string(), format!("sha256:{}", "ab".repeat(32)));
        assert!(Checksum::parse(HashAlgorithm::Sha512, &sha256).is_err());
        assert!(Checksum::parse(HashAlgorithm::Sha512, &"0f".repeat(64)).is_ok());
        assert!(Checksum::parse(HashAlgorithm::Sha256, &"zz".repeat(32)).is_err());
    }

    #[test]
    fn image_references() {
        for good in [
            "couchdb:3.5.1",
            "codenotary/immudb:1.11.0",
            "franzinc/agraph:v8.4.0",
            "registry.example:5000/team/app",
            "localhost/app_one:latest",
            "ghcr.io/a/b@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(ImageRef::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "CouchDB:3",
            "couchdb:",
            "couch db",
            "couchdb:3.5@sha256:xyz",
            "/couchdb",
            "couchdb:-bad",
            "team//app",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
        let image = ImageRef::parse("registry.example:5000/app:1.2").unwrap();
        assert_eq!(image.repository, "registry.example:5000/app");
        assert_eq!(image.tag.as_deref(), Some("1.2"));
        assert_eq!(image.registry_host(), Some("registry.example:5000"));
        assert_eq!(image.path(), "app");
        let hub = ImageRef::parse("franzinc/agraph:v8.4.0").unwrap();
        assert_eq!((hub.registry_host(), hub.path()), (None, "franzinc/agraph"));
        let local = ImageRef::parse("localhost/team/app").unwrap();
        assert_eq!(
            (local.registry_host(), local.path()),
            (Some("localhost"), "team/app")
        );
    }

    #[test]
    fn ranges_patterns_and_registry_hosts() {
        let range = VersionRange::parse(">=3.5, <4").unwrap();
        assert!(range.0.matches(&semver::Version::new(3, 6, 1)));
        assert!(!range.0.matches(&semver::Version::new(4, 0, 0)));
        assert!(VersionRange::parse("three").is_err());
        let pattern = TagPattern::parse(r"3\.5\.\d+").unwrap();
        assert!(pattern.matches("3.5.12"));
        assert!(!pattern.matches("3.5.1-rc.1"), "the whole tag must match");
        assert!(!pattern.matches("13.5.1"));
        let unclosed = TagPattern::parse("3.(5").unwrap_err();
        assert!(unclosed.contains("unclosed group"), "{unclosed}");
        let big = TagPattern::parse(r"\w{1000}\w{1000}").unwrap_err();
        assert!(big.contains("more than 1 MiB"), "{big}");
        for good in [
            "localhost:5000",
            "registry.internal",
            "10.0.0.5:5000",
            "[::1]:5000",
        ] {
            assert!(check_registry_host(good).is_ok(), "{good}");
        }
        for bad in [
            "http://registry",
            "reg istry",
            "host:0",
            "host:port",
            "a/b",
            "[::1]",
        ] {
            assert!(check_registry_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_durations_crons() {
        assert!(is_dns_label("web-1", 63));
        assert!(!is_dns_label("Web", 63));
        assert!(!is_dns_label("1web", 63));
        assert!(!is_dns_label("web-", 63));
        assert!(is_dns_name("db.example.test"));
        assert!(!is_dns_name("localhost"));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("five").is_err());
        assert!(check_cron("0 3 * * 0").is_ok());
        assert!(check_cron("61 3 * * 0").is_err());
        assert!(check_cron("0 3 * *").is_err());
    }
}
