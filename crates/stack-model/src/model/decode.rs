//! Decodes the positioned YAML tree into the as-written model, collecting
//! every type error (unknown keys, wrong types, missing fields, bad formats)
//! instead of stopping at the first.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use super::file::*;
use super::stack::{Accel, Addon, BaseImage, DatabaseKind, Protocol, Role, StorageKind};
use super::stack::{TcpExposure, UpgradePolicy};
use super::text::control_name;
use super::values::{self, ByteSize, Checksum, HashAlgorithm, ImageRef};
use super::yaml::{shown, Node, Pos, Value};
use crate::diag::Diagnostics;

/// The only stack file version this build reads.
pub const VERSION: u32 = 1;

/// The longest tag name and value EC2 takes, in characters.
const TAG_NAME_MAX: usize = 128;
const TAG_VALUE_MAX: usize = 256;
/// The characters besides letters, digits and spaces that tags may hold
/// everywhere on AWS.
const TAG_PUNCTUATION: &str = "+-=._:/@";

pub fn decode(root: &Node, diags: &mut Diagnostics) -> Option<StackFile> {
    Decoder { diags }.stack(root)
}

struct Decoder<'d> {
    diags: &'d mut Diagnostics,
}

/// The fields of one mapping, checked against the keys it may have.
struct Fields<'n> {
    pos: Pos,
    entries: Vec<(&'n str, Pos, &'n Node)>,
}

impl<'n> Fields<'n> {
    /// A present, non-null field.
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _, v)| *k == key && v.value != Value::Null)
            .map(|(_, _, v)| *v)
    }

    /// Where the key was written, for diagnostics about a whole section.
    fn key_pos(&self, key: &str) -> Option<Pos> {
        self.entries
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, pos, _)| *pos)
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.to_lowercase().chars().collect();
    let b: Vec<char> = b.to_lowercase().chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

