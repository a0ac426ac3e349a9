//! Generated images kept on disk from `Generated` until delivery, so a
//! restart in Sending resends the same image instead of generating again.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::domain::{ImageRef, RequestId};

/// How the file name of a kept input image starts.
pub const INPUT_PREFIX: &str = "input-";

/// A folder of images: one generated image per request, and the input
/// images of image-to-image requests.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

impl ImageStore {
    /// # Errors
    /// When the folder cannot be created.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        crate::store::disk::create_private_dir(dir)?;
        crate::store::disk::sync_parent(dir)?;
        Ok(ImageStore {
            dir: dir.to_path_buf(),
        })
    }

    /// Writes the image owner-only, syncs its bytes, renames it into place
    /// and syncs the folder, all before returning: `Generated` is recorded
    /// only after this, and the photo sent only after that is durable, so a
    /// power cut after the send finds the same image to resend instead of
    /// asking the worker for a new one. One folder sync per image is nothing
    /// beside the seconds a generation takes.
    ///
    /// # Errors
    /// Any I/O error (disk full, permissions).
    pub fn keep(&self, id: RequestId, bytes: &[u8], format: &str) -> std::io::Result<ImageRef> {
        self.write(format!("{id}.{format}"), bytes, format)
    }

    /// Keeps image `index` of a variation request as
    /// `<request id>.<index>.<format>` (synced), before its `variation`
    /// event is written.
    ///
    /// # Errors
    /// As [`ImageStore::keep`].
    pub fn keep_variation(
        &self,
        id: RequestId,
        index: u32,
        bytes: &[u8],
        format: &str,
    ) -> std::io::Result<ImageRef> {
        self.write(format!("{id}.{index}.{format}"), bytes, format)
    }

    /// Keeps the input image of an image-to-image request (§8) as
    /// `input-<random uuid>.<format>`, synced with its folder, before the
    /// request is recorded (so before its user is told "queued"). The
    /// maintenance sweep keeps it while an unfinished request names it.
    ///
    /// # Errors
    /// As [`ImageStore::keep`].
    pub fn keep_input(&self, bytes: &[u8], format: &str) -> std::io::Result<ImageRef> {
        self.write(
            format!("{INPUT_PREFIX}{}.{format}", uuid::Uuid::new_v4()),
            bytes,
            format,
        )
    }

    fn write(&self, file: String, bytes: &[u8], format: &str) -> std::io::Result<ImageRef> {
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = self.dir.join(format!("{file}.tmp"));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(crate::store::disk::FILE_MODE)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, self.dir.join(&file))?;
        crate::store::disk::sync_dir(&self.dir)?;
        Ok(ImageRef {
            file,
            bytes: bytes.len() as u64,
            format: format.to_owned(),
        })
    }

    /// The kept bytes, or None when the file is gone or not the size recorded.
    ///
    /// # Errors
    /// I/O errors other than "not found".
    pub fn load(&self, image: &ImageRef) -> std::io::Result<Option<Vec<u8>>> {
        // The name comes from our own log; still refuse anything that could
        // leave the folder.
        if image.file.contains(['/', '\\']) || image.file.starts_with('.') {
            return Ok(None);
        }
        match fs::read(self.dir.join(&image.file)) {
            Ok(bytes) if bytes.len() as u64 == image.bytes => Ok(Some(bytes)),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes a kept image; a missing file is fine.
    ///
    /// # Errors
    /// I/O errors other than "not found".
    pub fn remove(&self, image: &ImageRef) -> std::io::Result<()> {
        if image.file.contains(['/', '\\']) {
            return Ok(());
        }
        match fs::remove_file(self.dir.join(&image.file)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
