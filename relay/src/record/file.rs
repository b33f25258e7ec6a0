//! The recording on disk: the whole container ([`relay_codec::recording`]) as ONE age
//! stream, encrypted to the portal's review key (an X25519 recipient) as it is written.
//!
//! age's STREAM construction seals the plaintext in 64 KiB blocks, each authenticated,
//! the last one marked final. A file cut off by a crash, `kill -9` or a full disk
//! therefore decrypts up to its last complete block: [`open_recording`] keeps those
//! bytes and says how much could not be decrypted, and `Recording::parse` then reads
//! the container up to its last complete chunk. What a crash loses is the open chunk
//! (in memory) plus at most the last 64 KiB age block (age cannot seal a partial
//! block without ending the stream).
//!
//! This is plain blocking IO: the recorder runs a [`RecordingFileWriter`] on a blocking
//! thread of its own, off the media path.
//!
//! Files are laid out as `<dir>/<portal>/<yyyy-mm-dd>/<session-id>.rec` (UTC date of
//! the recording's start; see [`recording_path`]), so that retention can purge by day
//! and `relay recordings list` finds them by walking the directory.

use std::fs::File;
use std::io::{self, Read, Write};
use std::iter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use age::x25519;

/// The file name extension of recordings.
pub const RECORDING_EXTENSION: &str = "rec";

/// Plaintext bytes in one age STREAM block.
pub const AGE_BLOCK_BYTES: u64 = 64 * 1024;
/// Bytes of one sealed age STREAM block on disk (plaintext and a 16-byte tag).
const AGE_SEALED_BLOCK_BYTES: u64 = AGE_BLOCK_BYTES + 16;
/// The age payload starts with a 16-byte nonce after the header.
const AGE_NONCE_BYTES: u64 = 16;
/// The largest recording read into memory (the container's reader works on a slice).
const MAX_RECORDING_BYTES: u64 = 16 * 1024 * 1024 * 1024;

/// Where the recording of `session_id` (portal `portal`, started at `start_unix_ms`)
/// lives under `dir`: `<dir>/<portal>/<yyyy-mm-dd>/<session-id>.rec`. Characters other
/// than ASCII letters, digits, `-`, `_` and `.` in the portal or session id become `_`,
/// so that neither can leave its folder.
pub fn recording_path(dir: &Path, portal: &str, start_unix_ms: u64, session_id: &str) -> PathBuf {
    let (year, month, day) = civil_date(start_unix_ms / 1000 / 86_400);
    dir.join(safe_component(portal))
        .join(format!("{year:04}-{month:02}-{day:02}"))
        .join(format!(
            "{}.{RECORDING_EXTENSION}",
            safe_component(session_id)
        ))
}

fn safe_component(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match cleaned.as_str() {
        "" | "." | ".." => "_".to_owned(),
        // Sessions only start in portals of at most 64 characters; anything longer (a
        // session id from elsewhere) is cut and made unique with a hash, so that the
        // name always fits a file system's 255 bytes.
        _ if cleaned.len() > MAX_COMPONENT_BYTES => {
            use sha2::Digest as _;
            let digest = sha2::Sha256::digest(s.as_bytes());
            format!(
                "{}~{}",
                &cleaned[..MAX_COMPONENT_BYTES - 17],
                hex::encode(&digest[..8])
            )
        }
        _ => cleaned,
    }
}

/// Longest folder or file name part [`recording_path`] makes from a portal or session
/// id (ASCII after cleaning, so bytes are characters).
const MAX_COMPONENT_BYTES: usize = 100;

/// The (year, month, day) of a day number counted from 1970-01-01 (proleptic
/// Gregorian; Howard Hinnant's `civil_from_days`).
pub fn civil_date(days: u64) -> (i64, u32, u32) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// When the writer asks the OS to put the file on disk (`fsync`).
///
/// A killed relay loses nothing by skipping fsync (the kernel still holds the pages);
/// only a crash of the machine does. Syncing after every chunk costs one fsync per
/// second per session, which hundreds of sessions on one disk cannot afford, and does
/// not even secure the chunk: age keeps the last partial 64 KiB block in memory. So
/// the default syncs at most every [`SyncPolicy::DEFAULT_INTERVAL`]: a power loss costs
/// at most that much more than a `kill -9`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// fsync after every chunk.
    EveryChunk,
    /// fsync after a chunk when the last fsync is at least this old.
    Interval(Duration),
    /// Never fsync before [`RecordingFileWriter::finish`] (tests, tmpfs).
    OnFinish,
}