fn one_of(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

impl Decoder<'_> {
    fn error(&mut self, node: &Node, path: &str, expected: impl Into<String>) {
        let found = node.kind_name();
        self.diags.push(node.pos, path, expected, found);
    }

    fn mapping<'n>(&mut self, node: &'n Node, path: &str, keys: &[&str]) -> Option<Fields<'n>> {
        let Value::Map(entries) = &node.value else {
            self.error(node, path, "a mapping");
            return None;
        };
        let mut fields = Fields {
            pos: node.pos,
            entries: Vec::new(),
        };
        for (key, value) in entries {
            let Value::Scalar { text, .. } = &key.value else {
                self.error(key, path, "a field name");
                continue;
            };
            let key_path = join(path, text);
            if !keys.contains(&text.as_str()) {
                let suggestion = keys
                    .iter()
                    .filter(|k| edit_distance(k, text) <= 2)
                    .min_by_key(|k| edit_distance(k, text));
                let text = shown(text);
                let found = match suggestion {
                    Some(s) => format!("unknown field `{text}` (did you mean `{s}`?)"),
                    None => format!("unknown field `{text}`"),
                };
                self.diags.push(
                    key.pos,
                    &key_path,
                    format!("one of {}", one_of(keys)),
                    found,
                );
                continue;
            }
            if fields.entries.iter().any(|(k, _, _)| k == text) {
                self.diags.push(
                    key.pos,
                    &key_path,
                    "each field once",
                    format!("`{text}` again"),
                );
                continue;
            }
            fields.entries.push((text.as_str(), key.pos, value));
        }
        Some(fields)
    }

    fn required<'n>(
        &mut self,
        fields: &Fields<'n>,
        path: &str,
        key: &str,
        what: &str,
    ) -> Option<&'n Node> {
        let node = fields.get(key);
        if node.is_none() {
            match fields.key_pos(key) {
                Some(pos) => self.diags.push(
                    pos,
                    &join(path, key),
                    format!("a value for `{key}` ({what})"),
                    "nothing",
                ),
                None => self.diags.push(
                    fields.pos,
                    &join(path, key),
                    format!("a required field `{key}` ({what})"),
                    format!("no `{key}`"),
                ),
            }
        }
        node
    }

    fn string(&mut self, node: &Node, path: &str) -> Option<Spanned<String>> {
        match &node.value {
            Value::Scalar { text, quoted } => {
                if !quoted && matches!(text.as_str(), "true" | "false") {
                    self.error(node, path, "a string (quote it to mean the word)");
                    return None;
                }
                // Written as escapes in quoted strings; the file itself holds none.
                if let Some((i, c)) = text
                    .chars()
                    .enumerate()
                    .find(|(_, c)| c.is_control() && !matches!(c, '\t' | '\n'))
                {
                    self.diags.push(
                        node.pos,
                        path,
                        "a string without control characters (tab and newline are the only ones allowed)",
                        format!("{} as character {} of {}", control_name(c), i + 1, node.kind_name()),
                    );
                    return None;
                }
                Some(Spanned {
                    value: text.clone(),
                    pos: node.pos,
                })
            }
            _ => {
                self.error(node, path, "a string");
                None
            }
        }
    }

    fn parsed<T>(
        &mut self,
        node: &Node,
        path: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<Spanned<T>> {
        let text = self.string(node, path)?;
        match parse(&text.value) {
            Ok(value) => Some(Spanned {
                value,
                pos: node.pos,
            }),
            Err(expected) => {
                self.error(node, path, expected);
                None
            }
        }
    }

    fn dns_label(&mut self, node: &Node, path: &str, max: usize) -> Option<Spanned<String>> {
        self.parsed(node, path, |text| {
            if values::is_dns_label(text, max) {
                Ok(text.to_string())
            } else {
                Err(format!(
                    "a name of lowercase letters, digits and '-', starting with a letter, at most {max} characters"
                ))
            }
        })
    }

    fn integer(&mut self, node: &Node, path: &str, min: u32, max: u32) -> Option<Spanned<u32>> {
        let expected = format!("a whole number from {min} to {max}");
        match &node.value {
            Value::Scalar {
                text,
                quoted: false,
            } => match text.parse::<i64>() {
                Ok(n) if (i64::from(min)..=i64::from(max)).contains(&n) => Some(Spanned {
                    value: n as u32,
                    pos: node.pos,
                }),
                _ => {
                    self.error(node, path, expected);
                    None
                }
            },
            _ => {
                self.error(node, path, expected);
                None
            }
        }
    }

    fn boolean(&mut self, node: &Node, path: &str) -> Option<Spanned<bool>> {
        match &node.value {
            Value::Scalar {
                text,
                quoted: false,
            } if text == "true" || text == "false" => Some(Spanned {
                value: text == "true",
                pos: node.pos,
            }),
            _ => {
                self.error(node, path, "`true` or `false`");
                None
            }
        }
    }

    fn choice<T: Copy>(
        &mut self,
        node: &Node,
        path: &str,
        choices: &[(&str, T)],
    ) -> Option<Spanned<T>> {
        let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
        let expected = one_of(&names);
        self.parsed(node, path, |text| {
            choices
                .iter()
                .find(|(name, _)| *name == text)
                .map(|(_, value)| *value)
                .ok_or_else(|| expected.clone())
        })
    }

    fn list<T>(
        &mut self,
        node: &Node,
        path: &str,
        mut item: impl FnMut(&mut Self, &Node, &str) -> Option<T>,
    ) -> Option<Spanned<Vec<T>>> {
        let Value::Seq(items) = &node.value else {
            self.error(node, path, "a list");
            return None;
        };
        // Items that failed are left out (their errors are reported), so
        // the rest can still be checked against each other.
        let out = items
            .iter()
            .enumerate()
            .filter_map(|(i, child)| item(self, child, &format!("{path}[{i}]")))
            .collect();
        Some(Spanned {
            value: out,
            pos: node.pos,
        })
    }

    fn size(&mut self, node: &Node, path: &str) -> Option<Spanned<ByteSize>> {
        self.parsed(node, path, ByteSize::parse)
    }

    fn cidr(&mut self, node: &Node, path: &str) -> Option<Spanned<ipnet::IpNet>> {
        self.parsed(node, path, |text| {
            text.parse::<ipnet::IpNet>()
                .map_err(|_| "a CIDR block such as 10.0.0.0/16".to_string())
        })
    }

    fn cidrs(&mut self, node: &Node, path: &str) -> Option<Spanned<Vec<Spanned<ipnet::IpNet>>>> {
        self.list(node, path, |d, child, p| d.cidr(child, p))
    }

    fn duration(&mut self, node: &Node, path: &str) -> Option<Spanned<std::time::Duration>> {
        self.parsed(node, path, values::parse_duration)
    }

    fn opt<T>(
        &mut self,
        fields: &Fields,
        path: &str,
        key: &str,
        decode: impl FnOnce(&mut Self, &Node, &str) -> Option<T>,
    ) -> Option<T> {
        let node = fields.get(key)?;
        decode(self, node, &join(path, key))
    }

    /// A top-level section, positioned at its key so messages about the
    /// whole section point at its name.
    fn section<T>(
        &mut self,
        fields: &Fields,
        key: &str,
        decode: impl FnOnce(&mut Self, &Node, &str) -> Option<Spanned<T>>,
    ) -> Option<Spanned<T>> {
        let pos = fields.key_pos(key)?;
        self.opt(fields, "", key, decode).map(|section| Spanned {
            value: section.value,
            pos,
        })
    }

    fn stack(&mut self, root: &Node) -> Option<StackFile> {
        if root.value == Value::Null {
            self.diags.push(
                root.pos,
                "",
                "a stack: a mapping with `version`, `name`, `provider` and `nodes`",
                "an empty file",
            );
            return None;
        }
        let f = self.mapping(
            root,
            "",
            &[
                "version",
                "name",
                "provider",
                "network",
                "nodes",
                "kubernetes",
                "databases",
                "ingress",
                "monitoring",
                "upgrades",
                "timeouts",
                "tags",
                "ttl",
                "state",
            ],
        )?;
        if let Some(node) = self.required(&f, "", "version", "the stack file version, 1") {
            if let Some(v) = self.integer(node, "version", 1, u32::MAX) {
                if v.value != VERSION {
                    self.diags.push(
                        node.pos,
                        "version",
                        format!("version {VERSION}, the one this build of stack reads"),
                        format!("version {}", v.value),
                    );
                }
            }
        }
        let name = self
            .required(&f, "", "name", "the stack's name")
            .and_then(|n| self.dns_label(n, "name", 40));
        let provider = f
            .get("provider")
            .and_then(|n| self.provider(n))
            .map(|p| Spanned {
                pos: f.key_pos("provider").unwrap_or(p.pos),
                value: p.value,
            });
        let provider_failed = f.key_pos("provider").is_some() && provider.is_none();
        for (key, needs) in [
            ("provider", "the provider's settings, `ec2: …` or `kvm: …`"),
            ("nodes", "the node groups, a list"),
        ] {
            if let (Some(pos), None) = (f.key_pos(key), f.get(key)) {
                self.diags.push(pos, key, needs, "nothing");
            }
        }
        let network = self.opt(&f, "", "network", Self::network);
        let nodes = self.section(&f, "nodes", |d, n, p| {
            d.list(n, p, |d, child, p| d.node_group(child, p))
        });
        let kubernetes = self.section(&f, "kubernetes", Self::kubernetes);
        let databases = self.section(&f, "databases", |d, n, p| {
            d.list(n, p, |d, child, p| d.database(child, p))
        });
        let ingress = self.section(&f, "ingress", Self::ingress);
        let monitoring = self.section(&f, "monitoring", Self::monitoring);
        let upgrades = self.section(&f, "upgrades", Self::upgrades);
        let timeouts = self.opt(&f, "", "timeouts", Self::timeouts);
        let tags = self.section(&f, "tags", Self::tags);
        let ttl = self.opt(&f, "", "ttl", |d, n, p| d.parsed(n, p, values::parse_ttl));
        let state = self.section(&f, "state", Self::state);
        if provider_failed {
            return None;
        }
        Some(StackFile {
            pos: f.pos,
            name: name?,
            provider,
            network,
            nodes,
            kubernetes,
            databases,
            ingress,
            monitoring,
            upgrades,
            timeouts,
            tags,
            ttl,
            state,
        })
    }

    /// `state: {backend: local}` or `state: {backend: postgres, url: …}`.
    fn state(&mut self, node: &Node, path: &str) -> Option<Spanned<StateFile>> {
        let f = self.mapping(node, path, &["backend", "url"])?;
        let backend = self.opt(&f, path, "backend", |d, n, p| {
            d.choice(
                n,
                p,
                &[
                    ("local", StateBackendKind::Local),
                    ("postgres", StateBackendKind::Postgres),
                ],
            )
        });
        let url = self.opt(&f, path, "url", |d, n, p| {
            let text = d.string(n, p)?;
            match values::check_postgres_url(&text.value) {
                Ok(()) => Some(text),
                Err(expected) => {
                    // A password written here is not shown again.
                    let found = format!("`{}`", values::without_password(&text.value));
                    d.diags.push(n.pos, p, expected, found);
                    None
                }
            }
        });
        let url_path = join(path, "url");
        match (backend.as_ref().map(|b| b.value), &url) {
            (None, _) if f.get("backend").is_none() => {
                self.diags.push(
                    node.pos,
                    &join(path, "backend"),
                    "the backend, `local` or `postgres`",
                    "nothing",
                );
            }
            (Some(StateBackendKind::Postgres), None) if f.get("url").is_none() => {
                self.diags.push(
                    backend.as_ref().map_or(node.pos, |b| b.pos),
                    &url_path,
                    "the PostgreSQL database's URL (postgres://USER@HOST:PORT/DATABASE)",
                    "nothing",
                );
            }
            (Some(StateBackendKind::Local), Some(url)) => {
                self.diags.push(
                    url.pos,
                    &url_path,
                    "no url for the local backend (it keeps the state next to the stack file)",
                    "a url",
                );
            }
            _ => {}
        }
        Some(Spanned {
            value: StateFile { backend, url },
            pos: node.pos,
        })
    }

    fn provider(&mut self, node: &Node) -> Option<Spanned<ProviderFile>> {
        let f = self.mapping(node, "provider", &["ec2", "kvm"])?;
        let value = match (f.get("ec2"), f.get("kvm")) {
            (Some(_), Some(kvm)) => {
                self.diags.push(
                    kvm.pos,
                    "provider.kvm",
                    "exactly one provider, `ec2` or `kvm`",
                    "both `ec2` and `kvm`",
                );
                return None;
            }
            (Some(ec2), None) => ProviderFile::Ec2(Box::new(self.ec2(ec2, "provider.ec2")?)),
            (None, Some(kvm)) => ProviderFile::Kvm(self.kvm(kvm, "provider.kvm")?),
            (None, None) => {
                // `ec2: {}` written as `ec2:` is null: that still picks the provider.
                match f.entries.first() {
                    Some(("ec2", _, _)) => ProviderFile::Ec2(Box::default()),
                    Some(("kvm", _, _)) => ProviderFile::Kvm(KvmFile::default()),
                    _ => {
                        let empty = matches!(&node.value, Value::Map(m) if m.is_empty());
                        self.diags.push(
                            node.pos,
                            "provider",
                            "one provider, `ec2` or `kvm`",
                            if empty {
                                "an empty mapping"
                            } else {
                                "no provider"
                            },
                        );
                        return None;
                    }
                }
            }
        };
        Some(Spanned {
            value,
            pos: node.pos,
        })
    }

    fn ec2(&mut self, node: &Node, path: &str) -> Option<Ec2File> {
        let f = self.mapping(
            node,
            path,
            &[
                "region",
                "profile",
                "endpoint",
                "vpcId",
                "subnetId",
                "ami",
                "instanceType",
                "sshUser",
                "maxRetries",
            ],
        )?;
        Some(Ec2File {
            region: self.opt(&f, path, "region", Self::string),
            profile: self.opt(&f, path, "profile", Self::string),
            endpoint: self.opt(&f, path, "endpoint", |d, n, p| {
                d.parsed(n, p, |text| {
                    if (text.starts_with("http://") || text.starts_with("https://"))
                        && text.len() > "https://".len()
                    {
                        Ok(text.trim_end_matches('/').to_string())
                    } else {
                        Err("an http:// or https:// URL".to_string())
                    }
                })
            }),
            vpc_id: self.opt(&f, path, "vpcId", |d, n, p| d.aws_id(n, p, "vpc")),
            subnet_id: self.opt(&f, path, "subnetId", |d, n, p| d.aws_id(n, p, "subnet")),
            ami: self.opt(&f, path, "ami", |d, n, p| d.aws_id(n, p, "ami")),
            instance_type: self.opt(&f, path, "instanceType", Self::instance_type),
            ssh_user: self.opt(&f, path, "sshUser", |d, n, p| d.dns_label(n, p, 32)),
            max_retries: self.opt(&f, path, "maxRetries", |d, n, p| d.integer(n, p, 0, 100)),
        })
    }

    fn aws_id(&mut self, node: &Node, path: &str, prefix: &str) -> Option<Spanned<String>> {
        self.parsed(node, path, |text| {
            let hex = text.strip_prefix(prefix).and_then(|t| t.strip_prefix('-'));
            match hex {
                Some(hex)
                    if (hex.len() == 8 || hex.len() == 17)
                        && hex.chars().all(|c| c.is_ascii_hexdigit()) =>
                {
                    Ok(text.to_string())
                }
                _ => Err(format!("an id such as {prefix}-0123456789abcdef0")),
            }
        })
    }

    fn instance_type(&mut self, node: &Node, path: &str) -> Option<Spanned<String>> {
        self.parsed(node, path, |text| match text.split_once('.') {
            Some((family, size))
                if !family.is_empty()
                    && !size.is_empty()
                    && text.chars().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-'
                    }) =>
            {
                Ok(text.to_string())
            }
            _ => Err("an EC2 instance type such as t3.medium".to_string()),
        })
    }

    fn kvm(&mut self, node: &Node, path: &str) -> Option<KvmFile> {
        let f = self.mapping(node, path, &["accel", "sshUser"])?;
        Some(KvmFile {
            accel: self.opt(&f, path, "accel", |d, n, p| {
                d.choice(
                    n,
                    p,
                    &[
                        ("auto", Accel::Auto),
                        ("kvm", Accel::Kvm),
                        ("tcg", Accel::Tcg),
                    ],
                )
            }),
            ssh_user: self.opt(&f, path, "sshUser", |d, n, p| d.dns_label(n, p, 32)),
        })
    }

    fn network(&mut self, node: &Node, path: &str) -> Option<NetworkFile> {
        let f = self.mapping(node, path, &["cidr", "allowedCidrs", "ingressCidrs"])?;
        Some(NetworkFile {
            cidr: self.opt(&f, path, "cidr", Self::cidr),
            allowed_cidrs: self.opt(&f, path, "allowedCidrs", Self::cidrs),
            ingress_cidrs: self.opt(&f, path, "ingressCidrs", Self::cidrs),
        })
    }

    fn node_group(&mut self, node: &Node, path: &str) -> Option<NodeGroupFile> {
        let f = self.mapping(
            node,
            path,
            &[
                "name",
                "count",
                "role",
                "disk",
                "instanceType",
                "ami",
                "subnetId",
                "cpus",
                "memory",
                "image",
                "runcmd",
                "userData",
            ],
        )?;
        let name = self
            .required(&f, path, "name", "the node group's name")
            .and_then(|n| self.dns_label(n, &join(path, "name"), 30));
        let count = self.opt(&f, path, "count", |d, n, p| d.integer(n, p, 1, 100));
        let role = self.opt(&f, path, "role", |d, n, p| {
            d.choice(
                n,
                p,
                &[("control", Role::Control), ("worker", Role::Worker)],
            )
        });
        let disk = self.opt(&f, path, "disk", Self::size);
        let instance_type = self.opt(&f, path, "instanceType", Self::instance_type);
        let ami = self.opt(&f, path, "ami", |d, n, p| d.aws_id(n, p, "ami"));
        let subnet_id = self.opt(&f, path, "subnetId", |d, n, p| d.aws_id(n, p, "subnet"));
        let cpus = self.opt(&f, path, "cpus", |d, n, p| d.integer(n, p, 1, 64));
        let memory = self.opt(&f, path, "memory", Self::size);
        let image = self.opt(&f, path, "image", Self::base_image);
        let runcmd = self.opt(&f, path, "runcmd", |d, n, p| d.list(n, p, Self::string));
        let user_data = self.opt(&f, path, "userData", |d, n, p| {
            d.string(n, p).map(|s| Spanned {
                value: PathBuf::from(s.value),
                pos: s.pos,
            })
        });
        let group = NodeGroupFile {
            pos: node.pos,
            name: name?,
            count,
            role,
            disk,
            instance_type,
            ami,
            subnet_id,
            cpus,
            memory,
            image,
            runcmd,
            user_data,
        };
        Some(group)
    }

    /// An image download's checksum: `sha256` or `sha512`, exactly one.
    fn checksum(&mut self, f: &Fields, path: &str) -> Option<Checksum> {
        let given: Vec<(HashAlgorithm, &Node)> = HashAlgorithm::ALL
            .into_iter()
            .filter_map(|a| Some((a, f.get(a.name())?)))
            .collect();
        match given.as_slice() {
            [(algorithm, value)] => {
                let key = join(path, algorithm.name());
                self.parsed(value, &key, |t| Checksum::parse(*algorithm, t))
                    .map(|c| c.value)
            }
            [] => {
                self.diags.push(
                    f.pos,
                    &join(path, "sha256"),
                    "a required field `sha256` or `sha512` (the image's checksum, to verify the download)",
                    "neither",
                );
                None
            }
            _ => {
                self.diags.push(
                    given[1].1.pos,
                    path,
                    "one checksum, `sha256` or `sha512`",
                    "both",
                );
                None
            }
        }
    }

    fn base_image(&mut self, node: &Node, path: &str) -> Option<Spanned<BaseImage>> {
        let f = self.mapping(
            node,
            path,
            &["url", "sha256", "sha512", "path", "kernel", "initrd"],
        )?;
        let boot_file = |d: &mut Self, key: &str| -> Option<PathBuf> {
            let node = f.get(key)?;
            d.string(node, &join(path, key))
                .map(|s| PathBuf::from(s.value))
        };
        let (kernel, initrd) = (boot_file(self, "kernel"), boot_file(self, "initrd"));
        if kernel.is_some() != initrd.is_some() {
            self.diags.push(
                node.pos,
                path,
                "`kernel` and `initrd` together (to boot a root file system directly)",
                if kernel.is_some() {
                    "`kernel` without `initrd`"
                } else {
                    "`initrd` without `kernel`"
                },
            );
        }

        let value = match (f.get("url"), f.get("path")) {
            (Some(url), None) => {
                let url = self.parsed(url, &join(path, "url"), |t| {
                    if t.starts_with("https://") || t.starts_with("http://") {
                        Ok(t.to_string())
                    } else {
                        Err("an http:// or https:// URL".to_string())
                    }
                });
                let sha = self.checksum(&f, path);
                BaseImage::Url {
                    url: url?.value,
                    checksum: sha?,
                    kernel,
                    initrd,
                }
            }
            (None, Some(local)) => {
                for algorithm in HashAlgorithm::ALL {
                    if let Some(sha) = f.get(algorithm.name()) {
                        self.diags.push(
                            sha.pos,
                            &join(path, algorithm.name()),
                            format!("`{}` only with `url`", algorithm.name()),
                            format!("`{}` with `path`", algorithm.name()),
                        );
                    }
                }
                BaseImage::Path {
                    path: PathBuf::from(self.string(local, &join(path, "path"))?.value),
                    kernel,
                    initrd,
                }
            }
            _ => {
                self.diags.push(
                    node.pos,
                    path,
                    "either `url` with `sha256` or `sha512`, or `path`",
                    if f.get("url").is_some() {
                        "both `url` and `path`"
                    } else {
                        "neither"
                    },
                );
                return None;
            }
        };
        Some(Spanned {
            value,
            pos: node.pos,
        })
    }

    fn kubernetes(&mut self, node: &Node, path: &str) -> Option<Spanned<KubernetesFile>> {
        let f = self.mapping(
            node,
            path,
            &[
                "channel",
                "addons",
                "storage",
                "kubeconfig",
                "context",
                "namespace",
                "manifests",
            ],
        )?;
        let value = KubernetesFile {
            channel: self.opt(&f, path, "channel", |d, n, p| {
                d.parsed(n, p, |t| {
                    let ok = t.split_once('/').is_some_and(|(version, risk)| {
                        version.split_once('.').is_some_and(|(major, minor)| {
                            major == "1"
                                && !minor.is_empty()
                                && minor.chars().all(|c| c.is_ascii_digit())
                        }) && matches!(risk, "stable" | "candidate" | "beta" | "edge")
                    });
                    if ok {
                        Ok(t.to_string())
                    } else {
                        Err("a microk8s channel such as 1.32/stable".to_string())
                    }
                })
            }),
            addons: self.opt(&f, path, "addons", |d, n, p| {
                d.list(n, p, |d, n, p| {
                    d.choice(
                        n,
                        p,
                        &[
                            ("dns", Addon::Dns),
                            ("storage", Addon::Storage),
                            ("ingress", Addon::Ingress),
                            ("monitoring", Addon::Monitoring),
                        ],
                    )
                })
            }),
            storage: self.opt(&f, path, "storage", |d, n, p| {
                d.choice(
                    n,
                    p,
                    &[
                        ("hostpath", StorageKind::Hostpath),
                        ("openebs", StorageKind::Openebs),
                    ],
                )
            }),
            kubeconfig: self.opt(&f, path, "kubeconfig", |d, n, p| {
                d.string(n, p).map(|s| Spanned {
                    value: PathBuf::from(s.value),
                    pos: s.pos,
                })
            }),
            context: self.opt(&f, path, "context", Self::string),
            namespace: self.opt(&f, path, "namespace", |d, n, p| d.dns_label(n, p, 63)),
            manifests: self.opt(&f, path, "manifests", |d, n, p| {
                d.list(n, p, |d, n, p| {
                    d.string(n, p).map(|s| Spanned {
                        value: PathBuf::from(s.value),
                        pos: s.pos,
                    })
                })
            }),
        };
        Some(Spanned {
            value,
            pos: node.pos,
        })
    }

    fn database(&mut self, node: &Node, path: &str) -> Option<DatabaseFile> {
        let f = self.mapping(
            node,
            path,
            &[
                "kind",
                "name",
                "image",
                "replicas",
                "storage",
                "storageClass",
                "upgrade",
                "shmSize",
                "repository",
                "q",
                "n",
                "rebalance",
                "databases",
                "replications",
                "syncAcks",
                "licenseSecret",
            ],
        )?;
        let kind = self
            .required(&f, path, "kind", "`couchdb`, `allegrograph` or `immudb`")
            .and_then(|n| {
                self.choice(
                    n,
                    &join(path, "kind"),
                    &[
                        ("couchdb", DatabaseKind::Couchdb),
                        ("allegrograph", DatabaseKind::Allegrograph),
                        ("immudb", DatabaseKind::Immudb),
                    ],
                )
            });
        let name = self
            .required(&f, path, "name", "the database's name")
            .and_then(|n| self.dns_label(n, &join(path, "name"), 30));
        let image = self.opt(&f, path, "image", |d, n, p| d.parsed(n, p, ImageRef::parse));
        let replicas = self.opt(&f, path, "replicas", |d, n, p| d.integer(n, p, 0, 100));
        let storage = self.opt(&f, path, "storage", Self::size);
        let storage_class = self.opt(&f, path, "storageClass", |d, n, p| {
            d.parsed(n, p, |text| {
                if values::is_dns_subdomain(text) {
                    Ok(text.to_string())
                } else {
                    Err("a StorageClass name (lowercase letters, digits, '-' and '.', at most 253 characters)".to_string())
                }
            })
        });
        let upgrade = self.opt(&f, path, "upgrade", Self::upgrade_rule);
        let shm_size = self.opt(&f, path, "shmSize", Self::size);
        let repository = self.opt(&f, path, "repository", |d, n, p| d.dns_label(n, p, 63));
        let shards = self.opt(&f, path, "q", |d, n, p| d.integer(n, p, 1, 64));
        let copies = self.opt(&f, path, "n", |d, n, p| d.integer(n, p, 1, 9));
        let rebalance = self.opt(&f, path, "rebalance", Self::boolean);
        let databases = self.opt(&f, path, "databases", |d, n, p| {
            d.list(n, p, |d, n, p| {
                let f = d.mapping(n, p, &["name", "q", "n", "partitioned"])?;
                let name = d
                    .required(&f, p, "name", "the CouchDB database's name")
                    .and_then(|n| d.couch_name(n, &join(p, "name")));
                let shards = d.opt(&f, p, "q", |d, n, p| d.integer(n, p, 1, 64));
                let copies = d.opt(&f, p, "n", |d, n, p| d.integer(n, p, 1, 9));
                let partitioned = d.opt(&f, p, "partitioned", Self::boolean);
                Some(CouchDatabaseFile {
                    name: name?,
                    shards,
                    copies,
                    partitioned,
                })
            })
        });
        let replications = self.opt(&f, path, "replications", |d, n, p| {
            d.list(n, p, |d, n, p| d.replication(n, p))
        });
        let sync_acks = self.opt(&f, path, "syncAcks", |d, n, p| d.integer(n, p, 1, 5));
        let license_secret = self.opt(&f, path, "licenseSecret", |d, n, p| d.dns_label(n, p, 63));
        let database = DatabaseFile {
            pos: node.pos,
            kind: kind?,
            name: name?,
            image,
            replicas,
            storage,
            storage_class,
            upgrade,
            shm_size,
            repository,
            shards,
            copies,
            rebalance,
            databases,
            replications,
            sync_acks,
            license_secret,
        };
        Some(database)
    }

    fn upgrade_policy(&mut self, node: &Node, path: &str) -> Option<Spanned<UpgradePolicy>> {
        self.choice(
            node,
            path,
            &[
                ("none", UpgradePolicy::None),
                ("patch", UpgradePolicy::Patch),
                ("minor", UpgradePolicy::Minor),
                ("major", UpgradePolicy::Major),
            ],
        )
    }

    /// `upgrade: minor`, or `upgrade: {policy, range, tags, prerelease}`.
    fn upgrade_rule(&mut self, node: &Node, path: &str) -> Option<Spanned<UpgradeRuleFile>> {
        if !matches!(node.value, Value::Map(_)) {
            return self.upgrade_policy(node, path).map(|policy| Spanned {
                pos: policy.pos,
                value: UpgradeRuleFile {
                    policy: Some(policy),
                    ..UpgradeRuleFile::default()
                },
            });
        }
        let f = self.mapping(node, path, &["policy", "range", "tags", "prerelease"])?;
        let value = UpgradeRuleFile {
            policy: self.opt(&f, path, "policy", Self::upgrade_policy),
            range: self.opt(&f, path, "range", |d, n, p| {
                d.parsed(n, p, values::VersionRange::parse)
            }),
            tags: self.opt(&f, path, "tags", |d, n, p| {
                d.parsed(n, p, values::TagPattern::parse)
            }),
            prerelease: self.opt(&f, path, "prerelease", Self::boolean),
        };
        Some(Spanned {
            value,
            pos: node.pos,
        })
    }

    /// A CouchDB database name as CouchDB takes it: a lowercase letter,
    /// then lowercase letters, digits and `_$()+-/`; system databases
    /// (`_users`, `_replicator`) are stack's to manage.
    fn couch_name(&mut self, node: &Node, path: &str) -> Option<Spanned<String>> {
        self.parsed(node, path, |text| {
            if values::is_couch_database_name(text) {
                Ok(text.to_string())
            } else {
                Err(format!(
                    "a CouchDB database name: a lowercase letter, then lowercase letters, digits and _$()+-/, at most {} characters",
                    values::COUCH_NAME_MAX
                ))
            }
        })
    }

    fn replication(&mut self, node: &Node, path: &str) -> Option<ReplicationFile> {
        let f = self.mapping(node, path, &["name", "source", "target"])?;
        let name = self
            .required(
                &f,
                path,
                "name",
                "the replication's name, unique in the cluster",
            )
            .and_then(|n| self.dns_label(n, &join(path, "name"), 63));
        let source = self
            .required(&f, path, "source", "a database of this cluster")
            .and_then(|n| self.couch_name(n, &join(path, "source")));
        let target = self
            .required(
                &f,
                path,
                "target",
                "`{cluster, database}` or `{url, credentials}`",
            )
            .and_then(|n| {
                let p = join(path, "target");
                let t = self.mapping(n, &p, &["cluster", "database", "url", "credentials"])?;
                let value = match (t.get("cluster"), t.get("url")) {
                    (Some(cluster), None) => {
                        if let Some(pos) = t.key_pos("credentials") {
                            self.diags.push(
                                pos,
                                &join(&p, "credentials"),
                                "`credentials` only with `url` (a cluster of the stack uses its own admin Secret)",
                                "`credentials` with `cluster`",
                            );
                        }
                        let cluster = self.dns_label(cluster, &join(&p, "cluster"), 30);
                        let database = self
                            .required(&t, &p, "database", "a database of that cluster")
                            .and_then(|n| self.couch_name(n, &join(&p, "database")));
                        ReplicationTargetFile::Cluster {
                            cluster: cluster?,
                            database: database?,
                        }
                    }
                    (None, Some(url)) => {
                        if let Some(pos) = t.key_pos("database") {
                            self.diags.push(
                                pos,
                                &join(&p, "database"),
                                "`database` only with `cluster` (a URL names its database)",
                                "`database` with `url`",
                            );
                        }
                        let url = self.parsed(url, &join(&p, "url"), |text| {
                            values::check_couch_url(text).map(|()| text.to_string())
                        });
                        let credentials = self.opt(&t, &p, "credentials", |d, n, p| {
                            d.parsed(n, p, |text| {
                                if values::is_dns_subdomain(text) {
                                    Ok(text.to_string())
                                } else {
                                    Err("the name of a Secret (with keys `username` and `password`) in the stack's namespace".to_string())
                                }
                            })
                        });
                        ReplicationTargetFile::Url {
                            url: url?,
                            credentials,
                        }
                    }
                    _ => {
                        self.diags.push(
                            n.pos,
                            &p,
                            "exactly one of `cluster` (with `database`) or `url` (with `credentials`)",
                            if t.get("cluster").is_some() {
                                "both `cluster` and `url`"
                            } else {
                                "neither `cluster` nor `url`"
                            },
                        );
                        return None;
                    }
                };
                Some(Spanned { value, pos: n.pos })
            });
        Some(ReplicationFile {
            name: name?,
            source: source?,
            target: target?,
        })
    }

    fn ingress(&mut self, node: &Node, path: &str) -> Option<Spanned<IngressFile>> {
        let f = self.mapping(
            node,
            path,
            &["domain", "tls", "className", "tcp", "endpoints"],
        )?;
        let domain = self
            .required(&f, path, "domain", "the DNS domain endpoints live under")
            .and_then(|n| {
                self.parsed(n, &join(path, "domain"), |t| {
                    if values::is_dns_name(t) {
                        Ok(t.to_string())
                    } else {
                        Err("a DNS name such as db.example.test".to_string())
                    }
                })
            });
        let tls = self.opt(&f, path, "tls", |d, n, p| {
            let f = d.mapping(n, p, &["ca", "secret", "issuer"])?;
            if f.entries.len() != 1 {
                d.diags.push(
                    n.pos,
                    p,
                    "exactly one of `ca: stack`, `secret: NAME` or `issuer: NAME`",
                    format!("{} of them", f.entries.len()),
                );
                return None;
            }
            let value = match f.entries[0] {
                ("ca", _, v) => {
                    d.choice(v, &join(p, "ca"), &[("stack", ())])?;
                    TlsFile::StackCa
                }
                ("secret", _, v) => TlsFile::Secret(d.dns_label(v, &join(p, "secret"), 253)?.value),
                (_, _, v) => TlsFile::Issuer(d.dns_label(v, &join(p, "issuer"), 253)?.value),
            };
            Some(Spanned { value, pos: n.pos })
        });
        let class_name = self.opt(&f, path, "className", |d, n, p| d.dns_label(n, p, 63));
        let tcp = self.opt(&f, path, "tcp", |d, n, p| {
            d.choice(
                n,
                p,
                &[
                    ("nodePort", TcpExposure::NodePort),
                    ("entryPoint", TcpExposure::EntryPoint),
                ],
            )
        });
        let endpoints = self.opt(&f, path, "endpoints", |d, n, p| {
            d.list(n, p, |d, n, p| {
                let f = d.mapping(n, p, &["name", "service", "port", "protocol"])?;
                let name = d.required(&f, p, "name", "the endpoint's host label");
                let name = name.and_then(|n| d.dns_label(n, &join(p, "name"), 63));
                let service = d.required(&f, p, "service", "a Service in the stack's manifests");
                let service = service.and_then(|n| d.dns_label(n, &join(p, "service"), 63));
                let port = d.required(&f, p, "port", "the Service's port number");
                let port = port.and_then(|n| d.integer(n, &join(p, "port"), 1, 65535));
                let protocol = d.opt(&f, p, "protocol", |d, n, p| {
                    d.choice(n, p, &[("http", Protocol::Http), ("tcp", Protocol::Tcp)])
                });
                Some(EndpointFile {
                    name: name?,
                    service: service?,
                    port: port?,
                    protocol,
                })
            })
        });
        let value = IngressFile {
            domain: domain?,
            tls,
            class_name,
            tcp,
            endpoints,
        };
        Some(Spanned {
            value,
            pos: node.pos,
        })
    }

    fn monitoring(&mut self, node: &Node, path: &str) -> Option<Spanned<MonitoringFile>> {
        let f = self.mapping(node, path, &["serviceMonitors", "dashboards"])?;
        let value = MonitoringFile {
            service_monitors: self.opt(&f, path, "serviceMonitors", Self::boolean),
            dashboards: self.opt(&f, path, "dashboards", Self::boolean),
        };
        Some(Spanned {
            value,
            pos: node.pos,
        })
    }

    fn upgrades(&mut self, node: &Node, path: &str) -> Option<Spanned<UpgradesFile>> {
        let f = self.mapping(
            node,
            path,
            &[
                "schedule",
                "window",
                "healthTimeout",
                "rollback",
                "insecureRegistries",
            ],
        )?;
        let schedule = self.opt(&f, path, "schedule", |d, n, p| {
            d.parsed(n, p, |t| values::check_cron(t).map(|()| t.to_string()))
        });
        let value = UpgradesFile {
            schedule,
            window: self.opt(&f, path, "window", Self::duration),
            health_timeout: self.opt(&f, path, "healthTimeout", Self::duration),
            rollback: self.opt(&f, path, "rollback", Self::boolean),
            insecure_registries: self.opt(&f, path, "insecureRegistries", |d, n, p| {
                d.list(n, p, |d, n, p| {
                    d.parsed(n, p, |t| {
                        values::check_registry_host(t).map(|()| t.to_string())
                    })
                })
            }),
        };
        Some(Spanned {
            value,
            pos: node.pos,
        })
    }

    fn timeouts(&mut self, node: &Node, path: &str) -> Option<TimeoutsFile> {
        let f = self.mapping(node, path, &["running", "delete", "ready", "healthy"])?;
        Some(TimeoutsFile {
            running: self.opt(&f, path, "running", Self::duration),
            delete: self.opt(&f, path, "delete", Self::duration),
            ready: self.opt(&f, path, "ready", Self::duration),
            healthy: self.opt(&f, path, "healthy", Self::duration),
        })
    }

    fn tags(
        &mut self,
        node: &Node,
        path: &str,
    ) -> Option<Spanned<BTreeMap<String, Spanned<String>>>> {
        let Value::Map(entries) = &node.value else {
            self.error(node, path, "a mapping of tag names to values");
            return None;
        };
        let mut tags = BTreeMap::new();
        let mut seen: HashMap<String, Pos> = HashMap::new();
        for (key, value) in entries {
            let Some(key) = self.string(key, path) else {
                continue;
            };
            let key_path = join(path, &shown(&key.value));
            if let Some(first) = seen.get(&key.value) {
                self.diags.push(
                    key.pos,
                    &key_path,
                    "each tag once",
                    format!(
                        "`{}` again (first at {}:{})",
                        shown(&key.value),
                        first.line,
                        first.column
                    ),
                );
                continue;
            }
            seen.insert(key.value.clone(), key.pos);
            if let Some((expected, found)) = tag_name_problem(&key.value) {
                self.diags.push(key.pos, &key_path, expected, found);
                continue;
            }
            let Some(value) = self.string(value, &key_path) else {
                continue;
            };
            if let Some((expected, found)) = tag_value_problem(&value.value) {
                self.diags.push(value.pos, &key_path, expected, found);
                continue;
            }
            tags.insert(key.value, value);
        }
        Some(Spanned {
            value: tags,
            pos: node.pos,
        })
    }
}

