//! Private files written atomically: a temporary file in the same directory,
//! created with mode 0600, synced, then renamed over the target.

use std::io::Write;
use std::path::Path;

use crate::error::{io_reason, Error};

/// Creates `dir` (and its parents) if missing; a directory created here gets
/// mode 0700.
///
/// # Errors
/// When the directory cannot be created.
pub fn create_private_dir(dir: &Path) -> Result<(), Error> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|e| Error::WriteFile {
        path: dir.to_owned(),
        reason: io_reason(&e),
    })
}

/// Replaces `path` with `contents` atomically; the file has mode 0600 (the
/// temporary file is created with it, so the contents are never readable by
/// others, not even for a moment).
///
/// # Errors
/// When the temporary file cannot be written or renamed.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), Error> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let fail = |e: std::io::Error| Error::WriteFile {
        path: path.to_owned(),
        reason: io_reason(&e),
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".tmp-").suffix(".part");
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600));
    let mut tmp = builder.tempfile_in(dir).map_err(fail)?;
    tmp.write_all(contents).map_err(fail)?;
    tmp.as_file().sync_all().map_err(fail)?;
    tmp.persist(path).map_err(|e| fail(e.error))?;
    // Make the rename durable; a failure here leaves a complete file anyway.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_private_files_atomically_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "old").unwrap();
        write_private(&path, b"new contents").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new contents");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn reports_the_path_it_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("f");
        let err = write_private(&path, b"x").unwrap_err();
        assert!(err.to_string().contains("missing-dir"), "{err}");
    }
}
