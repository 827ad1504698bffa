//! A client of the OCI distribution API for what upgrades need: a
//! repository's tags (`GET /v2/NAME/tags/list`, following `Link`
//! pagination) and a tag's manifest digest (`HEAD /v2/NAME/manifests/TAG`).
//!
//! Auth is what a 401's `WWW-Authenticate` asks for: a bearer token from
//! the challenge's realm (anonymous, or with the user's credentials) or
//! basic credentials. Plain HTTP only for loopback registries and those
//! the stack names insecure, after HTTPS failed, as Docker does. Every
//! request has a timeout, every body a size cap, a tags walk a cap on
//! pages and tags, and every wait ends when the run is stopped.
//!
//! One [`Registries`] is one run's cache: one tags walk per repository,
//! one digest lookup per tag, one token per registry and scope, however
//! many databases share an image; it counts the requests sent to each host.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, LINK, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use sha2::Digest as _;
use tokio::sync::OnceCell;

use super::docker_config::{Credentials, DockerConfig, DockerConfigError};
use super::reference::Location;
use crate::engine::{Cancel, Level, Stopped};

/// The page size asked of a tags list (registries may give fewer).
pub const PAGE_SIZE: u32 = 100;
/// The most pages and tags a tags walk reads.
pub const MAX_PAGES: usize = 200;
pub const MAX_TAGS: usize = 20_000;
/// The largest body read of a tags page, a manifest, a token answer and
/// an error answer.
const MAX_PAGE_BYTES: usize = 1 << 20;
const MAX_MANIFEST_BYTES: usize = 4 << 20;
const MAX_TOKEN_BYTES: usize = 64 << 10;
const MAX_ERROR_BYTES: usize = 16 << 10;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The manifests a digest is asked for: multi-platform indexes first, as
/// a pod's image is resolved.
const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot make the registry client")]
    Client(#[source] reqwest::Error),
    #[error("cannot reach registry {registry} over {tried}{}", if tried == &"https" { " (plain HTTP is only for loopback registries and those in upgrades.insecureRegistries)" } else { "" })]
    Unreachable {
        registry: String,
        tried: &'static str,
        #[source]
        source: reqwest::Error,
    },
    #[error("registry {registry} refused the login for {repository} ({status}){}", if *with_credentials { "" } else { ": no credentials for it in the docker config" })]
    Refused {
        registry: String,
        repository: String,
        status: u16,
        with_credentials: bool,
    },
    #[error("registry {registry} has no repository {repository}")]
    UnknownRepository {
        registry: String,
        repository: String,
    },
    #[error("registry {registry} has no tag {tag} of {repository}")]
    UnknownTag {
        registry: String,
        repository: String,
        tag: String,
    },
    #[error("registry {registry} answered {status} to {what}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Status {
        registry: String,
        what: String,
        status: u16,
        message: String,
    },
    #[error("registry {registry} gave a malformed answer to {what}: {problem}")]
    Malformed {
        registry: String,
        what: String,
        problem: String,
    },
    #[error("the answer of registry {registry} to {what} is larger than {limit} bytes")]
    TooLarge {
        registry: String,
        what: String,
        limit: usize,
    },
    #[error("registry {registry} lists more than {limit} {what} of {repository}")]
    TooMany {
        registry: String,
        repository: String,
        what: &'static str,
        limit: usize,
    },
    #[error("the token service {realm} of registry {registry} failed: {problem}")]
    Token {
        registry: String,
        realm: String,
        problem: String,
    },
    #[error("cannot read the credentials for registry {registry}")]
    Credentials {
        registry: String,
        #[source]
        source: DockerConfigError,
    },
    /// What an earlier request of this run for the same answered.
    #[error(transparent)]
    Earlier(Arc<RegistryError>),
    #[error("stopped before registry {registry} answered")]
    Stopped {
        registry: String,
        #[source]
        source: Stopped,
    },
}

/// A result shared by every caller that asks the same thing in one run.
type Shared<T> = Arc<OnceCell<Result<T, Arc<RegistryError>>>>;

fn cell<K: std::hash::Hash + Eq, T>(map: &mut HashMap<K, Shared<T>>, key: K) -> Shared<T> {
    map.entry(key).or_default().clone()
}

