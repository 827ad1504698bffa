//! The stack's own certificate authority (rcgen): made once per stack, kept
//! in the state (mode 0600), and used to sign one wildcard certificate for
//! the stack's domain. The same key signs again when the domain changes, so
//! a user who trusted the CA certificate keeps trusting the endpoints. The
//! CA is valid for ten years; the wildcard certificate for 397 days (what
//! browsers accept) and is signed again in its last 30 days.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

const CA_VALIDITY: Duration = Duration::days(3650);
const CERT_VALIDITY: Duration = Duration::days(397);
const RENEW_BEFORE: Duration = Duration::days(30);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot make the certificates of stack {stack}")]
    Generate {
        stack: String,
        #[source]
        source: rcgen::Error,
    },
}

/// The CA and the wildcard certificate, all PEM; what the state records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Material {
    pub domain: String,
    pub ca_cert: String,
    pub ca_private_key: String,
    pub cert: String,
    pub private_key: String,
    /// When `cert` expires, in seconds since the Unix epoch.
    pub cert_expires: i64,
}

fn ca_params(stack: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, format!("stack {stack} CA"));
    name.push(DnType::OrganizationName, "stack");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
    params.not_after = OffsetDateTime::now_utc() + CA_VALIDITY;
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// A wildcard certificate for `domain`: PEM certificate, PEM key, expiry.
fn leaf(
    stack: &str,
    domain: &str,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(String, String, i64), rcgen::Error> {
    let mut params = CertificateParams::new(vec![domain.to_string(), format!("*.{domain}")])?;
    params.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
    params.not_after = OffsetDateTime::now_utc() + CERT_VALIDITY;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("*.{domain}"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, format!("stack {stack}"));
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((
        cert.pem(),
        key.serialize_pem(),
        params.not_after.unix_timestamp(),
    ))
}

/// The material for `domain`: what was recorded when it still fits, a new
/// leaf from the recorded CA when the domain changed, else a new CA.
pub fn material(
    stack: &str,
    domain: &str,
    recorded: Option<Material>,
) -> Result<Material, TlsError> {
    let failed = |source| TlsError::Generate {
        stack: stack.to_string(),
        source,
    };
    if let Some(recorded) = recorded {
        let fresh = OffsetDateTime::now_utc().unix_timestamp()
            < recorded.cert_expires - RENEW_BEFORE.whole_seconds();
        if recorded.domain == domain && fresh {
            return Ok(recorded);
        }
        if let Ok(key) = KeyPair::from_pem(&recorded.ca_private_key) {
            let issuer = Issuer::new(ca_params(stack), key);
            let (cert, private_key, cert_expires) = leaf(stack, domain, &issuer).map_err(failed)?;
            return Ok(Material {
                domain: domain.to_string(),
                cert,
                private_key,
                cert_expires,
                ..recorded
            });
        }
    }
    let key = KeyPair::generate().map_err(failed)?;
    let params = ca_params(stack);
    let ca_cert = params.self_signed(&key).map_err(failed)?.pem();
    let ca_private_key = key.serialize_pem();
    let issuer = Issuer::new(params, key);
    let (cert, private_key, cert_expires) = leaf(stack, domain, &issuer).map_err(failed)?;
    Ok(Material {
        domain: domain.to_string(),
        ca_cert,
        ca_private_key,
        cert,
        private_key,
        cert_expires,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_while_the_domain_fits_and_re_signed_by_the_same_ca_when_not() {
        let first = material("demo", "db.example.test", None).unwrap();
        assert!(first.ca_cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(first.private_key.contains("PRIVATE KEY"));
        let again = material("demo", "db.example.test", Some(first.clone())).unwrap();
        assert_eq!(again, first);
        let moved = material("demo", "other.example.test", Some(first.clone())).unwrap();
        assert_eq!(moved.ca_cert, first.ca_cert);
        assert_ne!(moved.cert, first.cert);
        assert_eq!(moved.domain, "other.example.test");
        let expiring = Material {
            cert_expires: OffsetDateTime::now_utc().unix_timestamp() + 86400,
            ..first.clone()
        };
        let renewed = material("demo", "db.example.test", Some(expiring)).unwrap();
        assert_eq!(renewed.ca_cert, first.ca_cert);
        assert_ne!(renewed.cert, first.cert);
        assert!(renewed.cert_expires > first.cert_expires - 60);
    }
}
