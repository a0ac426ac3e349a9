//! What the log needs of the file system beyond sled: the lock that makes
//! one process the owner of a log (taken before anything in the folder is
//! touched), syncs that really reach the disk (`fdatasync`, `fsync` of
//! folders after creates and renames), and owner-only modes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Owner-only modes for everything in the data dir (§6).
pub const DIR_MODE: u32 = 0o700;
pub const FILE_MODE: u32 = 0o600;

/// Makes every file and folder this process creates from now on owner-only
/// (umask 077), sled's files and the query socket included: set before the
/// first is made, so there is no window in which others can read one.
pub fn private_umask() {
    // SAFETY: umask only swaps the process's file-mode mask; it cannot fail
    // and touches no memory.
    unsafe {
        libc::umask(0o077);
    }
}

/// An exclusive `flock` on `<log>.lock`, held for as long as this value
/// lives. Whoever writes, reads a stopped log or compacts holds it, and
/// takes it *before* tidying up an interrupted compaction, so no process
/// ever removes a copy another process is still writing. The lock file sits
/// beside the log folder (not in it) because compaction renames the folder.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Why the lock could not be had.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{0} is in use by another easel process")]
    Busy(PathBuf),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

impl DirLock {
    /// The lock file of the log folder `log`.
    pub fn path_for(log: &Path) -> PathBuf {
        sibling(log, ".lock")
    }

    /// Takes the lock, waiting at most `wait` while another holder has it.
    ///
    /// # Errors
    /// [`LockError::Busy`] when it is still held after `wait`.
    pub fn acquire(log: &Path, wait: Duration) -> Result<Self, LockError> {
        let path = Self::path_for(log);
        // A missing data dir is made owner-only; an existing one is left
        // as it is (it may be a folder the operator shares, such as /tmp:
        // what easel puts in it is owner-only by itself).
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            make_dir(parent).map_err(|e| LockError::Io(parent.to_path_buf(), e))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(&path)
            .map_err(|e| LockError::Io(path.clone(), e))?;
        let deadline = Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(DirLock { _file: file }),
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(LockError::Busy(log.to_path_buf()));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(LockError::Io(path, e)),
            }
        }
    }
}

/// `<dir><suffix>` beside `dir` (`log` → `log.lock`, `log.compact`).
pub fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    dir.with_file_name(name)
}

/// Creates `dir` and missing parents, owner-only; an existing one is left
/// as it is.
fn make_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
}

/// Creates `dir` (and missing parents) owner-only; an existing folder that
/// others can read is narrowed to owner-only. Only for folders that are
/// easel's own (the log, images, archive), never a folder it was pointed at.
///
/// # Errors
/// Any I/O error.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    make_dir(dir)?;
    narrow(dir, DIR_MODE)
}

/// Creates the data dir owner-only when it is missing. An existing data dir
/// is not changed (the operator may have pointed easel at a shared folder);
/// if others can enter it, that is said once in the log — everything easel
/// creates inside is owner-only either way.
///
/// # Errors
/// Any I/O error.
pub fn create_data_dir(dir: &Path) -> std::io::Result<()> {
    make_dir(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{:o}", mode & 0o777),
            "the data dir can be entered by others; what easel keeps in it is owner-only, but `chmod 700` it if it is easel's alone"
        );
    }
    Ok(())
}

/// Takes group and other bits off `path` when it has any.
///
/// # Errors
/// Any I/O error.
pub fn narrow(path: &Path, mode: u32) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Narrows every file and folder under `dir` (sled's files of a log made
/// before modes were set, or by a process with a wide umask).
///
/// # Errors
/// Any I/O error.
pub fn narrow_tree(dir: &Path) -> std::io::Result<()> {
    narrow(dir, DIR_MODE)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            narrow_tree(&path)?;
        } else {
            narrow(&path, FILE_MODE)?;
        }
    }
    Ok(())
}

/// `fsync` of a folder, so the names created or renamed in it survive a
/// power cut (a file's own sync does not cover its directory entry).
///
/// # Errors
/// Any I/O error.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `fsync` of `path`'s parent folder (the current folder for a bare name).
///
/// # Errors
/// Any I/O error.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(Path::new(".")),
    }
}