#[derive(Default)]
struct RunCache {
    tags: HashMap<Location, Shared<Arc<Vec<String>>>>,
    digests: HashMap<(Location, String), Shared<String>>,
    /// `Authorization` values by (registry, scope).
    authorizations: HashMap<(String, String), Shared<String>>,
    credentials: HashMap<String, Shared<Option<Credentials>>>,
    /// The scheme that answered, by registry.
    schemes: HashMap<String, &'static str>,
    /// Requests sent, by host (`host[:port]`), token services included.
    requests: BTreeMap<String, u64>,
}

/// The registries of one run, with its cache.
pub struct Registries {
    http: reqwest::Client,
    config: DockerConfig,
    insecure: Vec<String>,
    cache: Mutex<RunCache>,
}

/// Which auth a 401 asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
    },
    Basic,
}

#[derive(Deserialize)]
struct TagsPage {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    #[serde(default)]
    errors: Vec<ErrorEntry>,
}

#[derive(Deserialize)]
struct ErrorEntry {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// What one request is for, to name it in errors and to authorise it.
struct Ask<'a> {
    location: &'a Location,
    what: String,
}

impl Ask<'_> {
    fn registry(&self) -> &str {
        &self.location.registry
    }

    fn scope(&self) -> String {
        format!("repository:{}:pull", self.location.repository)
    }
}

