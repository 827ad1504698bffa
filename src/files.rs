//! Private files (state, keys): created with mode 0600 and flushed to disk
//! before they are renamed into place, so a crash never leaves half a file.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `data` to `path` (normally a temporary name) with mode 0600 and fsyncs it.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(data)?;
    file.sync_all()
}