impl SyncPolicy {
    /// The default interval: 5 s.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
}

impl Default for SyncPolicy {
    fn default() -> Self {
        SyncPolicy::Interval(Self::DEFAULT_INTERVAL)
    }
}

/// Why a recording file could not be written, opened or read.
#[derive(Debug, thiserror::Error)]
pub enum RecordingFileError {
    /// The file system refused.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// An output file that already exists (recordings are never overwritten).
    #[error("{0} exists; recordings are never overwritten")]
    Exists(PathBuf),
    /// The file is not an age file at all.
    #[error("{0} is not a recording (not an age-encrypted file)")]
    NotEncrypted(PathBuf),
    /// An age file encrypted with a passphrase, not to a review key: an identity file,
    /// say, given where a recording was expected.
    #[error("{0} is not a recording (it is encrypted with a passphrase, not to a review key)")]
    PassphraseEncrypted(PathBuf),
    /// The file is encrypted to another key (another portal's, or a rotated one).
    #[error("{0}: this recording is not for this identity (it is encrypted to another review key)")]
    NotForThisIdentity(PathBuf),
    /// The age header is damaged.
    #[error("{path}: the encryption header is damaged: {detail}")]
    DamagedHeader {
        /// The file.
        path: PathBuf,
        /// What age said.
        detail: String,
    },
    /// The file is larger than the review tools read.
    #[error(
        "{path} is {len} bytes, more than the {MAX_RECORDING_BYTES} bytes the review tools read"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// age refused to encrypt (an unusable recipient).
    #[error("cannot encrypt to the review key: {0}")]
    Encrypt(String),
    /// Not a regular file: a directory, FIFO, socket or device where a recording was
    /// expected.
    #[error("{path} is not a regular file (it is {kind}); give the path of a recording")]
    NotAFile {
        /// The path.
        path: PathBuf,
        /// What it is instead ("a directory", "a FIFO", …).
        kind: &'static str,
    },
}

/// What a file type is, in words, for errors.
pub fn file_kind(file_type: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() || file_type.is_block_device() {
        "a device"
    } else if file_type.is_file() {
        "a regular file"
    } else {
        "not a file"
    }
}

/// Opens `path` for reading if it is a regular file (following symlinks), without
/// blocking on a FIFO or a device: it is opened non-blocking and checked with `fstat`,
/// so nothing can swap it between the check and the read.
pub fn open_regular(path: &Path) -> Result<File, RecordingFileError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io_error(path))?;
    let file_type = file.metadata().map_err(io_error(path))?.file_type();
    if !file_type.is_file() {
        return Err(RecordingFileError::NotAFile {
            path: path.to_owned(),
            kind: file_kind(file_type),
        });
    }
    Ok(file)
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> RecordingFileError + '_ {
    move |source| RecordingFileError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Appends a recording's bytes to a new file, encrypting them as one age stream.
///
/// Hand it the header bytes from `RecordingWriter::new` at creation, each chunk's
/// bytes with [`append_chunk`](Self::append_chunk), and the footer from
/// `RecordingWriter::finish` with [`finish`](Self::finish). A file that never sees
/// `finish` (a crash) is still readable up to its last complete 64 KiB block.
pub struct RecordingFileWriter {
    path: PathBuf,
    file: Arc<File>,
    stream: age::stream::StreamWriter<Arc<File>>,
    sync: SyncPolicy,
    last_sync: Instant,
    plaintext_bytes: u64,
}

impl std::fmt::Debug for RecordingFileWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingFileWriter")
            .field("path", &self.path)
            .field("sync", &self.sync)
            .field("plaintext_bytes", &self.plaintext_bytes)
            .finish_non_exhaustive()
    }
}