impl Registries {
    /// `insecure`: the stack's `upgrades.insecureRegistries`.
    pub fn new(config: DockerConfig, insecure: &[String]) -> Result<Registries, RegistryError> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(5))
            .user_agent(concat!("stack/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(RegistryError::Client)?;
        Ok(Registries {
            http,
            config,
            insecure: insecure.to_vec(),
            cache: Mutex::new(RunCache::default()),
        })
    }

    /// Requests sent so far, by host.
    pub fn requests(&self) -> BTreeMap<String, u64> {
        self.lock().requests.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RunCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every tag of the repository, walked once per run.
    pub async fn tags(
        &self,
        location: &Location,
        cancel: &Cancel,
    ) -> Result<Arc<Vec<String>>, Arc<RegistryError>> {
        let shared = cell(&mut self.lock().tags, location.clone());
        let work = async {
            stoppable(location, cancel, self.walk_tags(location, cancel))
                .await
                .map(Arc::new)
                .map_err(Arc::new)
        };
        shared.get_or_init(|| work).await.clone()
    }

    /// The digest of the tag's manifest, asked once per run.
    pub async fn digest(
        &self,
        location: &Location,
        tag: &str,
        cancel: &Cancel,
    ) -> Result<String, Arc<RegistryError>> {
        let key = (location.clone(), tag.to_string());
        let shared = cell(&mut self.lock().digests, key);
        let work = async {
            stoppable(
                location,
                cancel,
                self.manifest_digest(location, tag, cancel),
            )
            .await
            .map_err(Arc::new)
        };
        shared.get_or_init(|| work).await.clone()
    }

    async fn walk_tags(
        &self,
        location: &Location,
        cancel: &Cancel,
    ) -> Result<Vec<String>, RegistryError> {
        let mut tags = Vec::new();
        let mut next = Some(format!(
            "/v2/{}/tags/list?n={PAGE_SIZE}",
            location.repository
        ));
        let mut pages = 0;
        while let Some(path) = next.take() {
            pages += 1;
            if pages > MAX_PAGES {
                return Err(RegistryError::TooMany {
                    registry: location.registry.clone(),
                    repository: location.repository.clone(),
                    what: "pages of tags",
                    limit: MAX_PAGES,
                });
            }
            let ask = Ask {
                location,
                what: format!("the tags of {} (page {pages})", location.repository),
            };
            let response = self.send(&ask, Method::GET, &path, None, cancel).await?;
            let (url, status, headers) = (
                response.url().clone(),
                response.status(),
                response.headers().clone(),
            );
            let body = read_bounded(response, MAX_PAGE_BYTES, &ask).await?;
            if !status.is_success() {
                return Err(status_error(&ask, status, &body, false));
            }
            let page: TagsPage = serde_json::from_slice(&body).map_err(|e| malformed(&ask, e))?;
            tags.extend(page.tags.unwrap_or_default());
            if tags.len() > MAX_TAGS {
                return Err(RegistryError::TooMany {
                    registry: location.registry.clone(),
                    repository: location.repository.clone(),
                    what: "tags",
                    limit: MAX_TAGS,
                });
            }
            next = next_page(&headers, &url).map_err(|problem| RegistryError::Malformed {
                registry: location.registry.clone(),
                what: ask.what.clone(),
                problem,
            })?;
        }
        Ok(tags)
    }

    async fn manifest_digest(
        &self,
        location: &Location,
        tag: &str,
        cancel: &Cancel,
    ) -> Result<String, RegistryError> {
        let ask = Ask {
            location,
            what: format!("the manifest of {}:{tag}", location.repository),
        };
        let path = format!("/v2/{}/manifests/{tag}", location.repository);
        let head = self
            .send(&ask, Method::HEAD, &path, Some(MANIFEST_TYPES), cancel)
            .await?;
        let status = head.status();
        if status == StatusCode::NOT_FOUND {
            return Err(RegistryError::UnknownTag {
                registry: location.registry.clone(),
                repository: location.repository.clone(),
                tag: tag.to_string(),
            });
        }
        if !status.is_success() {
            return Err(status_error(&ask, status, &[], true));
        }
        let digest = match head
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
        {
            Some(digest) => digest.to_string(),
            // Without the header, the digest is the manifest's sha256.
            None => {
                let get = self
                    .send(&ask, Method::GET, &path, Some(MANIFEST_TYPES), cancel)
                    .await?;
                let status = get.status();
                let body = read_bounded(get, MAX_MANIFEST_BYTES, &ask).await?;
                if !status.is_success() {
                    return Err(status_error(&ask, status, &body, true));
                }
                format!("sha256:{:x}", sha2::Sha256::digest(&body))
            }
        };
        let hex = digest.strip_prefix("sha256:").unwrap_or_default();
        if hex.len() != 64 || !hex.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')) {
            return Err(RegistryError::Malformed {
                registry: location.registry.clone(),
                what: ask.what,
                problem: format!("digest {digest:?} is not sha256:<64 hex>"),
            });
        }
        Ok(digest)
    }

    /// Sends a request to the registry, authorised as its 401 asks for;
    /// the answer is the one after auth.
    async fn send(
        &self,
        ask: &Ask<'_>,
        method: Method,
        path: &str,
        accept: Option<&str>,
        cancel: &Cancel,
    ) -> Result<reqwest::Response, RegistryError> {
        let key = (ask.registry().to_string(), ask.scope());
        let known = self
            .lock()
            .authorizations
            .get(&key)
            .and_then(|c| c.get().cloned());
        let authorization = match known {
            Some(Ok(value)) => Some(value),
            Some(Err(err)) => return Err(RegistryError::Earlier(err)),
            None => None,
        };
        let first = self
            .send_once(ask, method.clone(), path, accept, authorization.as_deref())
            .await?;
        if first.status() != StatusCode::UNAUTHORIZED || authorization.is_some() {
            return self.refused_or(ask, first, authorization.is_some()).await;
        }
        let challenge = first
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(parse_challenge)
            .min_by_key(|c| matches!(c, Challenge::Basic));
        let Some(challenge) = challenge else {
            return Err(RegistryError::Refused {
                registry: ask.registry().to_string(),
                repository: ask.location.repository.clone(),
                status: 401,
                with_credentials: false,
            });
        };
        let shared = cell(&mut self.lock().authorizations, key);
        let value = shared
            .get_or_init(|| async {
                self.authorize(ask, &challenge, cancel)
                    .await
                    .map_err(Arc::new)
            })
            .await
            .clone()
            .map_err(RegistryError::Earlier)?;
        let second = self
            .send_once(ask, method, path, accept, Some(&value))
            .await?;
        self.refused_or(ask, second, true).await
    }

    /// The answer, unless it refuses the login.
    async fn refused_or(
        &self,
        ask: &Ask<'_>,
        response: reqwest::Response,
        authorised: bool,
    ) -> Result<reqwest::Response, RegistryError> {
        let status = response.status();
        if status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN {
            return Ok(response);
        }
        let with_credentials = authorised
            && self
                .lock()
                .credentials
                .get(ask.registry())
                .and_then(|c| c.get())
                .is_some_and(|c| matches!(c, Ok(Some(_))));
        Err(RegistryError::Refused {
            registry: ask.registry().to_string(),
            repository: ask.location.repository.clone(),
            status: status.as_u16(),
            with_credentials,
        })
    }

    /// The user's credentials for the registry, looked up once per run.
    async fn credentials(
        &self,
        registry: &str,
        cancel: &Cancel,
    ) -> Result<Option<Credentials>, RegistryError> {
        let shared = cell(&mut self.lock().credentials, registry.to_string());
        shared
            .get_or_init(|| async {
                self.config
                    .credentials(registry, cancel)
                    .await
                    .map_err(|source| {
                        Arc::new(RegistryError::Credentials {
                            registry: registry.to_string(),
                            source,
                        })
                    })
            })
            .await
            .clone()
            .map_err(RegistryError::Earlier)
    }

    /// The `Authorization` value the challenge asks for.
    async fn authorize(
        &self,
        ask: &Ask<'_>,
        challenge: &Challenge,
        cancel: &Cancel,
    ) -> Result<String, RegistryError> {
        let registry = ask.registry();
        let credentials = self.credentials(registry, cancel).await?;
        let (realm, service) = match challenge {
            Challenge::Basic => {
                return match credentials {
                    Some(Credentials::Basic { username, password }) => {
                        Ok(basic(&username, &password))
                    }
                    _ => Err(RegistryError::Refused {
                        registry: registry.to_string(),
                        repository: ask.location.repository.clone(),
                        status: 401,
                        with_credentials: false,
                    }),
                }
            }
            Challenge::Bearer { realm, service } => (realm, service),
        };
        let token_error = |problem: String| RegistryError::Token {
            registry: registry.to_string(),
            realm: realm.clone(),
            problem,
        };
        let mut url = Url::parse(realm).map_err(|e| token_error(format!("not a URL: {e}")))?;
        let host = url_host(&url);
        match url.scheme() {
            "https" => {}
            "http" if self.plain_http_allowed(&host) => {}
            scheme => {
                return Err(token_error(format!(
                    "a realm over {scheme} (only HTTPS, or plain HTTP for loopback and insecure registries)"
                )))
            }
        }
        let scope = ask.scope();
        let mut form: Vec<(&str, &str)> = Vec::new();
        if let Some(service) = service {
            form.push(("service", service));
        }
        form.push(("scope", &scope));
        let request = match &credentials {
            // A refresh token is exchanged as OAuth2 asks (Docker's
            // `identitytoken`).
            Some(Credentials::IdentityToken(token)) => {
                form.extend([
                    ("grant_type", "refresh_token"),
                    ("client_id", "stack"),
                    ("refresh_token", token),
                ]);
                self.http
                    .post(url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(form_encoded(&form))
            }
            _ => {
                url.query_pairs_mut().extend_pairs(&form);
                let request = self.http.get(url);
                match &credentials {
                    Some(Credentials::Basic { username, password }) => {
                        request.header(AUTHORIZATION, basic(username, password))
                    }
                    _ => request,
                }
            }
        };
        self.count(&host);
        let response = request
            .send()
            .await
            .map_err(|e| token_error(crate::error_chain::error_chain(&e)))?;
        let status = response.status();
        let ask_token = Ask {
            location: ask.location,
            what: format!("a token from {realm}"),
        };
        let body = read_bounded(response, MAX_TOKEN_BYTES, &ask_token).await?;
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(RegistryError::Refused {
                registry: registry.to_string(),
                repository: ask.location.repository.clone(),
                status: status.as_u16(),
                with_credentials: credentials.is_some(),
            });
        }
        if !status.is_success() {
            return Err(token_error(format!("answered {status}")));
        }
        let answer: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|e| token_error(format!("unreadable answer: {e}")))?;
        answer
            .token
            .or(answer.access_token)
            .filter(|t| !t.is_empty())
            .map(|token| format!("Bearer {token}"))
            .ok_or_else(|| token_error("no token in its answer".to_string()))
    }

    /// One request, over HTTPS, or over plain HTTP where that is allowed
    /// and HTTPS failed; the scheme that answered is kept for the run.
    async fn send_once(
        &self,
        ask: &Ask<'_>,
        method: Method,
        path: &str,
        accept: Option<&str>,
        authorization: Option<&str>,
    ) -> Result<reqwest::Response, RegistryError> {
        let registry = ask.registry();
        let known = self.lock().schemes.get(registry).copied();
        let schemes: &[&'static str] = match known {
            Some("http") => &["http"],
            Some(_) => &["https"],
            None if self.plain_http_allowed(registry) => &["https", "http"],
            None => &["https"],
        };
        let mut failure = None;
        for &scheme in schemes {
            let url = format!("{scheme}://{registry}{path}");
            let mut request = self.http.request(method.clone(), &url);
            if let Some(accept) = accept {
                request = request.header(ACCEPT, accept);
            }
            if let Some(value) = authorization {
                request = request.header(AUTHORIZATION, value);
            }
            self.count(registry);
            match request.send().await {
                Ok(response) => {
                    self.lock().schemes.insert(registry.to_string(), scheme);
                    return Ok(response);
                }
                Err(err) => failure = Some((scheme, err)),
            }
        }
        let (tried, source) = failure.expect("at least one scheme is tried");
        Err(RegistryError::Unreachable {
            registry: registry.to_string(),
            tried: if schemes.len() > 1 {
                "https and http"
            } else {
                tried
            },
            source,
        })
    }

    fn count(&self, host: &str) {
        *self.lock().requests.entry(host.to_string()).or_default() += 1;
    }

    /// Loopback registries (127.0.0.0/8, ::1, localhost) and those the
    /// stack names insecure, as `host` (any port) or `host:port`.
    fn plain_http_allowed(&self, registry: &str) -> bool {
        let host = host_of(registry);
        let loopback = host == "localhost"
            || host
                .parse::<IpAddr>()
                .is_ok_and(|address| address.is_loopback());
        loopback
            || self
                .insecure
                .iter()
                .any(|entry| entry == registry || entry == host)
    }
}

