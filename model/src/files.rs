//! Files as whole units: written so that readers see the old contents or all of the new, never a
//! torn write; read with gzip undone. Every crate of wizard writes and reads its files through here.
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Opens `path` for reading if it is a regular file, else fails saying so: opening a FIFO would wait
/// for a writer, and a device or directory holds no file to read. Checked on the open file, so the
/// path cannot change in between.
pub fn open_regular(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    Ok(file)
}

/// [`open_regular`]'s text, which must be UTF-8.
pub fn read_regular_to_string(path: &Path) -> io::Result<String> {
    let mut text = String::new();
    open_regular(path)?.read_to_string(&mut text)?;
    Ok(text)
}

/// Replaces `path` with `bytes` atomically.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_with(path, |temporary| fs::write(temporary, bytes))
}

/// Replaces `path` atomically with what `write` puts at the path it is given: a fresh temporary file
/// beside `path` (same file system, so the rename is atomic), flushed to disk and renamed over
/// `path`, or removed if anything fails. The result has the mode a plain new file gets (writers that
/// make their own private temporary, as the `safetensors` crate does, would leave it 0600). A device
/// or pipe (`/dev/stdout`) is written in place, since a rename would replace it.
pub fn replace_with(path: &Path, write: impl FnOnce(&Path) -> io::Result<()>) -> io::Result<()> {
    if fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
        return write(path);
    }
    let (temporary, created) = create_temporary_beside(path)?;
    let result = created.metadata().and_then(|created| {
        write(&temporary)?;
        fs::set_permissions(&temporary, created.permissions())?;
        File::open(&temporary)?.sync_all()?;
        fs::rename(&temporary, path)
    });
    if result.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    result
}

/// A new file `.name.<pid>.<n>.tmp` beside `path`, unique across processes and across threads of
/// this one, and made by this call: a name already there (a link planted to redirect the write)
/// is passed over, never opened.
fn create_temporary_beside(path: &Path) -> io::Result<(PathBuf, File)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let mut attempts = 0;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let temporary = path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()));
        match fs::OpenOptions::new().write(true).create_new(true).open(&temporary) {
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists && attempts < 64 => attempts += 1,
            result => return result.map(|file| (temporary, file)),
        }
    }
}

/// Opens `path` for buffered reading, decompressing it if it is gzip (recognised by its magic bytes,
/// whatever the file is called).
pub fn open(path: &Path) -> io::Result<Box<dyn BufRead + Send>> {
    let mut reader = BufReader::new(File::open(path)?);
    let gzip = reader.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    Ok(if gzip { Box::new(BufReader::new(flate2::bufread::MultiGzDecoder::new(reader))) } else { Box::new(reader) })
}

/// The whole of `path` as bytes, gzip undone.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn a_replaced_file_is_whole_and_no_temporary_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomically(&path, b"old").unwrap();
        write_atomically(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let failed = replace_with(&path, |temporary| {
            fs::write(temporary, b"half")?;
            Err(io::Error::other("disk full"))
        });
        assert_eq!(failed.unwrap_err().to_string(), "disk full");
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["state.json"], "temporary files left behind");
        write_atomically(Path::new("/dev/null"), b"in place").unwrap();
        let full = write_atomically(Path::new("/dev/full"), b"in place").unwrap_err();
        assert_eq!(full.kind(), io::ErrorKind::StorageFull, "{full}");
    }

    #[test]
    fn a_replaced_file_has_a_new_files_mode_whatever_the_writer_made() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        File::create(&plain).unwrap();
        let expected = fs::metadata(&plain).unwrap().permissions().mode();
        let path = dir.path().join("model.safetensors");
        replace_with(&path, |temporary| {
            // What the `safetensors` crate does: a private file of its own, renamed over the path.
            let private = tempfile::NamedTempFile::new_in(dir.path())?;
            fs::write(private.path(), b"weights")?;
            private.persist(temporary).map(drop).map_err(|e| e.error)
        })
        .unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"weights");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode(), expected);
    }

    #[test]
    fn gzip_is_undone_by_content_not_name() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain.gz");
        fs::write(&plain, b"text\n").unwrap();
        let packed = dir.path().join("packed.jsonl");
        let mut encoder = flate2::write::GzEncoder::new(File::create(&packed).unwrap(), flate2::Compression::fast());
        encoder.write_all(b"text\n").unwrap();
        encoder.finish().unwrap();
        assert_eq!(read(&plain).unwrap(), b"text\n");
        assert_eq!(read(&packed).unwrap(), b"text\n");
    }
}