impl RecordingFileWriter {
    /// Creates `path` (and its folders; never overwriting a file), readable by its
    /// owner only, starts the age stream to `recipient` and writes the container's
    /// `header` bytes.
    pub fn create(
        path: &Path,
        recipient: &x25519::Recipient,
        header: &[u8],
        sync: SyncPolicy,
    ) -> Result<Self, RecordingFileError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io_error(parent))?;
        }
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| match e.kind() {
                    io::ErrorKind::AlreadyExists => RecordingFileError::Exists(path.to_owned()),
                    _ => io_error(path)(e),
                })?
        };
        let file = Arc::new(file);
        let encryptor =
            age::Encryptor::with_recipients(iter::once(recipient as &dyn age::Recipient))
                .map_err(|e| RecordingFileError::Encrypt(e.to_string()))?;
        let stream = encryptor
            .wrap_output(Arc::clone(&file))
            .map_err(io_error(path))?;
        let mut writer = Self {
            path: path.to_owned(),
            file,
            stream,
            sync,
            last_sync: Instant::now(),
            plaintext_bytes: 0,
        };
        writer.write(header)?;
        Ok(writer)
    }

    /// Appends a closed chunk's bytes, then syncs as the policy says. Every complete
    /// 64 KiB age block is in the file when this returns.
    pub fn append_chunk(&mut self, chunk: &[u8]) -> Result<(), RecordingFileError> {
        self.write(chunk)?;
        let due = match self.sync {
            SyncPolicy::EveryChunk => true,
            SyncPolicy::Interval(every) => self.last_sync.elapsed() >= every,
            SyncPolicy::OnFinish => false,
        };
        if due {
            self.file.sync_data().map_err(io_error(&self.path))?;
            self.last_sync = Instant::now();
        }
        Ok(())
    }

    /// Writes the container's last bytes (the open chunk and the footer), seals the
    /// age stream and syncs the file. Returns the file's size.
    pub fn finish(mut self, footer: &[u8]) -> Result<u64, RecordingFileError> {
        self.write(footer)?;
        let file = self.stream.finish().map_err(io_error(&self.path))?;
        file.sync_all().map_err(io_error(&self.path))?;
        let len = file.metadata().map_err(io_error(&self.path))?.len();
        Ok(len)
    }

    /// Plaintext (container) bytes handed over so far.
    pub fn plaintext_bytes(&self) -> u64 {
        self.plaintext_bytes
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), RecordingFileError> {
        self.stream.write_all(bytes).map_err(io_error(&self.path))?;
        self.plaintext_bytes += bytes.len() as u64;
        Ok(())
    }
}

/// Writes a whole container to a new file (never overwriting), encrypted to
/// `recipient`: what `relay recordings repair` produces.
pub fn write_recording(
    path: &Path,
    recipient: &x25519::Recipient,
    container: &[u8],
) -> Result<u64, RecordingFileError> {
    RecordingFileWriter::create(path, recipient, container, SyncPolicy::OnFinish)?.finish(&[])
}

/// What the encryption layer of a recording file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncryptionStatus {
    /// The age stream is complete and every block authenticated.
    Intact,
    /// The age stream ends without its final block (a crash, a full disk): everything
    /// before the last complete block was decrypted.
    CutOff {
        /// Bytes of ciphertext at the end of the file that could not be decrypted (a
        /// partial block, or a complete one not marked final).
        undecryptable_bytes: u64,
    },
    /// A block in the middle failed to authenticate (damage on disk): the blocks after
    /// it cannot be read either (STREAM blocks are read in order here).
    Damaged {
        /// The index of the first block that failed.
        block: u64,
        /// Bytes of ciphertext from that block to the end of the file.
        undecryptable_bytes: u64,
    },
}

impl EncryptionStatus {
    /// Whether every byte of the file was decrypted.
    pub fn is_intact(&self) -> bool {
        matches!(self, EncryptionStatus::Intact)
    }
}

impl std::fmt::Display for EncryptionStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EncryptionStatus::Intact => write!(f, "intact (age stream complete)"),
            EncryptionStatus::CutOff {
                undecryptable_bytes: 0,
            } => write!(
                f,
                "cut off: the age stream ends after a complete block, without its final block"
            ),
            EncryptionStatus::CutOff {
                undecryptable_bytes,
            } => write!(
                f,
                "cut off: the age stream has no final block; the last {undecryptable_bytes} \
                 bytes of the file (up to one 64 KiB block) could not be decrypted"
            ),
            EncryptionStatus::Damaged {
                block,
                undecryptable_bytes,
            } => write!(
                f,
                "damaged: age block {block} fails authentication; the {undecryptable_bytes} \
                 bytes from it to the end of the file could not be decrypted"
            ),
        }
    }
}

/// A recording file, decrypted as far as possible.
#[derive(Debug)]
pub struct DecryptedRecording {
    /// The container's bytes: all of them, or those before the encryption layer broke
    /// off. Hand them to `Recording::parse`.
    pub container: Vec<u8>,
    /// Whether the encryption layer was complete.
    pub status: EncryptionStatus,
    /// Size of the file on disk.
    pub file_bytes: u64,
}