/// Runs registry work unless the run is stopped first.
async fn stoppable<T>(
    location: &Location,
    cancel: &Cancel,
    work: impl std::future::Future<Output = Result<T, RegistryError>>,
) -> Result<T, RegistryError> {
    cancel
        .until(Level::Soon, work)
        .await
        .map_err(|source| RegistryError::Stopped {
            registry: location.registry.clone(),
            source,
        })?
}

/// The body, read up to `limit` bytes; more is an error.
async fn read_bounded(
    mut response: reqwest::Response,
    limit: usize,
    ask: &Ask<'_>,
) -> Result<Vec<u8>, RegistryError> {
    let too_large = || RegistryError::TooLarge {
        registry: ask.registry().to_string(),
        what: ask.what.clone(),
        limit,
    };
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(err) => return Err(malformed(ask, err)),
        }
    }
}

fn malformed(ask: &Ask<'_>, err: impl std::error::Error) -> RegistryError {
    RegistryError::Malformed {
        registry: ask.registry().to_string(),
        what: ask.what.clone(),
        problem: crate::error_chain::error_chain(&err),
    }
}

/// The error of an answer that is not a success: an unknown repository
/// (404, `NAME_UNKNOWN`), or the status with the registry's message.
fn status_error(ask: &Ask<'_>, status: StatusCode, body: &[u8], manifest: bool) -> RegistryError {
    let answer: Option<ErrorAnswer> =
        serde_json::from_slice(&body[..body.len().min(MAX_ERROR_BYTES)]).ok();
    let first = answer.as_ref().and_then(|a| a.errors.first());
    let code = first.map_or("", |e| e.code.as_str());
    if code == "NAME_UNKNOWN" || (status == StatusCode::NOT_FOUND && !manifest) {
        return RegistryError::UnknownRepository {
            registry: ask.registry().to_string(),
            repository: ask.location.repository.clone(),
        };
    }
    RegistryError::Status {
        registry: ask.registry().to_string(),
        what: ask.what.clone(),
        status: status.as_u16(),
        message: first.map_or(String::new(), |e| e.message.chars().take(200).collect()),
    }
}

