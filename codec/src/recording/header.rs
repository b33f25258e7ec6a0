//! The file header: magic, format version, and what the session was.

use super::cursor::{Cursor, checksum_ok, crc32, put_str16};
use super::{FieldError, MAGIC, MAX_CODECS, RecordingError, VERSION_MAJOR, VERSION_MINOR};

/// Bytes before the header's body: magic, major and minor version, body length.
pub const HEADER_PREFIX_BYTES: usize = 12;

/// What a recording is of, written once at the start of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordingHeader {
    /// The relay's session id.
    pub session_id: String,
    /// The portal the session belonged to (and whose review key the file is for).
    pub portal: String,
    /// When the recording started, in Unix milliseconds. Record times count from here.
    pub start_unix_ms: u64,
    /// Video codecs by MIME name (`video/VP8`, `video/H264`, ...); a video frame names
    /// its codec by position in this list.
    pub video_codecs: Vec<String>,
    /// Audio codecs by MIME name (`audio/opus`); empty when there is no audio.
    pub audio_codecs: Vec<String>,
}

impl RecordingHeader {
    /// The header's bytes, as the file starts.
    pub fn encode(&self) -> Result<Vec<u8>, FieldError> {
        let mut body = Vec::new();
        put_str16(&mut body, "session_id", &self.session_id)?;
        put_str16(&mut body, "portal", &self.portal)?;
        body.extend_from_slice(&self.start_unix_ms.to_le_bytes());
        for (field, codecs) in [
            ("video_codecs", &self.video_codecs),
            ("audio_codecs", &self.audio_codecs),
        ] {
            if codecs.len() > MAX_CODECS {
                return Err(FieldError::TooLong {
                    field,
                    len: codecs.len(),
                    max: MAX_CODECS,
                });
            }
            // At most MAX_CODECS (16).
            body.push(codecs.len() as u8);
            for codec in codecs {
                put_str16(&mut body, field, codec)?;
            }
        }
        let body_len = u16::try_from(body.len()).map_err(|_| FieldError::TooLong {
            field: "header",
            len: body.len(),
            max: usize::from(u16::MAX),
        })?;
        let mut out = Vec::with_capacity(HEADER_PREFIX_BYTES + body.len() + 4);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION_MAJOR);
        out.push(VERSION_MINOR);
        out.extend_from_slice(&body_len.to_le_bytes());
        out.extend_from_slice(&body);
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Parses the header at the start of `bytes`; returns it with its length in bytes.
    pub fn decode(bytes: &[u8]) -> Result<(Self, usize), RecordingError> {
        let truncated = |needed: usize| RecordingError::Truncated {
            len: bytes.len(),
            needed,
        };
        let magic = bytes.get(..MAGIC.len()).ok_or(truncated(MAGIC.len()))?;
        if magic != MAGIC {
            return Err(RecordingError::NotARecording);
        }
        let prefix = bytes
            .get(..HEADER_PREFIX_BYTES)
            .ok_or(truncated(HEADER_PREFIX_BYTES))?;
        let (major, minor) = (prefix[8], prefix[9]);
        if major != VERSION_MAJOR {
            return Err(RecordingError::UnsupportedVersion { major, minor });
        }
        let body_len = usize::from(u16::from_le_bytes([prefix[10], prefix[11]]));
        let len = HEADER_PREFIX_BYTES + body_len + 4;
        let all = bytes.get(..len).ok_or(truncated(len))?;
        let (covered, stored) = all.split_at(len - 4);
        let stored = u32::from_le_bytes([stored[0], stored[1], stored[2], stored[3]]);
        if !checksum_ok(stored, crc32(covered)) {
            return Err(RecordingError::HeaderChecksum);
        }
        let header =
            decode_body(&covered[HEADER_PREFIX_BYTES..]).map_err(RecordingError::InvalidHeader)?;
        Ok((header, len))
    }
}

/// The body's fields; bytes after them belong to newer minor versions and are skipped.
fn decode_body(body: &[u8]) -> Result<RecordingHeader, FieldError> {
    let mut r = Cursor::new(body);
    let session_id = r.str16("session_id")?.to_owned();
    let portal = r.str16("portal")?.to_owned();
    let start_unix_ms = r.u64("start_unix_ms")?;
    let video_codecs = codecs(&mut r, "video_codecs")?;
    let audio_codecs = codecs(&mut r, "audio_codecs")?;
    Ok(RecordingHeader {
        session_id,
        portal,
        start_unix_ms,
        video_codecs,
        audio_codecs,
    })
}

fn codecs(r: &mut Cursor<'_>, field: &'static str) -> Result<Vec<String>, FieldError> {
    let count = usize::from(r.u8(field)?);
    if count > MAX_CODECS {
        return Err(FieldError::TooLong {
            field,
            len: count,
            max: MAX_CODECS,
        });
    }
    (0..count)
        .map(|_| r.str16(field).map(str::to_owned))
        .collect()
}