/// Opens a recording file with a portal's identity and decrypts it.
///
/// A stream that breaks off (cut off, or a damaged block) is not an error: the bytes
/// decrypted before the break are returned with a status that says what was lost.
/// Errors are for files that cannot be read at all: not an age file, encrypted to
/// another key, a damaged age header.
pub fn open_recording(
    path: &Path,
    identity: &x25519::Identity,
) -> Result<DecryptedRecording, RecordingFileError> {
    let file = open_regular(path)?;
    let file_bytes = file.metadata().map_err(io_error(path))?.len();
    if file_bytes > MAX_RECORDING_BYTES {
        return Err(RecordingFileError::TooLarge {
            path: path.to_owned(),
            len: file_bytes,
        });
    }
    let mut header_probe = Vec::new();
    (&file)
        .take(4096)
        .read_to_end(&mut header_probe)
        .map_err(io_error(path))?;
    let file = open_regular(path)?;
    let decryptor =
        age::Decryptor::new_buffered(io::BufReader::new(file)).map_err(|e| match e {
            age::DecryptError::Io(e) if e.kind() != io::ErrorKind::UnexpectedEof => {
                io_error(path)(e)
            }
            age::DecryptError::InvalidHeader
            | age::DecryptError::UnknownFormat
            | age::DecryptError::Io(_)
                if !header_probe.starts_with(b"age-encryption.org/") =>
            {
                RecordingFileError::NotEncrypted(path.to_owned())
            }
            other => RecordingFileError::DamagedHeader {
                path: path.to_owned(),
                detail: other.to_string(),
            },
        })?;
    if decryptor.is_scrypt() {
        return Err(RecordingFileError::PassphraseEncrypted(path.to_owned()));
    }
    let mut reader = decryptor
        .decrypt(iter::once(identity as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => {
                RecordingFileError::NotForThisIdentity(path.to_owned())
            }
            other => RecordingFileError::DamagedHeader {
                path: path.to_owned(),
                detail: other.to_string(),
            },
        })?;

    let mut container = Vec::new();
    let mut buf = vec![0; AGE_BLOCK_BYTES as usize];
    let status = loop {
        match reader.read(&mut buf) {
            Ok(0) => break EncryptionStatus::Intact,
            Ok(n) => container.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData
                ) =>
            {
                // age hands out a block only once it authenticated, so everything
                // before the error is genuine; the error is at block `blocks`.
                let blocks = container.len() as u64 / AGE_BLOCK_BYTES;
                let consumed = payload_start(&header_probe)
                    .map(|start| start + AGE_NONCE_BYTES + blocks * AGE_SEALED_BLOCK_BYTES);
                let undecryptable_bytes =
                    consumed.map_or(0, |consumed| file_bytes.saturating_sub(consumed));
                break if undecryptable_bytes > AGE_SEALED_BLOCK_BYTES {
                    EncryptionStatus::Damaged {
                        block: blocks,
                        undecryptable_bytes,
                    }
                } else {
                    EncryptionStatus::CutOff {
                        undecryptable_bytes,
                    }
                };
            }
            Err(e) => return Err(io_error(path)(e)),
        }
    };
    Ok(DecryptedRecording {
        container,
        status,
        file_bytes,
    })
}