/// The path and query of the `Link: <...>; rel="next"` page, resolved
/// against this page's URL; it must stay on the same registry.
fn next_page(headers: &HeaderMap, url: &Url) -> Result<Option<String>, String> {
    for value in headers.get_all(LINK) {
        let value = value
            .to_str()
            .map_err(|_| "a Link header that is not text".to_string())?;
        for link in value.split(',') {
            let Some((target, params)) = link.trim().split_once(';') else {
                continue;
            };
            let is_next = params.split(';').any(|p| {
                let p = p.trim().replace(' ', "");
                p == "rel=\"next\"" || p == "rel=next"
            });
            if !is_next {
                continue;
            }
            let target = target
                .trim()
                .strip_prefix('<')
                .and_then(|t| t.strip_suffix('>'))
                .ok_or_else(|| format!("a Link header {value:?} without <URL>"))?;
            let next = url
                .join(target)
                .map_err(|e| format!("a next page {target:?} that is not a URL: {e}"))?;
            if next.origin() != url.origin() {
                return Err(format!("a next page on another host: {next}"));
            }
            let mut path = next.path().to_string();
            if let Some(query) = next.query() {
                path.push('?');
                path.push_str(query);
            }
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// The first challenge of a `WWW-Authenticate` value that stack can
/// answer: `Bearer realm=...,service=...` or `Basic realm=...`.
fn parse_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let params = auth_params(rest);
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => Some(Challenge::Bearer {
            realm: params.get("realm")?.clone(),
            service: params.get("service").cloned(),
        }),
        _ => None,
    }
}

/// `key="quoted, \"value\"", key=token` as a map (keys lowercased).
fn auth_params(text: &str) -> HashMap<String, String> {
    let mut params = HashMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| *c == ',' || c.is_whitespace()).is_some() {}
        let key: String =
            std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ',')).collect();
        if key.is_empty() {
            return params;
        }
        if chars.next_if_eq(&'=').is_none() {
            continue;
        }
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect();
        }
        params.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
}