/// The first character of a tag outside what AWS takes everywhere.
fn tag_character_problem(text: &str) -> Option<char> {
    text.chars().find(|c| {
        !(c.is_alphanumeric()
            || (c.is_whitespace() && !c.is_control())
            || TAG_PUNCTUATION.contains(*c))
    })
}

fn tag_characters() -> String {
    let punctuation: Vec<String> = TAG_PUNCTUATION.chars().map(String::from).collect();
    format!("letters, digits, spaces and `{}`", punctuation.join(" "))
}

fn aws_prefixed(text: &str) -> bool {
    text.get(..4)
        .is_some_and(|p| p.eq_ignore_ascii_case("aws:"))
}

/// What is wrong with a tag name, as (expected, found).
fn tag_name_problem(name: &str) -> Option<(String, String)> {
    let length = name.chars().count();
    if length == 0 || length > TAG_NAME_MAX {
        return Some((
            format!("a tag name of 1 to {TAG_NAME_MAX} characters"),
            format!("{length} characters"),
        ));
    }
    if name == "Name" || name.starts_with("stack") {
        return Some((
            "a tag name of your own, not `Name` or `stack…` (stack sets those)".to_string(),
            format!("`{name}`"),
        ));
    }
    if aws_prefixed(name) {
        return Some((
            "a tag name that does not start with `aws:` (AWS reserves those)".to_string(),
            format!("`{name}`"),
        ));
    }
    tag_character_problem(name).map(|c| {
        (
            format!("a tag name of {}", tag_characters()),
            format!("`{}` in `{}`", shown(&c.to_string()), shown(name)),
        )
    })
}

/// What is wrong with a tag value, as (expected, found).
fn tag_value_problem(value: &str) -> Option<(String, String)> {
    let length = value.chars().count();
    if length > TAG_VALUE_MAX {
        return Some((
            format!("a tag value of at most {TAG_VALUE_MAX} characters"),
            format!("{length} characters"),
        ));
    }
    if aws_prefixed(value) {
        return Some((
            "a tag value that does not start with `aws:` (AWS reserves those)".to_string(),
            format!("`{value}`"),
        ));
    }
    tag_character_problem(value).map(|c| {
        (
            format!("a tag value of {}", tag_characters()),
            format!("`{}` in `{}`", shown(&c.to_string()), shown(value)),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_for_misspelt_keys() {
        assert_eq!(edit_distance("instancetype", "instanceType"), 0);
        assert_eq!(edit_distance("cout", "count"), 1);
        assert_eq!(one_of(&["a", "b", "c"]), "`a`, `b` or `c`");
    }
}
