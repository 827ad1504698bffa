//! The cloud-init NoCloud seed of a VM: user-data, meta-data and
//! network-config (pure builders), written into a small FAT image labelled
//! `CIDATA` in-process, with no external tool.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use serde::Serialize;

use crate::templates::{self, TemplateError};

/// What a VM's seed says about it.
#[derive(Debug, Clone)]
pub struct SeedSpec {
    pub stack: String,
    pub instance_id: String,
    pub hostname: String,
    pub user: String,
    pub authorized_key: String,
    /// The VM's ed25519 host key, OpenSSH format.
    pub host_private: String,
    pub host_public: String,
    pub user_mac: String,
    pub private_mac: String,
    /// `10.42.0.10/24`
    pub private_address: String,
    pub runcmd: Vec<String>,
}

/// Arguments of `cloud-init/kvm-user-data.yaml.hbs`.
#[derive(Debug, Serialize)]
pub struct KvmUserData<'a> {
    pub stack: &'a str,
    pub hostname: &'a str,
    pub user: &'a str,
    pub authorized_key: &'a str,
    pub host_private_indented: String,
    pub host_public: &'a str,
    /// Each command as a YAML (JSON) string literal.
    pub runcmd: Vec<String>,
}

pub fn user_data(spec: &SeedSpec) -> Result<String, TemplateError> {
    let indented: Vec<String> = spec
        .host_private
        .lines()
        .map(|line| format!("    {line}"))
        .collect();
    templates::kvm_user_data(&KvmUserData {
        stack: &spec.stack,
        hostname: &spec.hostname,
        user: &spec.user,
        authorized_key: spec.authorized_key.trim(),
        host_private_indented: indented.join("\n"),
        host_public: spec.host_public.trim(),
        runcmd: spec
            .runcmd
            .iter()
            .map(|c| serde_json::to_string(c).expect("strings serialise"))
            .collect(),
    })
}

pub fn meta_data(spec: &SeedSpec) -> String {
    format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        spec.instance_id, spec.hostname
    )
}

/// network-config v2: the user-mode NIC by DHCP, the private NIC static.
pub fn network_config(spec: &SeedSpec) -> String {
    format!(
        "version: 2\nethernets:\n  user:\n    match:\n      macaddress: \"{}\"\n    set-name: eth0\n    dhcp4: true\n  private:\n    match:\n      macaddress: \"{}\"\n    set-name: eth1\n    addresses: [{}]\n",
        spec.user_mac, spec.private_mac, spec.private_address
    )
}

/// Writes a FAT image labelled `CIDATA` holding `files`.
pub fn write_image(path: &Path, files: &[(&str, String)]) -> std::io::Result<()> {
    let mut disk = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    disk.set_len(2 << 20)?;
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new().volume_label(*b"CIDATA     "),
    )?;
    let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())?;
    for (name, content) in files {
        let mut file = fs.root_dir().create_file(name)?;
        file.truncate()?;
        file.write_all(content.as_bytes())?;
        file.flush()?;
    }
    fs.unmount()?;
    disk.sync_all()
}

/// The three seed files of a VM.
pub fn files(spec: &SeedSpec) -> Result<Vec<(&'static str, String)>, TemplateError> {
    Ok(vec![
        ("user-data", user_data(spec)?),
        ("meta-data", meta_data(spec)),
        ("network-config", network_config(spec)),
    ])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Read;

    pub fn spec() -> SeedSpec {
        SeedSpec {
            stack: "demo".into(),
            instance_id: "demo-control-0".into(),
            hostname: "demo-control-0".into(),
            user: "stack".into(),
            authorized_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDlcRDUzHuYNBQ2XzLkqM1twyC5Bj1MZ4bc0PiTjxFau stack-demo".into(),
            host_private: "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n".into(),
            host_public: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKeyHostKeyHostKeyHostKeyHostKeyHost demo-control-0".into(),
            user_mac: "52:54:00:00:00:0a".into(),
            private_mac: "52:54:00:01:00:0a".into(),
            private_address: "10.42.0.10/24".into(),
            runcmd: vec!["echo 'hello \"world\"' > /tmp/hello".into()],
        }
    }

    #[test]
    fn seed_contents() {
        let spec = spec();
        insta::assert_snapshot!("user_data", user_data(&spec).unwrap());
        insta::assert_snapshot!("meta_data", meta_data(&spec));
        insta::assert_snapshot!("network_config", network_config(&spec));
    }

    #[test]
    fn the_image_holds_the_files_under_the_cidata_label() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        write_image(&path, &files(&spec()).unwrap()).unwrap();
        let mut disk = std::fs::File::open(&path).unwrap();
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "CIDATA");
        let mut text = String::new();
        fs.root_dir()
            .open_file("network-config")
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, network_config(&spec()));
    }
}
