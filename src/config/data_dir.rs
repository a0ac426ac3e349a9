//! The data dir's layout: the one place that knows where each part of it
//! lives. Everything else asks a [`DataDir`] for its path.

use std::path::{Path, PathBuf};

/// A data dir (`EASEL_DATA_DIR`, `--data-dir`) and the paths inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir { root: root.into() }
    }

    /// For the operator commands: the `--data-dir` flag, then
    /// `EASEL_DATA_DIR` (from the environment or `.env`), then `./data`
    /// (`easel run` reads the same variable through its settings).
    pub fn resolve(flag: Option<PathBuf>) -> Self {
        let _ = dotenvy::dotenv();
        DataDir::new(
            flag.or_else(|| std::env::var_os("EASEL_DATA_DIR").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from("./data")),
        )
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The event log (a sled database folder).
    pub fn log(&self) -> PathBuf {
        self.root.join("log")
    }

    /// The log's lock file. The store makes it beside the log folder (which
    /// compaction renames), as `<log>.lock`; named here so the layout is
    /// written down in one place.
    pub fn lock(&self) -> PathBuf {
        self.root.join("log.lock")
    }

    /// Kept images, from `Generated` until the originals' lifetime passed.
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }

    /// Retention's numbered archive files.
    pub fn archive(&self) -> PathBuf {
        self.root.join("archive")
    }

    /// The running bot's read-only query socket.
    pub fn socket(&self) -> PathBuf {
        self.root.join("easel.sock")
    }
}

impl std::fmt::Display for DataDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.root.display().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::DataDir;

    #[test]
    fn the_lock_is_where_the_store_makes_it() {
        let d = DataDir::new("/srv/easel");
        assert_eq!(d.lock(), crate::store::disk::DirLock::path_for(&d.log()));
        assert_eq!(d.to_string(), "/srv/easel");
    }
}
