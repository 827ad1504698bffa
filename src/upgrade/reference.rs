//! Where an image lives: the registry host and the repository path the
//! distribution API takes, after Docker's normalisation of the short
//! names people write (`couchdb:3.5.1` is `library/couchdb` on Docker
//! Hub), and the digest-pinned reference a pod spec is given.

use serde::Serialize;

use crate::model::ImageRef;

/// The host that serves Docker Hub's distribution API.
pub const DOCKER_HUB: &str = "registry-1.docker.io";
/// The names people and tools give Docker Hub in image references.
const DOCKER_HUB_ALIASES: [&str; 3] = ["docker.io", "index.docker.io", DOCKER_HUB];

/// An image's registry and repository as the distribution API names them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Location {
    /// `host[:port]`; Docker Hub is `registry-1.docker.io`.
    pub registry: String,
    /// The repository path, `library/` added to Docker Hub's one-word names.
    pub repository: String,
}

impl Location {
    pub fn of(image: &ImageRef) -> Location {
        let path = image.path();
        match image.registry_host() {
            Some(host) if !is_docker_hub(host) => Location {
                registry: host.to_string(),
                repository: path.to_string(),
            },
            _ => Location {
                registry: DOCKER_HUB.to_string(),
                repository: if path.contains('/') {
                    path.to_string()
                } else {
                    format!("library/{path}")
                },
            },
        }
    }

    pub fn is_docker_hub(&self) -> bool {
        self.registry == DOCKER_HUB
    }
}

/// Whether a registry name (as written in an image or a Docker config
/// key) is Docker Hub.
pub fn is_docker_hub(host: &str) -> bool {
    DOCKER_HUB_ALIASES.contains(&host)
}

/// The image at `tag`, pinned by `digest`, as a pod spec takes it
/// (`REPO:TAG@sha256:...`), with the user's spelling of the registry and
/// repository.
pub fn pinned(image: &ImageRef, tag: &str, digest: &str) -> String {
    format!("{}:{tag}@{digest}", image.repository)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(text: &str) -> (String, String) {
        let location = Location::of(&ImageRef::parse(text).unwrap());
        (location.registry, location.repository)
    }

    #[test]
    fn short_names_are_docker_hub_and_a_host_is_its_own_registry() {
        let hub = |repository: &str| (DOCKER_HUB.to_string(), repository.to_string());
        assert_eq!(location("couchdb:3.5.1"), hub("library/couchdb"));
        assert_eq!(location("franzinc/agraph:v8.4.0"), hub("franzinc/agraph"));
        assert_eq!(location("docker.io/couchdb"), hub("library/couchdb"));
        assert_eq!(
            location("index.docker.io/codenotary/immudb:1.11.0"),
            hub("codenotary/immudb")
        );
        let digest = format!("sha256:{}", "a".repeat(64));
        let local = format!("127.0.0.1:5000/couchdb:3.5.2@{digest}");
        assert_eq!(
            location(&local),
            ("127.0.0.1:5000".to_string(), "couchdb".to_string())
        );
        assert_eq!(
            location("localhost/team/app"),
            ("localhost".to_string(), "team/app".to_string())
        );
        assert_eq!(
            location("ghcr.io/org/db:1.0.0"),
            ("ghcr.io".to_string(), "org/db".to_string())
        );
        // A first component without `.` or `:` is a path, not a host.
        assert_eq!(location("team/app:1"), hub("team/app"));
    }

    #[test]
    fn pinned_keeps_the_users_spelling() {
        let image = ImageRef::parse("couchdb:3.5.0").unwrap();
        let digest = format!("sha256:{}", "b".repeat(64));
        let pinned = pinned(&image, "3.5.2", &digest);
        assert_eq!(pinned, format!("couchdb:3.5.2@{digest}"));
        assert!(ImageRef::parse(&pinned).is_ok());
    }
}
