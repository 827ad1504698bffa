//! Generated secrets: text drawn uniformly from an alphabet with the
//! operating system's random bytes. Every database kind makes its
//! passwords here, so none of them is ever a default.

#[derive(Debug, thiserror::Error)]
#[error("the operating system gave no random bytes for the secrets of {what}")]
pub struct RandomError {
    what: String,
    #[source]
    source: getrandom::Error,
}

pub const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
pub const HEX: &[u8] = b"0123456789abcdef";

/// `len` characters from `alphabet`, uniformly (rejection sampling); `what`
/// names whose secrets they are.
pub fn random_text(alphabet: &[u8], len: usize, what: &str) -> Result<String, RandomError> {
    let limit = 256 - 256 % alphabet.len();
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        getrandom::getrandom(&mut buf).map_err(|source| RandomError {
            what: what.to_string(),
            source,
        })?;
        for &b in buf.iter().filter(|&&b| usize::from(b) < limit) {
            if out.len() == len {
                break;
            }
            out.push(char::from(alphabet[usize::from(b) % alphabet.len()]));
        }
    }
    Ok(out)
}