/// Where an age file's payload (its nonce) starts: after the header's MAC line,
/// `--- <base64 MAC>\n` (age-encryption.org/v1).
fn payload_start(prefix: &[u8]) -> Option<u64> {
    let mac_line = prefix.windows(5).position(|w| w == b"\n--- ")? + 1;
    let end = prefix[mac_line..].iter().position(|&b| b == b'\n')?;
    Some((mac_line + end + 1) as u64)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use relay_codec::recording::{
        ChunkSettings, Record, Recording, RecordingHeader, RecordingWriter, VideoFrame,
    };

    use super::*;

    /// A recording of `frames` 20 KiB video frames (incompressible), 15 per second,
    /// written through the file layer; returns the file's bytes and the container's.
    fn write_sample(dir: &Path, recipient: &x25519::Recipient, frames: u32) -> (PathBuf, Vec<u8>) {
        let header = RecordingHeader {
            session_id: "s1".into(),
            portal: "support".into(),
            start_unix_ms: 1_700_000_000_000,
            video_codecs: vec!["video/VP8".into()],
            audio_codecs: vec![],
        };
        let (mut writer, header_bytes) =
            RecordingWriter::new(&header, ChunkSettings::default()).unwrap();
        let path = recording_path(dir, "support", header.start_unix_ms, "s1");
        let mut file =
            RecordingFileWriter::create(&path, recipient, &header_bytes, SyncPolicy::EveryChunk)
                .unwrap();
        let mut plain = header_bytes.to_vec();
        let mut seed = 7u32;
        for i in 0..frames {
            let data: Vec<u8> = (0..20 * 1024)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 24) as u8
                })
                .collect();
            let frame = Record::Video(VideoFrame {
                keyframe: i % 15 == 0,
                codec: 0,
                rtp_timestamp: i * 6000,
                data: Bytes::from(data),
            });
            if let Some(chunk) = writer.push(u64::from(i) * 1000 / 15, &frame).unwrap() {
                file.append_chunk(&chunk).unwrap();
                plain.extend_from_slice(&chunk);
            }
        }
        let footer = writer.finish();
        plain.extend_from_slice(&footer);
        file.finish(&footer).unwrap();
        (path, plain)
    }

    #[test]
    fn paths_are_by_portal_and_utc_day_and_stay_inside_the_folder() {
        let dir = Path::new("/rec");
        assert_eq!(
            recording_path(dir, "support", 1_700_000_000_000, "abc-123"),
            Path::new("/rec/support/2023-11-14/abc-123.rec")
        );
        assert_eq!(
            recording_path(dir, "../etc", 0, "a/b"),
            Path::new("/rec/.._etc/1970-01-01/a_b.rec")
        );
        assert_eq!(
            recording_path(dir, "..", 0, ""),
            Path::new("/rec/_/1970-01-01/_.rec")
        );
        let long = recording_path(dir, &"p".repeat(300), 0, "s");
        let folder = long.iter().nth(2).unwrap().to_str().unwrap().to_owned();
        assert!(folder.len() <= 100, "{folder}");
        assert!(folder.starts_with("ppp"), "{folder}");
        assert_ne!(
            recording_path(dir, &"p".repeat(301), 0, "s"),
            long,
            "cut names stay apart"
        );
        assert_eq!(civil_date(19_723), (2024, 1, 1));
        assert_eq!(civil_date(19_782), (2024, 2, 29));
    }

    #[test]
    fn round_trip_through_age() {
        let dir = tempfile::tempdir().unwrap();
        let identity = x25519::Identity::generate();
        let (path, plain) = write_sample(dir.path(), &identity.to_public(), 45);
        let on_disk = std::fs::read(&path).unwrap();
        assert!(on_disk.starts_with(b"age-encryption.org/v1\n"));
        assert!(
            !on_disk.windows(8).any(|w| w == b"\x89RLYREC\n"),
            "nothing in clear"
        );

        let opened = open_recording(&path, &identity).unwrap();
        assert_eq!(opened.status, EncryptionStatus::Intact);
        assert_eq!(opened.container, plain);
        assert_eq!(opened.file_bytes, on_disk.len() as u64);
        let report = Recording::parse(&opened.container).unwrap().verify();
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.counts.video_frames, 45);

        // Never overwritten.
        let err =
            RecordingFileWriter::create(&path, &identity.to_public(), b"x", SyncPolicy::default())
                .unwrap_err();
        assert!(matches!(err, RecordingFileError::Exists(_)), "{err}");
    }

    #[test]
    fn a_cut_off_stream_keeps_every_complete_chunk_before_the_lost_block() {
        let dir = tempfile::tempdir().unwrap();
        let identity = x25519::Identity::generate();
        // About 900 KiB of container: 14 age blocks, several chunks.
        let (path, plain) = write_sample(dir.path(), &identity.to_public(), 45);
        let whole = std::fs::read(&path).unwrap();
        let full = Recording::parse(&plain).unwrap();
        let start = payload_start(&whole).unwrap() + AGE_NONCE_BYTES;
        for cut in [
            whole.len() as u64 - 1,
            whole.len() as u64 - 20_000,
            start + 5 * AGE_SEALED_BLOCK_BYTES,
            start + 5 * AGE_SEALED_BLOCK_BYTES + 100,
            start + 9 * AGE_SEALED_BLOCK_BYTES - 1,
            start + 10,
        ] {
            let cut_path = dir.path().join(format!("cut-{cut}.rec"));
            std::fs::write(&cut_path, &whole[..cut as usize]).unwrap();
            let opened = open_recording(&cut_path, &identity).unwrap();
            let EncryptionStatus::CutOff {
                undecryptable_bytes,
            } = opened.status
            else {
                panic!("cut at {cut}: {:?}", opened.status);
            };
            assert!(
                undecryptable_bytes <= AGE_SEALED_BLOCK_BYTES,
                "cut at {cut}"
            );
            // Every byte of the complete blocks before the cut was decrypted.
            let blocks = (cut - start) / AGE_SEALED_BLOCK_BYTES;
            assert_eq!(
                opened.container.len() as u64,
                blocks * AGE_BLOCK_BYTES,
                "cut at {cut}"
            );
            assert_eq!(
                opened.container[..],
                plain[..opened.container.len()],
                "cut at {cut}"
            );
            // The container reads every chunk that ends before the decrypted end.
            let kept = full
                .chunks()
                .iter()
                .filter(|c| c.range().end <= opened.container.len() as u64)
                .count();
            match Recording::parse(&opened.container) {
                Ok(recording) => {
                    let report = recording.verify();
                    assert_eq!(report.chunks_ok, kept, "cut at {cut}: {report}");
                    assert!(report.corrupt.is_empty(), "cut at {cut}: {report}");
                }
                Err(e) => assert_eq!(kept, 0, "cut at {cut}: {e}"),
            }
        }
    }

    #[test]
    fn a_damaged_block_in_the_middle_is_reported_as_damage() {
        let dir = tempfile::tempdir().unwrap();
        let identity = x25519::Identity::generate();
        let (path, plain) = write_sample(dir.path(), &identity.to_public(), 45);
        let mut bytes = std::fs::read(&path).unwrap();
        let start = payload_start(&bytes).unwrap() + AGE_NONCE_BYTES;
        let at = (start + 3 * AGE_SEALED_BLOCK_BYTES + 500) as usize;
        bytes[at] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let opened = open_recording(&path, &identity).unwrap();
        assert_eq!(
            opened.status,
            EncryptionStatus::Damaged {
                block: 3,
                undecryptable_bytes: bytes.len() as u64 - (start + 3 * AGE_SEALED_BLOCK_BYTES)
            }
        );
        assert_eq!(opened.container[..], plain[..3 * AGE_BLOCK_BYTES as usize]);
    }

    #[test]
    fn another_identity_and_other_files_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let identity = x25519::Identity::generate();
        let (path, _) = write_sample(dir.path(), &identity.to_public(), 3);

        let other = x25519::Identity::generate();
        let err = open_recording(&path, &other).unwrap_err();
        assert!(matches!(err, RecordingFileError::NotForThisIdentity(_)));
        assert!(
            err.to_string()
                .contains("this recording is not for this identity"),
            "{err}"
        );

        let plain = dir.path().join("plain.rec");
        std::fs::write(&plain, b"\x89RLYREC\n not encrypted").unwrap();
        let err = open_recording(&plain, &identity).unwrap_err();
        assert!(matches!(err, RecordingFileError::NotEncrypted(_)), "{err}");
        assert!(err.to_string().contains("is not a recording"), "{err}");

        let key = crate::record::keys::new_review_key(
            "support",
            age::secrecy::SecretString::from("a long enough passphrase".to_owned()),
            Some(4),
        )
        .unwrap();
        let id_file = dir.path().join("review.age");
        // The armored identity file is not binary age: dearmor it the way a user might
        // have stored it, as a binary passphrase file.
        let mut binary = Vec::new();
        age::armor::ArmoredReader::new(&key.identity_file[..])
            .read_to_end(&mut binary)
            .unwrap();
        std::fs::write(&id_file, &binary).unwrap();
        let err = open_recording(&id_file, &identity).unwrap_err();
        assert!(
            matches!(err, RecordingFileError::PassphraseEncrypted(_)),
            "{err}"
        );

        let err = open_recording(&dir.path().join("missing.rec"), &identity).unwrap_err();
        assert!(matches!(err, RecordingFileError::Io { .. }), "{err}");
    }

    #[test]
    fn a_wrong_passphrase_is_refused_with_a_clear_message() {
        let key = crate::record::keys::new_review_key(
            "support",
            age::secrecy::SecretString::from("a long enough passphrase".to_owned()),
            Some(4),
        )
        .unwrap();
        let Err(err) = crate::record::keys::open_identity(
            &key.identity_file,
            age::secrecy::SecretString::from("not the passphrase".to_owned()),
        ) else {
            panic!("opened with a wrong passphrase");
        };
        assert_eq!(err.to_string(), "wrong passphrase for this identity file");
    }
}
