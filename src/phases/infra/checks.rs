//! What `validate` and `plan` check of the machines before any cloud is
//! called, so that a stack that cannot work fails before anything is made:
//! the local files the node groups name (base images, kernels, user-data
//! templates) are there, each EC2 instance's rendered user-data fits in
//! what EC2 accepts, and a cluster is not bootstrapped over SSH on the
//! addresses an EC2 emulator on this machine invents.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::diag::Diagnostics;
use crate::model::{BaseImage, Ec2Settings, Provider, Stack};

use super::ec2::desired;

/// EC2 takes at most 16 KB of user data, before base64.
pub const EC2_USER_DATA_MAX: usize = 16 * 1024;

/// A path of the stack file, relative to the file's folder.
fn local(stack: &Stack, path: &Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    stack
        .file
        .parent()
        .map_or_else(|| path.to_path_buf(), |dir| dir.join(path))
}

pub fn check(stack: &Stack, diags: &mut Diagnostics) {
    for (i, group) in stack.nodes.iter().enumerate() {
        let at = format!("nodes[{i}]");
        let mut need = |key: &str, path: &Path, what: &str| {
            let full = local(stack, path);
            if !full.is_file() {
                let field = format!("{at}.{key}");
                diags.push(
                    stack.positions.of(&field),
                    &field,
                    format!("{what} that exists"),
                    format!("no file {}", full.display()),
                );
            }
        };
        if let Some(path) = &group.user_data {
            need("userData", path, "a user-data template");
        }
        let (image, kernel, initrd) = match &group.image {
            Some(BaseImage::Path {
                path,
                kernel,
                initrd,
            }) => (Some(path), kernel, initrd),
            Some(BaseImage::Url { kernel, initrd, .. }) => (None, kernel, initrd),
            None => (None, &None, &None),
        };
        if let Some(path) = image {
            need(
                "image.path",
                path,
                "a base image (a local file, or `url` with its checksum to download it)",
            );
        }
        if let Some(path) = kernel {
            need("image.kernel", path, "a kernel");
        }
        if let Some(path) = initrd {
            need("image.initrd", path, "an initrd");
        }
    }
    if let Some(Provider::Ec2(settings)) = &stack.provider {
        ec2_user_data(stack, settings, diags);
        emulator_bootstrap(stack, settings, diags);
    }
}

/// Renders every instance's user-data around keys of the real size and
/// checks it against EC2's limit.
fn ec2_user_data(stack: &Stack, settings: &Ec2Settings, diags: &mut Diagnostics) {
    if stack.nodes.iter().any(|g| {
        g.user_data
            .as_ref()
            .is_some_and(|p| !local(stack, p).is_file())
    }) {
        return;
    }
    let keys = (|| {
        let (_, stack_key) = crate::keys::new_host_key(&stack.name)?;
        let mut hosts = desired::HostKeys::new();
        for group in &stack.nodes {
            for index in 0..group.count {
                let hostname = desired::hostname(stack, &group.name, index);
                let key = crate::keys::new_host_key(&hostname)?;
                hosts.insert(hostname, key);
            }
        }
        Ok::<_, crate::keys::KeyError>((stack_key, hosts))
    })();
    let Ok((stack_key, hosts)) = keys else {
        return;
    };
    let instances = match desired::instances(stack, settings, &stack_key, &hosts) {
        Ok(instances) => instances,
        Err(err) => {
            diags.push(
                stack.positions.of("nodes"),
                "nodes",
                "user-data templates that render",
                crate::error_chain::error_chain(&err),
            );
            return;
        }
    };
    // `instances` lists each group's instances in turn.
    let mut specs = instances.iter();
    for (i, group) in stack.nodes.iter().enumerate() {
        let largest = specs
            .by_ref()
            .take(group.count as usize)
            .max_by_key(|spec| spec.user_data.len());
        let Some(largest) = largest.filter(|s| s.user_data.len() > EC2_USER_DATA_MAX) else {
            continue;
        };
        let field = if group.user_data.is_some() {
            format!("nodes[{i}].userData")
        } else {
            format!("nodes[{i}].runcmd")
        };
        diags.push(
            stack.positions.of(&field),
            &field,
            format!("user-data of at most {EC2_USER_DATA_MAX} bytes (EC2's limit)"),
            format!(
                "{} bytes rendered for {}",
                largest.user_data.len(),
                largest.hostname
            ),
        );
    }
}

/// The endpoint the EC2 client will use when it is not AWS: the stack's, or
/// the SDK's environment variables (a profile's `endpoint_url` is not read
/// here).
fn endpoint_override(settings: &Ec2Settings) -> Option<String> {
    settings
        .endpoint
        .clone()
        .or_else(|| std::env::var("AWS_ENDPOINT_URL_EC2").ok())
        .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
        .filter(|e| !e.is_empty())
}

fn is_loopback(url: &str) -> bool {
    let Some(host) = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_string()))
    else {
        return false;
    };
    host == "localhost"
        || host.ends_with(".localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// An EC2 emulator on this machine (moto, LocalStack) gives its instances
/// public addresses out of real AWS space that nothing here answers on, and
/// that belong to others: the bootstrap would knock on strangers' SSH ports
/// until `timeouts.ready` ran out.
fn emulator_bootstrap(stack: &Stack, settings: &Ec2Settings, diags: &mut Diagnostics) {
    let makes_cluster = stack
        .kubernetes
        .as_ref()
        .is_some_and(|k| k.kubeconfig.is_none());
    if !makes_cluster || stack.nodes.is_empty() {
        return;
    }
    let Some(endpoint) = endpoint_override(settings).filter(|e| is_loopback(e)) else {
        return;
    };
    diags.push(
        stack.positions.of("kubernetes"),
        "kubernetes",
        "no cluster to bootstrap over SSH when EC2 is an emulator on this machine (its instances' addresses are invented and may be others' hosts); remove `kubernetes` to try the EC2 provider offline, as stacks/aws-moto.yaml does",
        format!("a cluster to make, with EC2 at {endpoint}"),
    );
}
