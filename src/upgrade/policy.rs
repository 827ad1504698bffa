//! Which tag a database may move to: from the current tag and a
//! registry's tags, under the database's upgrade rule. Pure: no registry
//! is asked here.
//!
//! A tag is a version when it is full semver (`major.minor.patch`, with
//! an optional pre-release and build) with an optional `v` before it;
//! candidates keep the current tag's prefix, are newer than it, stay
//! within the policy (patch: same major.minor; minor: same major; major:
//! any), meet the range and match the tag pattern; pre-releases count
//! only when the rule lets them. The highest wins.

use std::fmt;

use serde::Serialize;

use crate::model::{UpgradePolicy, UpgradeRule};

/// A tag read as a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagVersion {
    /// Whether the tag starts with `v`.
    pub prefixed: bool,
    pub version: semver::Version,
}

impl TagVersion {
    pub fn parse(tag: &str) -> Option<TagVersion> {
        let (prefixed, rest) = match tag.strip_prefix('v') {
            Some(rest) => (true, rest),
            None => (false, tag),
        };
        semver::Version::parse(rest)
            .ok()
            .map(|version| TagVersion { prefixed, version })
    }
}

/// Why a database has no candidate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum NoCandidate {
    /// Its rule's policy is `none`.
    PolicyNone,
    /// The image is pinned by digest alone: there is no version to move from.
    DigestOnly,
    /// The current tag (`latest` included) is not a version.
    NotAVersion { tag: String },
    /// No tag is newer within the rule; `newest` is the newest version
    /// the registry has, allowed or not.
    NothingNewer {
        policy: UpgradePolicy,
        newest: Option<String>,
    },
}

impl fmt::Display for NoCandidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoCandidate::PolicyNone => f.write_str("upgrade policy is none"),
            NoCandidate::DigestOnly => {
                f.write_str("pinned by digest alone: no tag to compare versions with")
            }
            NoCandidate::NotAVersion { tag } => write!(
                f,
                "current tag {tag} is not a version (major.minor.patch, optionally with a v)"
            ),
            NoCandidate::NothingNewer { policy, newest } => {
                let policy = format!("{policy:?}").to_lowercase();
                match newest {
                    Some(newest) => write!(
                        f,
                        "nothing newer allowed by policy {policy} and the rule (newest in the registry: {newest})"
                    ),
                    None => write!(f, "the registry has no version tags"),
                }
            }
        }
    }
}

/// The tag to move to from `current` (the image's tag; `None` for an
/// image pinned by digest alone), among `tags`, under `rule`.
pub fn choose(
    current: Option<&str>,
    tags: &[String],
    rule: &UpgradeRule,
) -> Result<String, NoCandidate> {
    if rule.policy == UpgradePolicy::None {
        return Err(NoCandidate::PolicyNone);
    }
    let current_tag = current.ok_or(NoCandidate::DigestOnly)?;
    let from = TagVersion::parse(current_tag).ok_or_else(|| NoCandidate::NotAVersion {
        tag: current_tag.to_string(),
    })?;
    let versions: Vec<(&String, TagVersion)> = tags
        .iter()
        .filter_map(|tag| TagVersion::parse(tag).map(|v| (tag, v)))
        .collect();
    let best = versions
        .iter()
        .filter(|(tag, v)| allowed(&from, tag, v, rule))
        .max_by(|(_, a), (_, b)| a.version.cmp(&b.version));
    match best {
        Some((tag, _)) => Ok((*tag).clone()),
        None => Err(NoCandidate::NothingNewer {
            policy: rule.policy,
            newest: versions
                .iter()
                .filter(|(_, v)| v.version.pre.is_empty() || rule.prerelease)
                .max_by(|(_, a), (_, b)| a.version.cmp(&b.version))
                .map(|(tag, _)| (*tag).clone()),
        }),
    }
}

