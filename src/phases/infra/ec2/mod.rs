//! The EC2 backend: key pair, security group and instances through
//! aws-sdk-ec2, with credentials, region and profile from aws-config's
//! standard chain and an optional endpoint for EC2-compatible APIs.
//!
//! Idempotency does not rely on `ClientToken` alone (some EC2-compatible
//! APIs ignore it): every resource is tagged at creation with the stack and
//! its address, and `create` looks it up by those tags first.

pub mod desired;
mod retry;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::primitives::Blob;
use aws_sdk_ec2::types::{
    AttributeValue, BlockDeviceMapping, EbsBlockDevice, Filter, Instance, InstanceStateName,
    IpPermission, IpRange, Ipv6Range, ResourceType, Tag, TagSpecification, UserIdGroupPair,
    VolumeType,
};
use aws_sdk_ec2::Client;
use base64::Engine as _;
use serde_json::{json, Value};

use self::desired::*;
use super::provider::{Provider, ProviderError};
use crate::artifacts::Artifacts;
use crate::engine::{
    Change, Expiring, Handling, Leftovers, NodeStatus, Observed, Resource, Retries, SshAccess,
    StatusPart,
};
use crate::error_chain::error_chain;
use crate::files::sha256_hex;
use crate::future::BoxFuture;
use crate::keys::key_material;
use crate::model::{Ec2Settings, Stack};
use crate::nodes::{Nodes, NodesError, SshNode};
use crate::state::{Record, State};
use crate::templates::TemplateError;

#[derive(Debug, thiserror::Error)]
pub enum Ec2Error {
    #[error("no AWS region: set provider.ec2.region in the stack, AWS_REGION, or a region in the AWS profile")]
    NoRegion,
    #[error("no usable AWS credentials (tried the environment, the shared profile, SSO, web identity and the instance role): {0}")]
    Credentials(String),
    #[error("ec2 {action} for {target} failed: {message}")]
    Api {
        action: &'static str,
        target: String,
        message: String,
    },
    #[error("{what}: still {state} after {}s (timeouts.{timeout} in the stack)", waited.as_secs())]
    Timeout {
        what: String,
        state: String,
        waited: Duration,
        timeout: &'static str,
    },
    #[error("{0}")]
    Conflict(String),
    #[error("{address}: {message}")]
    Invalid { address: String, message: String },
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
}

fn error_code<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> Option<&str> {
    err.as_service_error().and_then(|e| e.code())
}

/// The error of a failed call, naming it; one that was still transient
/// after every retry says that the next run continues.
fn api<E>(
    action: &'static str,
    target: impl Into<String>,
) -> impl FnOnce(SdkError<E, HttpResponse>) -> Ec2Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let target = target.into();
    move |err| {
        let mut message = match err.as_service_error() {
            Some(service) => format!(
                "{}: {}",
                service.code().unwrap_or("error"),
                service.message().unwrap_or("(no message)")
            ),
            None => error_chain(&err),
        };
        if retry::is_transient(&err) {
            message.push_str(" (a transient error that outlasted every retry, provider.ec2.maxRetries: what finished is recorded in state, and the next run continues from there)");
        }
        Ec2Error::Api {
            action,
            target,
            message,
        }
    }
}

fn filter(name: &str, values: impl IntoIterator<Item = impl Into<String>>) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.into_iter().map(Into::into).collect()))
        .build()
}

fn tag_map(tags: &[Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or("").to_string())))
        .collect()
}

fn tag_spec(kind: ResourceType, tags: &Value) -> TagSpecification {
    let tags = tags.as_object().into_iter().flatten().map(|(k, v)| {
        Tag::builder()
            .key(k)
            .value(v.as_str().unwrap_or_default())
            .build()
    });
    TagSpecification::builder()
        .resource_type(kind)
        .set_tags(Some(tags.collect()))
        .build()
}

/// How an instance state shows in plans: `running` or `stopped`; `None` for
/// instances that are gone or going.
fn instance_state(instance: &Instance) -> Option<&'static str> {
    match instance.state().and_then(|s| s.name()) {
        Some(InstanceStateName::Pending | InstanceStateName::Running) => Some("running"),
        Some(InstanceStateName::Stopping | InstanceStateName::Stopped) => Some("stopped"),
        _ => None,
    }
}

const LIVE_STATES: [&str; 4] = ["pending", "running", "stopping", "stopped"];

pub struct Ec2Provider {
    client: Client,
    stack: Stack,
    settings: Ec2Settings,
    desired: Vec<Resource>,
    user_data: HashMap<String, String>,
    /// Each node's pinned host key by host name.
    host_keys: desired::HostKeys,
    public_key: String,
    root_devices: Mutex<HashMap<String, String>>,
    /// The id of the state this provider works for.
    lineage: String,
    retries: retry::RetryLog,
}

