//! The Vagrantfile of the development box.

use std::path::Path;
use std::process::Command;

use crate::support::{expect_code, text};

#[test]
fn the_vagrantfile_validates() {
    // In a copy, not in the checkout: `vagrant validate` writes `.vagrant/`
    // beside the Vagrantfile, and its home (boxes, plugin state) goes there too.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("Vagrantfile"),
        dir.path().join("Vagrantfile"),
    )
    .unwrap();
    let output = Command::new("vagrant")
        .arg("validate")
        .current_dir(dir.path())
        .env("VAGRANT_CHECKPOINT_DISABLE", "1")
        .env("VAGRANT_HOME", dir.path().join("vagrant.d"))
        .output()
        .expect("vagrant runs (.ci/run installs it)");
    expect_code(&output, 0);
    assert!(text(&output.stdout).contains("Vagrantfile validated successfully"));
}
