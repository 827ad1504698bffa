//! The cloud-init NoCloud seed of a VM: user-data, meta-data and
//! network-config (pure builders), written into a small FAT image labelled
//! `CIDATA` in-process, with no external tool.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

/// What a VM's seed says about it.
#[derive(Debug, Clone)]
pub struct SeedSpec {
    pub instance_id: String,
    pub hostname: String,
    /// Rendered by [`crate::cloudinit::user_data`].
    pub user_data: String,
    pub user_mac: String,
    pub private_mac: String,
    /// `10.42.0.10/24`
    pub private_address: String,
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
pub fn files(spec: &SeedSpec) -> Vec<(&'static str, String)> {
    vec![
        ("user-data", spec.user_data.clone()),
        ("meta-data", meta_data(spec)),
        ("network-config", network_config(spec)),
    ]
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Read;

    pub fn spec() -> SeedSpec {
        SeedSpec {
            instance_id: "demo-control-0".into(),
            hostname: "demo-control-0".into(),
            user_data: "#cloud-config\nhostname: demo-control-0\n".into(),
            user_mac: "52:54:00:00:00:0a".into(),
            private_mac: "52:54:00:01:00:0a".into(),
            private_address: "10.42.0.10/24".into(),
        }
    }

    #[test]
    fn seed_contents() {
        let spec = spec();
        insta::assert_snapshot!("meta_data", meta_data(&spec));
        insta::assert_snapshot!("network_config", network_config(&spec));
    }

    #[test]
    fn the_image_holds_the_files_under_the_cidata_label() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        write_image(&path, &files(&spec())).unwrap();
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