impl Ec2Provider {
    /// Builds the client from the standard chain (plus the stack's region,
    /// profile and endpoint) and checks that credentials are there.
    pub async fn connect(
        stack: &Stack,
        settings: &Ec2Settings,
        public_key: &str,
        artifacts: &Artifacts,
        lineage: &str,
    ) -> Result<Self, Ec2Error> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(profile) = &settings.profile {
            loader = loader.profile_name(profile);
        }
        if let Some(region) = &settings.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(endpoint) = &settings.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let config = loader.load().await;
        if config.region().is_none() {
            return Err(Ec2Error::NoRegion);
        }
        let credentials = config
            .credentials_provider()
            .ok_or_else(|| Ec2Error::Credentials("no credentials provider".to_string()))?;
        use aws_credential_types::provider::ProvideCredentials as _;
        credentials
            .provide_credentials()
            .await
            .map_err(|e| Ec2Error::Credentials(error_chain(&e)))?;
        let retries = retry::RetryLog::default();
        let client = Client::from_conf(
            aws_sdk_ec2::config::Builder::from(&config)
                .retry_config(retry::retry_config(settings.max_retries))
                .retry_classifier(retry::RefusedIsFinal)
                .interceptor(retries.clone())
                .build(),
        );
        let mut host_keys = desired::HostKeys::new();
        for group in &stack.nodes {
            for index in 0..group.count {
                let hostname = desired::hostname(stack, &group.name, index);
                let key = crate::keys::host_key(artifacts, &hostname)?;
                host_keys.insert(hostname, key);
            }
        }
        let desired = desired::resources(stack, settings, public_key, &host_keys, lineage)?;
        let user_data = desired::instances(stack, settings, public_key, &host_keys)?
            .into_iter()
            .map(|spec| (spec.address, spec.user_data))
            .collect();
        Ok(Ec2Provider {
            client,
            stack: stack.clone(),
            settings: settings.clone(),
            desired,
            user_data,
            host_keys,
            public_key: public_key.to_string(),
            root_devices: Mutex::new(HashMap::new()),
            lineage: lineage.to_string(),
            retries,
        })
    }

    fn stack_filter(&self) -> Filter {
        filter(&format!("tag:{STACK_TAG}"), [self.stack.name.clone()])
    }

    async fn describe_instances(&self, filters: Vec<Filter>) -> Result<Vec<Instance>, Ec2Error> {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = self
                .client
                .describe_instances()
                .set_filters(Some(filters.clone()))
                .set_next_token(token)
                .send()
                .await
                .map_err(api(
                    "DescribeInstances",
                    format!("stack {}", self.stack.name),
                ))?;
            out.extend(
                page.reservations()
                    .iter()
                    .flat_map(|r| r.instances().iter().cloned()),
            );
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                return Ok(out);
            }
        }
    }

    /// Instances tagged with the stack, plus the recorded ones by id.
    async fn live_instances(&self, recorded: &[String]) -> Result<Vec<Instance>, Ec2Error> {
        let states = filter("instance-state-name", LIVE_STATES);
        let mut instances = self
            .describe_instances(vec![self.stack_filter(), states.clone()])
            .await?;
        let missing: Vec<&String> = recorded
            .iter()
            .filter(|id| {
                !instances
                    .iter()
                    .any(|i| i.instance_id() == Some(id.as_str()))
            })
            .collect();
        if !missing.is_empty() {
            instances.extend(
                self.describe_instances(vec![filter("instance-id", missing), states])
                    .await?,
            );
        }
        Ok(instances)
    }

    fn address_of(
        &self,
        state: &State,
        kind: &str,
        id: &str,
        tags: &BTreeMap<String, String>,
    ) -> String {
        state
            .resources
            .iter()
            .find(|r| r.kind == kind && r.id.as_deref() == Some(id))
            .map(|r| r.address.clone())
            .or_else(|| tags.get(ADDRESS_TAG).cloned())
            .unwrap_or_else(|| format!("ec2.{kind}.untracked-{id}"))
    }

    /// Why a live resource is another state's: the records do not know it
    /// and its lineage tag is not this state's.
    fn foreign(
        &self,
        state: &State,
        kind: &str,
        id: &str,
        tags: &BTreeMap<String, String>,
    ) -> Option<String> {
        let recorded = state
            .resources
            .iter()
            .any(|r| r.kind == kind && r.id.as_deref() == Some(id));
        match tags.get(LINEAGE_TAG) {
            _ if recorded => None,
            Some(lineage) if *lineage == self.lineage => None,
            Some(lineage) => Some(format!("tagged {STACK_TAG}={} by another state (lineage {lineage})", self.stack.name)),
            None => Some(format!("tagged {STACK_TAG}={} with no lineage: made by another state, or before states had one", self.stack.name)),
        }
    }

    fn recorded_ids(state: &State, kind: &str) -> Vec<String> {
        state
            .resources
            .iter()
            .filter(|r| r.kind == kind)
            .filter_map(|r| r.id.clone())
            .collect()
    }

    async fn root_volume_sizes(
        &self,
        instances: &[Instance],
    ) -> Result<HashMap<String, i64>, Ec2Error> {
        let ids: Vec<String> = instances
            .iter()
            .filter_map(|i| i.instance_id().map(str::to_string))
            .collect();
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let roots: HashMap<&str, &str> = instances
            .iter()
            .filter_map(|i| Some((i.instance_id()?, i.root_device_name()?)))
            .collect();
        let volumes = self
            .client
            .describe_volumes()
            .filters(filter("attachment.instance-id", ids))
            .send()
            .await
            .map_err(api("DescribeVolumes", format!("stack {}", self.stack.name)))?;
        let mut sizes = HashMap::new();
        for volume in volumes.volumes() {
            for attachment in volume.attachments() {
                let (Some(instance), Some(device)) =
                    (attachment.instance_id(), attachment.device())
                else {
                    continue;
                };
                if roots.get(instance) == Some(&device) {
                    sizes.insert(
                        instance.to_string(),
                        i64::from(volume.size().unwrap_or_default()),
                    );
                }
            }
        }
        Ok(sizes)
    }

    fn observe_instance(
        &self,
        instance: &Instance,
        state: &State,
        root_sizes: &HashMap<String, i64>,
        our_group: &str,
    ) -> Option<Observed> {
        let id = instance.instance_id()?;
        let live_state = instance_state(instance)?;
        let mut tags = tag_map(instance.tags());
        // Not one of the stack's tags: what the instance was launched with.
        let user_data = tags.remove(USER_DATA_TAG);
        let groups: Vec<&str> = instance
            .security_groups()
            .iter()
            .filter_map(|g| g.group_name())
            .collect();
        let group = if groups.contains(&our_group) {
            Some(our_group)
        } else {
            groups.first().copied()
        };
        let mut attrs = json!({
            "ami": instance.image_id(),
            "instanceType": instance.instance_type().map(|t| t.as_str()),
            "keyName": instance.key_name(),
            "securityGroup": group,
            "subnetId": instance.subnet_id(),
            "state": live_state,
            "tags": tags,
            "publicIp": instance.public_ip_address(),
            "privateIp": instance.private_ip_address(),
        });
        if let Some(size) = root_sizes.get(id) {
            attrs["rootVolumeGiB"] = json!(size);
        }
        if let Some(sha) = user_data {
            attrs["userDataSha256"] = json!(sha);
        }
        Some(Observed {
            address: self.address_of(state, INSTANCE, id, &tags),
            kind: INSTANCE.to_string(),
            id: id.to_string(),
            attrs,
            handling: Handling {
                foreign: self.foreign(state, INSTANCE, id, &tags),
                ..desired::instance_handling()
            },
        })
    }

    async fn refresh_groups(&self, state: &State) -> Result<Vec<Observed>, Ec2Error> {
        let target = format!("stack {}", self.stack.name);
        let mut groups = self
            .client
            .describe_security_groups()
            .filters(self.stack_filter())
            .send()
            .await
            .map_err(api("DescribeSecurityGroups", &target))?
            .security_groups
            .unwrap_or_default();
        let missing: Vec<String> = Self::recorded_ids(state, SECURITY_GROUP)
            .into_iter()
            .filter(|id| !groups.iter().any(|g| g.group_id() == Some(id.as_str())))
            .collect();
        if !missing.is_empty() {
            groups.extend(
                self.client
                    .describe_security_groups()
                    .filters(filter("group-id", missing))
                    .send()
                    .await
                    .map_err(api("DescribeSecurityGroups", &target))?
                    .security_groups
                    .unwrap_or_default(),
            );
        }
        let ids: Vec<String> = groups
            .iter()
            .filter_map(|g| g.group_id().map(str::to_string))
            .collect();
        let rules = self.ingress_rules(&ids).await?;
        let mut out = Vec::new();
        for group in &groups {
            let Some(id) = group.group_id() else { continue };
            let tags = tag_map(group.tags());
            let mut ingress: Vec<String> = rules
                .get(id)
                .into_iter()
                .flatten()
                .map(|(rule, _)| rule.to_string())
                .collect();
            ingress.sort();
            out.push(Observed {
                address: self.address_of(state, SECURITY_GROUP, id, &tags),
                kind: SECURITY_GROUP.to_string(),
                id: id.to_string(),
                handling: Handling {
                    foreign: self.foreign(state, SECURITY_GROUP, id, &tags),
                    ..Handling::default()
                },
                attrs: json!({
                    "name": group.group_name(),
                    "description": group.description(),
                    "vpcId": group.vpc_id(),
                    "ingress": ingress,
                    "tags": tags,
                }),
            });
        }
        Ok(out)
    }

    /// Ingress rules of the groups, with the rule ids that revoke them.
    async fn ingress_rules(
        &self,
        group_ids: &[String],
    ) -> Result<HashMap<String, Vec<(IngressRule, String)>>, Ec2Error> {
        let mut out: HashMap<String, Vec<(IngressRule, String)>> = HashMap::new();
        if group_ids.is_empty() {
            return Ok(out);
        }
        let mut token = None;
        loop {
            let page = self
                .client
                .describe_security_group_rules()
                .filters(filter("group-id", group_ids.to_vec()))
                .set_next_token(token)
                .send()
                .await
                .map_err(api(
                    "DescribeSecurityGroupRules",
                    format!("stack {}", self.stack.name),
                ))?;
            for rule in page.security_group_rules() {
                if rule.is_egress() == Some(true) {
                    continue;
                }
                let (Some(group), Some(rule_id)) = (rule.group_id(), rule.security_group_rule_id())
                else {
                    continue;
                };
                let protocol = match rule.ip_protocol() {
                    Some("-1") | None => "all".to_string(),
                    Some(p) => p.to_string(),
                };
                let ports = match (rule.from_port(), rule.to_port()) {
                    (Some(from), Some(to)) if from >= 0 && protocol != "all" => Some((from, to)),
                    _ => None,
                };
                let source = if let Some(cidr) = rule.cidr_ipv4().or(rule.cidr_ipv6()) {
                    Source::Cidr(cidr.to_string())
                } else if let Some(other) = rule.referenced_group_info().and_then(|g| g.group_id())
                {
                    if other == group {
                        Source::SelfGroup
                    } else {
                        Source::Group(other.to_string())
                    }
                } else if let Some(list) = rule.prefix_list_id() {
                    Source::Group(list.to_string())
                } else {
                    continue;
                };
                out.entry(group.to_string()).or_default().push((
                    IngressRule {
                        protocol,
                        ports,
                        source,
                    },
                    rule_id.to_string(),
                ));
            }
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                return Ok(out);
            }
        }
    }

    async fn refresh_key_pairs(&self, state: &State) -> Result<Vec<Observed>, Ec2Error> {
        let target = format!("stack {}", self.stack.name);
        let mut pairs = self
            .client
            .describe_key_pairs()
            .filters(self.stack_filter())
            .include_public_key(true)
            .send()
            .await
            .map_err(api("DescribeKeyPairs", &target))?
            .key_pairs
            .unwrap_or_default();
        let missing: Vec<String> = Self::recorded_ids(state, KEY_PAIR)
            .into_iter()
            .filter(|id| !pairs.iter().any(|p| p.key_pair_id() == Some(id.as_str())))
            .collect();
        if !missing.is_empty() {
            pairs.extend(
                self.client
                    .describe_key_pairs()
                    .filters(filter("key-pair-id", missing))
                    .include_public_key(true)
                    .send()
                    .await
                    .map_err(api("DescribeKeyPairs", &target))?
                    .key_pairs
                    .unwrap_or_default(),
            );
        }
        Ok(pairs
            .iter()
            .filter_map(|pair| {
                let id = pair.key_pair_id()?;
                let tags = tag_map(pair.tags());
                let mut attrs = json!({ "name": pair.key_name(), "tags": tags });
                if let Some(key) = pair.public_key() {
                    attrs["publicKeySha256"] = json!(sha256_hex(key_material(key).as_bytes()));
                }
                Some(Observed {
                    address: self.address_of(state, KEY_PAIR, id, &tags),
                    kind: KEY_PAIR.to_string(),
                    id: id.to_string(),
                    attrs,
                    handling: Handling {
                        foreign: self.foreign(state, KEY_PAIR, id, &tags),
                        ..Handling::default()
                    },
                })
            })
            .collect())
    }

    async fn wait_instance(
        &self,
        id: &str,
        want: &[InstanceStateName],
        timeout: Duration,
        timeout_name: &'static str,
    ) -> Result<Option<Instance>, Ec2Error> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(200);
        loop {
            let instances = self
                .describe_instances(vec![filter("instance-id", [id])])
                .await?;
            let instance = instances.into_iter().next();
            let current = instance
                .as_ref()
                .and_then(|i| i.state())
                .and_then(|s| s.name())
                .cloned();
            match &current {
                None if want.contains(&InstanceStateName::Terminated) => return Ok(None),
                Some(name) if want.contains(name) => return Ok(instance),
                Some(InstanceStateName::Terminated | InstanceStateName::ShuttingDown)
                    if !want.contains(&InstanceStateName::Terminated) =>
                {
                    let reason = instance
                        .as_ref()
                        .and_then(|i| i.state_reason())
                        .and_then(|r| r.message())
                        .unwrap_or("no reason given");
                    return Err(Ec2Error::Conflict(format!(
                        "instance {id} terminated while waiting for it: {reason}"
                    )));
                }
                _ => {}
            }
            if start.elapsed() >= timeout {
                return Err(Ec2Error::Timeout {
                    what: format!("instance {id}"),
                    state: current.map_or("unknown".to_string(), |s| s.as_str().to_string()),
                    waited: start.elapsed(),
                    timeout: timeout_name,
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    async fn root_device(&self, ami: &str) -> Result<String, Ec2Error> {
        if let Some(device) = self.root_devices.lock().expect("lock").get(ami) {
            return Ok(device.clone());
        }
        let images = self
            .client
            .describe_images()
            .image_ids(ami)
            .send()
            .await
            .map_err(api("DescribeImages", ami))?;
        let device = images
            .images()
            .first()
            .ok_or_else(|| Ec2Error::Api {
                action: "DescribeImages",
                target: ami.to_string(),
                message: "no such AMI in this region".to_string(),
            })?
            .root_device_name()
            .unwrap_or("/dev/xvda")
            .to_string();
        self.root_devices
            .lock()
            .expect("lock")
            .insert(ami.to_string(), device.clone());
        Ok(device)
    }

    fn group_id(state: &State) -> Result<String, Ec2Error> {
        state
            .get(SECURITY_GROUP_ADDRESS)
            .and_then(|r| r.id.clone())
            .ok_or_else(|| Ec2Error::Invalid {
                address: SECURITY_GROUP_ADDRESS.to_string(),
                message: "the security group is not recorded yet".to_string(),
            })
    }

    async fn find_by_address(&self, address: &str) -> Result<Vec<Instance>, Ec2Error> {
        self.describe_instances(vec![
            self.stack_filter(),
            filter(&format!("tag:{ADDRESS_TAG}"), [address]),
            filter("instance-state-name", LIVE_STATES),
        ])
        .await
    }

    async fn create_instance(
        &self,
        resource: &Resource,
        token: &str,
        state: &State,
    ) -> Result<Record, Ec2Error> {
        let address = &resource.address;
        let attrs = &resource.attrs;
        let running = self.stack.timeouts.running;
        let id = match self
            .find_by_address(address)
            .await?
            .first()
            .and_then(|i| i.instance_id())
        {
            Some(id) => id.to_string(),
            None => {
                let ami = attrs["ami"].as_str().unwrap_or_default();
                let device = self.root_device(ami).await?;
                let user_data = self.user_data.get(address).cloned().unwrap_or_default();
                let mut tags = attrs["tags"].clone();
                tags[USER_DATA_TAG] = json!(sha256_hex(user_data.as_bytes()));
                let volume = EbsBlockDevice::builder()
                    .volume_size(attrs["rootVolumeGiB"].as_i64().unwrap_or(20) as i32)
                    .volume_type(VolumeType::Gp3)
                    .delete_on_termination(true)
                    .build();
                let reservation = self
                    .client
                    .run_instances()
                    .image_id(ami)
                    .instance_type(attrs["instanceType"].as_str().unwrap_or_default().into())
                    .key_name(attrs["keyName"].as_str().unwrap_or_default())
                    .security_group_ids(Self::group_id(state)?)
                    .set_subnet_id(attrs["subnetId"].as_str().map(str::to_string))
                    .block_device_mappings(
                        BlockDeviceMapping::builder()
                            .device_name(device)
                            .ebs(volume)
                            .build(),
                    )
                    .user_data(base64::engine::general_purpose::STANDARD.encode(user_data))
                    .client_token(token)
                    .min_count(1)
                    .max_count(1)
                    .tag_specifications(tag_spec(ResourceType::Instance, &tags))
                    .tag_specifications(tag_spec(ResourceType::Volume, &attrs["tags"]))
                    .send()
                    .await
                    .map_err(api("RunInstances", address))?;
                reservation
                    .instances()
                    .first()
                    .and_then(|i| i.instance_id())
                    .ok_or_else(|| Ec2Error::Api {
                        action: "RunInstances",
                        target: address.clone(),
                        message: "the answer named no instance".to_string(),
                    })?
                    .to_string()
            }
        };
        self.wait_instance(&id, &[InstanceStateName::Running], running, "running")
            .await?;
        Ok(Record {
            address: address.clone(),
            kind: INSTANCE.to_string(),
            id: Some(id),
            attrs: attrs.clone(),
            pending_token: None,
        })
    }

    async fn create_group(&self, resource: &Resource) -> Result<Record, Ec2Error> {
        let attrs = &resource.attrs;
        let name = attrs["name"].as_str().unwrap_or_default();
        let target = &resource.address;
        let existing = self
            .client
            .describe_security_groups()
            .filters(self.stack_filter())
            .filters(filter(&format!("tag:{ADDRESS_TAG}"), [target.as_str()]))
            .send()
            .await
            .map_err(api("DescribeSecurityGroups", target))?;
        let id = match existing
            .security_groups()
            .first()
            .and_then(|g| g.group_id())
        {
            Some(id) => id.to_string(),
            None => {
                let vpc = match (attrs["vpcId"].as_str(), self.subnet_for_vpc()) {
                    (Some(vpc), _) => Some(vpc.to_string()),
                    (None, Some(subnet)) => self.vpc_of_subnet(&subnet).await?,
                    (None, None) => None,
                };
                let created = self
                    .client
                    .create_security_group()
                    .group_name(name)
                    .description(attrs["description"].as_str().unwrap_or_default())
                    .set_vpc_id(vpc)
                    .tag_specifications(tag_spec(ResourceType::SecurityGroup, &attrs["tags"]))
                    .send()
                    .await;
                match created {
                    Ok(out) => out.group_id().unwrap_or_default().to_string(),
                    Err(err) if error_code(&err) == Some("InvalidGroup.Duplicate") => {
                        // An earlier attempt of this call may have made it.
                        match self.group_named(name, target).await? {
                            Some(id) => id,
                            None => {
                                return Err(Ec2Error::Conflict(format!(
                                    "a security group named {name} exists but is not tagged {STACK_TAG}={}: stack will not take over what it did not make; delete or rename it",
                                    self.stack.name
                                )))
                            }
                        }
                    }
                    Err(err) => return Err(api("CreateSecurityGroup", target)(err)),
                }
            }
        };
        let wanted: Vec<IngressRule> = string_list(&attrs["ingress"])
            .iter()
            .filter_map(|r| r.parse().ok())
            .collect();
        self.sync_rules(&id, &wanted).await?;
        Ok(Record {
            address: target.clone(),
            kind: SECURITY_GROUP.to_string(),
            id: Some(id),
            attrs: attrs.clone(),
            pending_token: None,
        })
    }

    /// The id of the group named `name` if it carries this stack's tags for `address`.
    async fn group_named(&self, name: &str, address: &str) -> Result<Option<String>, Ec2Error> {
        let found = self
            .client
            .describe_security_groups()
            .filters(filter("group-name", [name]))
            .send()
            .await
            .map_err(api("DescribeSecurityGroups", address))?;
        Ok(found
            .security_groups()
            .iter()
            .find(|g| {
                let tags = tag_map(g.tags());
                tags.get(STACK_TAG) == Some(&self.stack.name)
                    && tags.get(ADDRESS_TAG).map(String::as_str) == Some(address)
            })
            .and_then(|g| g.group_id())
            .map(str::to_string))
    }

    fn subnet_for_vpc(&self) -> Option<String> {
        self.settings
            .subnet_id
            .clone()
            .or_else(|| self.stack.nodes.iter().find_map(|g| g.subnet_id.clone()))
    }

    async fn vpc_of_subnet(&self, subnet: &str) -> Result<Option<String>, Ec2Error> {
        let out = self
            .client
            .describe_subnets()
            .subnet_ids(subnet)
            .send()
            .await
            .map_err(api("DescribeSubnets", subnet))?;
        Ok(out
            .subnets()
            .first()
            .and_then(|s| s.vpc_id())
            .map(str::to_string))
    }

    /// Revokes ingress rules that are not wanted and authorises the missing ones.
    async fn sync_rules(&self, group_id: &str, wanted: &[IngressRule]) -> Result<(), Ec2Error> {
        let live = self
            .ingress_rules(&[group_id.to_string()])
            .await?
            .remove(group_id)
            .unwrap_or_default();
        let extra: Vec<String> = live
            .iter()
            .filter(|(rule, _)| !wanted.contains(rule))
            .map(|(_, id)| id.clone())
            .collect();
        if !extra.is_empty() {
            self.client
                .revoke_security_group_ingress()
                .group_id(group_id)
                .set_security_group_rule_ids(Some(extra))
                .send()
                .await
                .map_err(api("RevokeSecurityGroupIngress", group_id))?;
        }
        let missing: Vec<IpPermission> = wanted
            .iter()
            .filter(|rule| !live.iter().any(|(l, _)| l == *rule))
            .map(|rule| permission(rule, group_id))
            .collect();
        if !missing.is_empty() {
            let result = self
                .client
                .authorize_security_group_ingress()
                .group_id(group_id)
                .set_ip_permissions(Some(missing))
                .send()
                .await;
            match result {
                Ok(_) => {}
                Err(err) if error_code(&err) == Some("InvalidPermission.Duplicate") => {}
                Err(err) => return Err(api("AuthorizeSecurityGroupIngress", group_id)(err)),
            }
        }
        Ok(())
    }

    /// The key pair named `name`: its id when it is this stack's, an error when it is not.
    async fn key_pair_named(&self, name: &str) -> Result<Option<String>, Ec2Error> {
        let existing = self
            .client
            .describe_key_pairs()
            .filters(filter("key-name", [name]))
            .send()
            .await
            .map_err(api("DescribeKeyPairs", name))?;
        match existing.key_pairs().first() {
            Some(pair) if tag_map(pair.tags()).get(STACK_TAG) == Some(&self.stack.name) => {
                Ok(Some(pair.key_pair_id().unwrap_or_default().to_string()))
            }
            Some(_) => Err(Ec2Error::Conflict(format!(
                "a key pair named {name} exists but is not tagged {STACK_TAG}={}: stack will not take over what it did not make; delete it",
                self.stack.name
            ))),
            None => Ok(None),
        }
    }

    async fn create_key_pair(&self, resource: &Resource) -> Result<Record, Ec2Error> {
        let attrs = &resource.attrs;
        let name = attrs["name"].as_str().unwrap_or_default();
        let id = match self.key_pair_named(name).await? {
            Some(id) => id,
            None => {
                let imported = self
                    .client
                    .import_key_pair()
                    .key_name(name)
                    .public_key_material(Blob::new(self.public_key.trim().as_bytes()))
                    .tag_specifications(tag_spec(ResourceType::KeyPair, &attrs["tags"]))
                    .send()
                    .await;
                match imported {
                    Ok(out) => out.key_pair_id().unwrap_or_default().to_string(),
                    // An earlier attempt of this call may have made it.
                    Err(err) if error_code(&err) == Some("InvalidKeyPair.Duplicate") => self
                        .key_pair_named(name)
                        .await?
                        .ok_or_else(|| api("ImportKeyPair", name)(err))?,
                    Err(err) => return Err(api("ImportKeyPair", name)(err)),
                }
            }
        };
        Ok(Record {
            address: resource.address.clone(),
            kind: KEY_PAIR.to_string(),
            id: Some(id),
            attrs: attrs.clone(),
            pending_token: None,
        })
    }

    /// Sets and removes the tags the change's field list names.
    async fn sync_tags(&self, change: &Change, id: &str) -> Result<(), Ec2Error> {
        let mut set = Vec::new();
        let mut remove = Vec::new();
        for field in &change.fields {
            let Some(key) = field.path.under("tags") else {
                continue;
            };
            match field.after.as_ref().and_then(Value::as_str) {
                Some(value) => set.push(Tag::builder().key(key).value(value).build()),
                None => remove.push(Tag::builder().key(key).build()),
            }
        }
        if !set.is_empty() {
            self.client
                .create_tags()
                .resources(id)
                .set_tags(Some(set))
                .send()
                .await
                .map_err(api("CreateTags", &change.address))?;
        }
        if !remove.is_empty() {
            self.client
                .delete_tags()
                .resources(id)
                .set_tags(Some(remove))
                .send()
                .await
                .map_err(api("DeleteTags", &change.address))?;
        }
        Ok(())
    }

    async fn update_instance(&self, change: &Change, id: &str) -> Result<(), Ec2Error> {
        let after = change.after.as_ref().cloned().unwrap_or_default();
        let changed = |path: &str| change.fields.iter().any(|f| f.path.to_string() == path);
        let running = self.stack.timeouts.running;
        if changed("instanceType") {
            self.client
                .stop_instances()
                .instance_ids(id)
                .send()
                .await
                .map_err(api("StopInstances", &change.address))?;
            self.wait_instance(id, &[InstanceStateName::Stopped], running, "running")
                .await?;
            self.client
                .modify_instance_attribute()
                .instance_id(id)
                .instance_type(
                    AttributeValue::builder()
                        .value(after["instanceType"].as_str().unwrap_or_default())
                        .build(),
                )
                .send()
                .await
                .map_err(api("ModifyInstanceAttribute", &change.address))?;
        }
        if changed("instanceType") || changed("state") {
            self.client
                .start_instances()
                .instance_ids(id)
                .send()
                .await
                .map_err(api("StartInstances", &change.address))?;
            self.wait_instance(id, &[InstanceStateName::Running], running, "running")
                .await?;
        }
        Ok(())
    }
}

fn string_list(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

fn permission(rule: &IngressRule, group_id: &str) -> IpPermission {
    let mut builder = IpPermission::builder().ip_protocol(if rule.protocol == "all" {
        "-1"
    } else {
        rule.protocol.as_str()
    });
    if let Some((from, to)) = rule.ports {
        builder = builder.from_port(from).to_port(to);
    }
    match &rule.source {
        Source::Cidr(cidr) if cidr.contains(':') => {
            builder.ipv6_ranges(Ipv6Range::builder().cidr_ipv6(cidr).build())
        }
        Source::Cidr(cidr) => builder.ip_ranges(IpRange::builder().cidr_ip(cidr).build()),
        Source::SelfGroup => {
            builder.user_id_group_pairs(UserIdGroupPair::builder().group_id(group_id).build())
        }
        Source::Group(other) => {
            builder.user_id_group_pairs(UserIdGroupPair::builder().group_id(other).build())
        }
    }
    .build()
}

/// The provider's operations; `Provider` below is their object-safe face.
impl Ec2Provider {
    async fn create(
        &self,
        resource: &Resource,
        token: &str,
        state: &State,
    ) -> Result<Record, Ec2Error> {
        match resource.kind.as_str() {
            KEY_PAIR => self.create_key_pair(resource).await,
            SECURITY_GROUP => self.create_group(resource).await,
            _ => self.create_instance(resource, token, state).await,
        }
    }

    async fn update(&self, change: &Change) -> Result<Record, Ec2Error> {
        let id = change.id.clone().ok_or_else(|| Ec2Error::Invalid {
            address: change.address.clone(),
            message: "an update needs a live resource".to_string(),
        })?;
        let after = change.after.clone().unwrap_or_default();
        match change.kind.as_str() {
            SECURITY_GROUP => {
                let wanted: Vec<IngressRule> = string_list(&after["ingress"])
                    .iter()
                    .filter_map(|r| r.parse().ok())
                    .collect();
                self.sync_rules(&id, &wanted).await?;
            }
            INSTANCE => self.update_instance(change, &id).await?,
            _ => {}
        }
        self.sync_tags(change, &id).await?;
        Ok(Record {
            address: change.address.clone(),
            kind: change.kind.clone(),
            id: Some(id),
            attrs: after,
            pending_token: None,
        })
    }

    async fn delete(&self, kind: &str, id: &str) -> Result<(), Ec2Error> {
        let timeout = self.stack.timeouts.delete;
        match kind {
            INSTANCE => {
                let result = self
                    .client
                    .terminate_instances()
                    .instance_ids(id)
                    .send()
                    .await;
                match result {
                    Ok(_) => {}
                    Err(err) if error_code(&err) == Some("InvalidInstanceID.NotFound") => {
                        return Ok(())
                    }
                    Err(err) => return Err(api("TerminateInstances", id)(err)),
                }
                self.wait_instance(id, &[InstanceStateName::Terminated], timeout, "delete")
                    .await?;
            }
            SECURITY_GROUP => {
                let start = Instant::now();
                loop {
                    match self
                        .client
                        .delete_security_group()
                        .group_id(id)
                        .send()
                        .await
                    {
                        Ok(_) => break,
                        Err(err) if error_code(&err) == Some("InvalidGroup.NotFound") => break,
                        // Instances that used the group may still be shutting down.
                        Err(err)
                            if error_code(&err) == Some("DependencyViolation")
                                && start.elapsed() < timeout =>
                        {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                        Err(err) => return Err(api("DeleteSecurityGroup", id)(err)),
                    }
                }
            }
            _ => {
                // Delete by name: every EC2-compatible API takes the name, not all take the id.
                let pairs = self
                    .client
                    .describe_key_pairs()
                    .filters(filter("key-pair-id", [id]))
                    .send()
                    .await
                    .map_err(api("DescribeKeyPairs", id))?;
                if let Some(name) = pairs.key_pairs().first().and_then(|p| p.key_name()) {
                    match self.client.delete_key_pair().key_name(name).send().await {
                        Ok(_) => {}
                        Err(err) if error_code(&err) == Some("InvalidKeyPair.NotFound") => {}
                        Err(err) => return Err(api("DeleteKeyPair", id)(err)),
                    }
                }
            }
        }
        Ok(())
    }
}

impl Ec2Provider {
    async fn refresh(&self, state: &State) -> Result<Vec<Observed>, Ec2Error> {
        let recorded = Self::recorded_ids(state, INSTANCE);
        let (instances, groups, pairs) = tokio::join!(
            self.live_instances(&recorded),
            self.refresh_groups(state),
            self.refresh_key_pairs(state)
        );
        let instances = instances?;
        let sizes = self.root_volume_sizes(&instances).await?;
        tracing::info!(stack = %self.stack.name, instances = instances.len(), "refreshed from EC2");
        let our_group = resource_name(&self.stack.name);
        let mut observed = pairs?;
        observed.extend(groups?);
        let mut seen = BTreeSet::new();
        for instance in &instances {
            if let Some(o) = self.observe_instance(instance, state, &sizes, &our_group) {
                if seen.insert(o.id.clone()) {
                    observed.push(o);
                }
            }
        }
        Ok(observed)
    }

    /// The expiring environments of this stack and of its runs, from the
    /// tags of their instances, security groups and key pairs.
    async fn environments(&self) -> Result<Vec<Expiring>, Ec2Error> {
        let base = self.stack.run.as_ref().map_or(&self.stack.name, |r| &r.of);
        let target = format!("the environments of stack {base}");
        let marked = filter("tag-key", [EXPIRES_TAG]);
        let mut things: Vec<(String, BTreeMap<String, String>)> = Vec::new();
        for instance in self
            .describe_instances(vec![
                marked.clone(),
                filter("instance-state-name", LIVE_STATES),
            ])
            .await?
        {
            let id = instance.instance_id().unwrap_or_default();
            things.push((format!("{INSTANCE} {id}"), tag_map(instance.tags())));
        }
        for group in self
            .client
            .describe_security_groups()
            .filters(marked.clone())
            .send()
            .await
            .map_err(api("DescribeSecurityGroups", &target))?
            .security_groups
            .unwrap_or_default()
        {
            let id = group.group_id().unwrap_or_default();
            things.push((format!("{SECURITY_GROUP} {id}"), tag_map(group.tags())));
        }
        for pair in self
            .client
            .describe_key_pairs()
            .filters(marked)
            .send()
            .await
            .map_err(api("DescribeKeyPairs", &target))?
            .key_pairs
            .unwrap_or_default()
        {
            let id = pair.key_pair_id().unwrap_or_default();
            things.push((format!("{KEY_PAIR} {id}"), tag_map(pair.tags())));
        }
        let mut found = Vec::new();
        for (thing, tags) in things {
            let (Some(name), Some(expires)) = (
                tags.get(STACK_TAG),
                tags.get(EXPIRES_TAG)
                    .and_then(|t| crate::expiry::parse_rfc3339(t)),
            ) else {
                continue;
            };
            let run = tags.get(RUN_TAG).map(String::as_str);
            let of = tags.get(RUN_OF_TAG).unwrap_or(name);
            if of == base {
                Expiring::merge(&mut found, name, run, expires, thing);
            }
        }
        Ok(found)
    }

    async fn leftovers(&self) -> Result<Leftovers, Ec2Error> {
        let empty = State::new(&self.stack.name, "ec2");
        let observed = self.refresh(&empty).await?;
        Ok(Leftovers {
            left: observed
                .iter()
                .map(|o| format!("{} {} ({})", o.kind, o.id, o.address))
                .collect(),
            checked: Some(format!("Nothing tagged stack={} is left.", self.stack.name)),
        })
    }

    async fn ssh_nodes(&self) -> Result<Vec<SshNode>, Ec2Error> {
        let prefix = format!("ec2.{INSTANCE}.");
        let mut nodes = Vec::new();
        for instance in self.live_instances(&[]).await? {
            let tags = tag_map(instance.tags());
            let (Some(address), Some(id), Some(public), Some(private)) = (
                tags.get(ADDRESS_TAG),
                instance.instance_id(),
                instance.public_ip_address(),
                instance.private_ip_address(),
            ) else {
                continue;
            };
            let Some(hostname) = tags.get("Name") else {
                continue;
            };
            let Some((_, host_key)) = self.host_keys.get(hostname) else {
                continue;
            };
            let Ok(ip) = public.parse::<std::net::IpAddr>() else {
                continue;
            };
            nodes.push(SshNode {
                key: address.trim_start_matches(&prefix).to_string(),
                hostname: hostname.clone(),
                id: id.to_string(),
                ssh: std::net::SocketAddr::new(ip, SSH_PORT as u16),
                user: self.settings.ssh_user.clone(),
                host_key: host_key.clone(),
                private_ip: private.to_string(),
                api: (public.to_string(), KUBE_API_PORT as u16),
            });
        }
        Ok(nodes)
    }

    async fn status(&self) -> Result<StatusPart, Ec2Error> {
        let instances = self.live_instances(&[]).await?;
        let prefix = format!("ec2.{INSTANCE}.");
        let mut nodes: Vec<NodeStatus> = instances
            .iter()
            .filter_map(|i| {
                let tags = tag_map(i.tags());
                let address = tags.get(ADDRESS_TAG).cloned().unwrap_or_default();
                let hostname = tags.get("Name").cloned().unwrap_or_default();
                let ssh = match (i.public_ip_address(), self.host_keys.get(&hostname)) {
                    (Some(public), Some((_, host_key))) => Some(SshAccess {
                        host: public.to_string(),
                        port: SSH_PORT as u16,
                        user: self.settings.ssh_user.clone(),
                        host_key: host_key.clone(),
                        names: node_names(&address, &prefix, &hostname),
                    }),
                    _ => None,
                };
                Some(NodeStatus {
                    address,
                    id: i.instance_id()?.to_string(),
                    state: i.state()?.name()?.as_str().to_string(),
                    public_address: i.public_ip_address().map(str::to_string),
                    private_address: i.private_ip_address().map(str::to_string),
                    ssh,
                })
            })
            .collect();
        nodes.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(StatusPart {
            nodes,
            ssh_user: Some(self.settings.ssh_user.clone()),
            ..StatusPart::default()
        })
    }
}

/// The names a node answers to in `stack ssh`: its address, its key in its
/// group written `group-N`, and its host name.
fn node_names(address: &str, prefix: &str, hostname: &str) -> Vec<String> {
    let key = address.trim_start_matches(prefix);
    let short = key.replace('[', "-").replace(']', "");
    vec![address.to_string(), short, hostname.to_string()]
}

impl Provider for Ec2Provider {
    fn kinds(&self) -> &'static [&'static str] {
        &[KEY_PAIR, SECURITY_GROUP, INSTANCE]
    }

    fn desired(&self) -> Vec<Resource> {
        self.desired.clone()
    }

    fn refresh<'a>(
        &'a self,
        records: &'a State,
    ) -> BoxFuture<'a, Result<Vec<Observed>, ProviderError>> {
        Box::pin(async move { Ok(self.refresh(records).await?) })
    }

    fn create<'a>(
        &'a self,
        resource: &'a Resource,
        token: &'a str,
        state: &'a State,
    ) -> BoxFuture<'a, Result<Record, ProviderError>> {
        Box::pin(async move { Ok(self.create(resource, token, state).await?) })
    }

    fn update<'a>(
        &'a self,
        change: &'a Change,
        _state: &'a State,
    ) -> BoxFuture<'a, Result<Record, ProviderError>> {
        Box::pin(async move { Ok(self.update(change).await?) })
    }

    fn delete<'a>(
        &'a self,
        kind: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move { Ok(self.delete(kind, id).await?) })
    }

    fn leftovers(&self) -> BoxFuture<'_, Result<Leftovers, ProviderError>> {
        Box::pin(async move { Ok(self.leftovers().await?) })
    }

    fn environments(&self) -> BoxFuture<'_, Result<Vec<Expiring>, ProviderError>> {
        Box::pin(async move { Ok(self.environments().await?) })
    }

    fn status(&self) -> BoxFuture<'_, Result<StatusPart, ProviderError>> {
        Box::pin(async move { Ok(self.status().await?) })
    }

    fn retries(&self) -> Option<Retries> {
        Some(Retries {
            service: "EC2".to_string(),
            count: self.retries.count(),
        })
    }
}

impl Nodes for Ec2Provider {
    /// EC2 assigns private addresses at launch.
    fn addresses_in_advance(&self) -> bool {
        false
    }

    fn api_on_loopback(&self) -> bool {
        false
    }

    fn node_address(&self, key: &str) -> String {
        format!("ec2.{INSTANCE}.{key}")
    }

    fn ssh_nodes<'a>(
        &'a self,
        _state: &'a State,
    ) -> BoxFuture<'a, Result<Vec<SshNode>, NodesError>> {
        Box::pin(async move { Ok(self.ssh_nodes().await?) })
    }
}