fn basic(username: &str, password: &str) -> String {
    let pair = format!("{username}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

/// `application/x-www-form-urlencoded` of the pairs.
fn form_encoded(pairs: &[(&str, &str)]) -> String {
    let mut url = Url::parse("http://form.invalid/").expect("a constant URL parses");
    url.query_pairs_mut().extend_pairs(pairs);
    url.query().unwrap_or_default().to_string()
}

/// `host[:port]` of a URL, as registries are named.
fn url_host(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    }
}

/// The host of `host[:port]` or `[v6]:port`, without brackets or port.
fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match registry.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => registry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_as_registries_write_them() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/couchdb:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".to_string(),
                service: Some("registry.docker.io".to_string()),
            })
        );
        assert_eq!(
            parse_challenge(r#"bearer realm="http://127.0.0.1:1/a, \"b\"""#),
            Some(Challenge::Bearer {
                realm: r#"http://127.0.0.1:1/a, "b""#.to_string(),
                service: None,
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge("Bearer service=x"),
            None,
            "a bearer challenge needs its realm"
        );
        assert_eq!(parse_challenge("Negotiate"), None);
    }

    #[test]
    fn next_pages_from_link_headers() {
        let url = Url::parse("http://127.0.0.1:5000/v2/couchdb/tags/list?n=2").unwrap();
        let headers = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(LINK, value.parse().unwrap());
            headers
        };
        assert_eq!(
            next_page(
                &headers(r#"</v2/couchdb/tags/list?last=b&n=2>; rel="next""#),
                &url
            ),
            Ok(Some("/v2/couchdb/tags/list?last=b&n=2".to_string()))
        );
        assert_eq!(
            next_page(
                &headers(r#"<http://127.0.0.1:5000/v2/couchdb/tags/list?last=c&n=2>; rel="next""#),
                &url
            ),
            Ok(Some("/v2/couchdb/tags/list?last=c&n=2".to_string()))
        );
        assert_eq!(next_page(&headers(r#"</x>; rel="prev""#), &url), Ok(None));
        assert_eq!(next_page(&HeaderMap::new(), &url), Ok(None));
        assert!(next_page(
            &headers(r#"<http://elsewhere.example/v2/x>; rel="next""#),
            &url
        )
        .is_err());
    }

    #[test]
    fn plain_http_only_for_loopback_and_insecure_registries() {
        let registries = Registries::new(
            DockerConfig::default(),
            &["registry.internal".to_string(), "10.0.0.5:5000".to_string()],
        )
        .unwrap();
        for allowed in [
            "127.0.0.1:5000",
            "127.1.2.3",
            "localhost:5000",
            "[::1]:5000",
            "registry.internal:443",
            "10.0.0.5:5000",
        ] {
            assert!(registries.plain_http_allowed(allowed), "{allowed}");
        }
        for refused in [
            "ghcr.io",
            "10.0.0.5:5001",
            "10.0.0.5",
            "registry.internal.example",
            "localhost.example:5000",
        ] {
            assert!(!registries.plain_http_allowed(refused), "{refused}");
        }
    }

    #[test]
    fn forms_and_basic_credentials_are_encoded() {
        assert_eq!(
            form_encoded(&[("scope", "repository:a/b:pull"), ("x", "a b")]),
            "scope=repository%3Aa%2Fb%3Apull&x=a+b"
        );
        assert_eq!(basic("user", "pass"), "Basic dXNlcjpwYXNz");
    }
}
