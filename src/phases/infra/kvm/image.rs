//! Base images and the per-VM disks on top of them: downloads into a cache
//! shared by all stacks (`$XDG_CACHE_HOME/stack/images`), verified by their
//! checksum (sha256 or sha512) before use, resumed when a download broke off and redone when the bytes
//! are wrong; each VM gets a qcow2 copy-on-write overlay made by `qemu-img`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256, Sha512};

use crate::files::{failed, FileError};
use crate::model::{Checksum, HashAlgorithm};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Io(#[from] FileError),
    #[error("downloading {url}: {message}")]
    Download { url: String, message: String },
    #[error("{url} has {found}, the stack expects {expected}")]
    Checksum {
        url: String,
        expected: String,
        found: String,
    },
    #[error("qemu-img {args} failed: {message}")]
    QemuImg { args: String, message: String },
}

/// How often a broken-off download is resumed before giving up.
const DOWNLOAD_ATTEMPTS: u32 = 4;

/// The shared image cache folder.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("stack/images")
}

/// The file's checksum with the given algorithm.
fn checksum_of(path: &Path, algorithm: HashAlgorithm) -> Result<Checksum, ImageError> {
    fn hex_digest<D: Digest>(path: &Path) -> Result<String, ImageError> {
        let mut file = std::fs::File::open(path).map_err(failed("read", path))?;
        let mut hasher = D::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(failed("read", path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect())
    }
    let hex = match algorithm {
        HashAlgorithm::Sha256 => hex_digest::<Sha256>(path)?,
        HashAlgorithm::Sha512 => hex_digest::<Sha512>(path)?,
    };
    Ok(Checksum { algorithm, hex })
}

/// The cached, verified copy of `url`, downloading what is missing. Cached
/// files are named by their checksum's hex digits (64 for sha256, 128 for
/// sha512, so the two cannot collide).
pub async fn fetch(url: &str, checksum: &Checksum) -> Result<PathBuf, ImageError> {
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).map_err(failed("create", &dir))?;
    let name = &checksum.hex;
    let done = dir.join(format!("{name}.img"));
    if done.exists() {
        return Ok(done);
    }
    // One download of an image at a time, across VMs, stacks and processes.
    let lock_path = dir.join(format!("{name}.lock"));
    let lock = std::fs::File::create(&lock_path).map_err(failed("create", &lock_path))?;
    let lock = tokio::task::spawn_blocking(move || lock.lock().map(|()| lock))
        .await
        .expect("the lock task does not panic")
        .map_err(failed("lock", &lock_path))?;
    if done.exists() {
        return Ok(done);
    }
    let part = dir.join(format!("{name}.part"));
    // A broken-off download is resumed (a few times); bytes that turn out
    // wrong are thrown away and fetched once more from the start.
    for fresh in [false, true] {
        if fresh {
            let _ = std::fs::remove_file(&part);
        }
        let mut attempt = 1;
        while let Err(err) = download(url, &part).await {
            if attempt == DOWNLOAD_ATTEMPTS {
                return Err(err);
            }
            tracing::warn!(%url, attempt, "download broke off, resuming: {err}");
            attempt += 1;
        }
        let found = checksum_of(&part, checksum.algorithm)?;
        if &found == checksum {
            std::fs::rename(&part, &done).map_err(failed("store", &done))?;
            drop(lock);
            return Ok(done);
        }
        if fresh {
            let _ = std::fs::remove_file(&part);
            return Err(ImageError::Checksum {
                url: url.to_string(),
                expected: checksum.to_string(),
                found: found.to_string(),
            });
        }
        tracing::warn!(%url, "the download has {found}, not {checksum}: fetching it again");
    }
    unreachable!("the second pass returns")
}

/// Appends to `part` from where it stopped (HTTP Range), or starts over.
async fn download(url: &str, part: &Path) -> Result<(), ImageError> {
    let error = |message: String| ImageError::Download {
        url: url.to_string(),
        message,
    };
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let client = reqwest::Client::new();
    let mut request = client.get(url);
    if have > 0 {
        request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let mut response = request.send().await.map_err(|e| error(e.to_string()))?;
    let status = response.status();
    if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
        return Ok(());
    }
    if !status.is_success() {
        return Err(error(format!("the server answered {status}")));
    }
    let append = status == reqwest::StatusCode::PARTIAL_CONTENT;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(part)
        .map_err(failed("write", part))?;
    while let Some(chunk) = response.chunk().await.map_err(|e| error(e.to_string()))? {
        file.write_all(&chunk).map_err(failed("write", part))?;
    }
    Ok(file.sync_all().map_err(failed("write", part))?)
}

fn qemu_img(args: &[&str]) -> Result<String, ImageError> {
    let output = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| ImageError::QemuImg {
            args: args.join(" "),
            message: format!("cannot run qemu-img: {e}"),
        })?;
    if !output.status.success() {
        return Err(ImageError::QemuImg {
            args: args.join(" "),
            message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `(format, virtual size in bytes)` of an image.
pub fn info(path: &Path) -> Result<(String, u64), ImageError> {
    let text = qemu_img(&["info", "--output=json", "-U", &path.display().to_string()])?;
    let info: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    Ok((
        info["format"].as_str().unwrap_or("raw").to_string(),
        info["virtual-size"].as_u64().unwrap_or(0),
    ))
}

/// A qcow2 overlay of `size` bytes backed by `base`.
pub fn create_overlay(base: &Path, overlay: &Path, size: u64) -> Result<(), ImageError> {
    let base = std::fs::canonicalize(base).map_err(failed("find the base image", base))?;
    let (format, base_size) = info(&base)?;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        &format,
        "-b",
        &base.display().to_string(),
        &overlay.display().to_string(),
        &size.max(base_size).to_string(),
    ])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_of_both_algorithms() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("abc");
        std::fs::write(&file, "abc").unwrap();
        assert_eq!(
            checksum_of(&file, HashAlgorithm::Sha256)
                .unwrap()
                .to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            checksum_of(&file, HashAlgorithm::Sha512)
                .unwrap()
                .to_string(),
            "sha512:ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a\
             2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"
        );
    }
}