fn allowed(from: &TagVersion, tag: &str, to: &TagVersion, rule: &UpgradeRule) -> bool {
    let (a, b) = (&from.version, &to.version);
    let within = match rule.policy {
        UpgradePolicy::None => false,
        UpgradePolicy::Patch => a.major == b.major && a.minor == b.minor,
        UpgradePolicy::Minor => a.major == b.major,
        UpgradePolicy::Major => true,
    };
    let in_range = rule.range.as_ref().is_none_or(|range| {
        range.0.matches(b)
            || (rule.prerelease && {
                // semver's requirements take a pre-release only when a
                // comparator names the same major.minor.patch; asked for
                // pre-releases, the range is met by their release.
                let mut release = b.clone();
                release.pre = semver::Prerelease::EMPTY;
                range.0.matches(&release)
            })
    });
    to.prefixed == from.prefixed
        && b > a
        && within
        && (b.pre.is_empty() || rule.prerelease)
        && in_range
        && rule
            .tags
            .as_ref()
            .is_none_or(|pattern| pattern.matches(tag))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::values::{TagPattern, VersionRange};

    fn tag_list(list: &[&str]) -> Vec<String> {
        list.iter().map(|t| t.to_string()).collect()
    }

    /// The issue's registry.
    fn issue_tags() -> Vec<String> {
        tag_list(&[
            "3.4.9",
            "3.5.1",
            "3.5.2",
            "3.5.3-rc.1",
            "3.6.0",
            "3.6.1",
            "4.0.0",
            "latest",
        ])
    }

    fn rule(policy: UpgradePolicy) -> UpgradeRule {
        UpgradeRule::policy(policy)
    }

    #[test]
    fn patch_minor_and_major_from_3_5_0() {
        let tags = issue_tags();
        let chosen = |policy| choose(Some("3.5.0"), &tags, &rule(policy));
        assert_eq!(chosen(UpgradePolicy::Patch), Ok("3.5.2".to_string()));
        assert_eq!(chosen(UpgradePolicy::Minor), Ok("3.6.1".to_string()));
        assert_eq!(chosen(UpgradePolicy::Major), Ok("4.0.0".to_string()));
        assert_eq!(chosen(UpgradePolicy::None), Err(NoCandidate::PolicyNone));
    }

    #[test]
    fn pre_releases_only_when_asked() {
        let tags = issue_tags();
        let mut patch = rule(UpgradePolicy::Patch);
        patch.prerelease = true;
        assert_eq!(
            choose(Some("3.5.0"), &tags, &patch),
            Ok("3.5.3-rc.1".to_string())
        );
        let mut ranged = patch.clone();
        ranged.range = Some(VersionRange::parse("<3.5.3").unwrap());
        assert_eq!(
            choose(Some("3.5.0"), &tags, &ranged),
            Ok("3.5.2".to_string())
        );
        ranged.range = Some(VersionRange::parse(">=3.5, <3.6").unwrap());
        assert_eq!(
            choose(Some("3.5.0"), &tags, &ranged),
            Ok("3.5.3-rc.1".to_string())
        );
        // From the pre-release itself, its release is newer.
        let with_release = [tags.clone(), vec!["3.5.3".to_string()]].concat();
        assert_eq!(
            choose(
                Some("3.5.3-rc.1"),
                &with_release,
                &rule(UpgradePolicy::Patch)
            ),
            Ok("3.5.3".to_string())
        );
    }

    #[test]
    fn range_and_pattern_narrow_the_policy() {
        let tags = issue_tags();
        let mut major = rule(UpgradePolicy::Major);
        major.range = Some(VersionRange::parse(">=3.5, <4").unwrap());
        assert_eq!(
            choose(Some("3.5.0"), &tags, &major),
            Ok("3.6.1".to_string())
        );
        major.range = None;
        major.tags = Some(TagPattern::parse(r"3\.5\.\d+").unwrap());
        assert_eq!(
            choose(Some("3.5.0"), &tags, &major),
            Ok("3.5.2".to_string())
        );
        major.tags = Some(TagPattern::parse(r"3\.6\.0").unwrap());
        assert_eq!(
            choose(Some("3.5.0"), &tags, &major),
            Ok("3.6.0".to_string())
        );
        major.range = Some(VersionRange::parse("<3").unwrap());
        assert_eq!(
            choose(Some("3.5.0"), &tags, &major),
            Err(NoCandidate::NothingNewer {
                policy: UpgradePolicy::Major,
                newest: Some("4.0.0".to_string())
            })
        );
    }

    #[test]
    fn no_candidate_and_why() {
        let tags = issue_tags();
        let patch = rule(UpgradePolicy::Patch);
        assert_eq!(
            choose(Some("latest"), &tags, &patch),
            Err(NoCandidate::NotAVersion {
                tag: "latest".to_string()
            })
        );
        assert_eq!(choose(None, &tags, &patch), Err(NoCandidate::DigestOnly));
        let newest = Err(NoCandidate::NothingNewer {
            policy: UpgradePolicy::Patch,
            newest: Some("4.0.0".to_string()),
        });
        assert_eq!(choose(Some("4.0.0"), &tags, &patch), newest);
        assert_eq!(
            choose(Some("3.6.1"), &tags, &patch)
                .unwrap_err()
                .to_string(),
            "nothing newer allowed by policy patch and the rule (newest in the registry: 4.0.0)"
        );
        assert!(matches!(
            choose(Some("1.0.0"), &tag_list(&["latest", "edge"]), &patch),
            Err(NoCandidate::NothingNewer { newest: None, .. })
        ));
        // Two-part tags are not full semver.
        assert!(matches!(
            choose(Some("3.5"), &tags, &patch),
            Err(NoCandidate::NotAVersion { .. })
        ));
    }

    #[test]
    fn candidates_keep_the_prefix_and_ignore_other_tags() {
        let tags = tag_list(&[
            "v8.4.0",
            "v8.4.1",
            "8.4.2",
            "v8.4.1-slim",
            "v8.5.0",
            "8.4.3-beta",
        ]);
        let patch = rule(UpgradePolicy::Patch);
        assert_eq!(
            choose(Some("v8.4.0"), &tags, &patch),
            Ok("v8.4.1".to_string())
        );
        assert_eq!(
            choose(Some("8.4.0"), &tags, &patch),
            Ok("8.4.2".to_string())
        );
        let minor = rule(UpgradePolicy::Minor);
        assert_eq!(
            choose(Some("v8.4.0"), &tags, &minor),
            Ok("v8.5.0".to_string())
        );
        assert_eq!(
            TagVersion::parse("v1.2.3+build.5").map(|v| v.prefixed),
            Some(true)
        );
        assert_eq!(TagVersion::parse("01.2.3"), None);
    }
}
