//! File transfer: the binary messages on the WebRTC data channel labelled `files`
//! (reliable, ordered), in both directions between a participant and the relay.
//!
//! One message per data-channel message, little-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 0 | format version, [`VERSION`] (1) |
//! | 1 | kind tag (see [`FileMsg`]) |
//! | 2..6 | transfer id, `u32` ([`TransferId`]) |
//! | 6.. | the kind's fields |
//!
//! The kinds and their fields (tag in brackets):
//!
//! | kind | fields after the id |
//! |---|---|
//! | \[1\] `Offer` | `size: u64`, `name_len: u8`, `name` (1..=255 bytes UTF-8), `mime_len: u8`, `mime` (0..=255 bytes UTF-8; 0 = none) |
//! | \[2\] `Accept` | — |
//! | \[3\] `Decline` | — |
//! | \[4\] `Chunk` | `offset: u64`, then the data to the end of the message (1..=[`MAX_CHUNK_BYTES`]) |
//! | \[5\] `Credit` | `consumed: u64` |
//! | \[6\] `Complete` | `sha256: [u8; 32]` |
//! | \[7\] `Cancel` | `reason: u8` ([`CancelReason`]) |
//!
//! The encoding is canonical: [`decode`] accepts exactly what [`encode`] produces, so a
//! message that decodes re-encodes to the same bytes.
//!
//! **Ids.** The side that sends a file chooses its transfer id; the relay gives every
//! receiver an id of its own ([`TransferId::RELAY_BIT`] set), so ids say nothing about
//! who sent a file or how many others received it. Clients choose ids with that bit
//! clear. So `Cancel` is never ambiguous: with the bit clear it is about a transfer the
//! client sends, with the bit set about one it receives.
//!
//! **No sender identity.** No message names a participant; an `Offer` says what the
//! file is, never who offers it.
//!
//! The parsing takes the message as one [`Bytes`]; a `Chunk`'s data is a slice of it,
//! not a copy, so the relay can hand the same bytes to every receiver.

use bytes::{BufMut, Bytes, BytesMut};

/// The format version this module writes and the only one it reads.
pub const VERSION: u8 = 1;
/// Largest data in one `Chunk` (16 KiB: every WebRTC stack delivers that in one message).
pub const MAX_CHUNK_BYTES: usize = 16 * 1024;
/// Largest file name and MIME type, in UTF-8 bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Bytes before the kind's fields: version, kind tag, transfer id.
pub const HEADER_BYTES: usize = 6;
/// Largest valid message: a `Chunk` with [`MAX_CHUNK_BYTES`] of data.
pub const MAX_MESSAGE_BYTES: usize = HEADER_BYTES + 8 + MAX_CHUNK_BYTES;

const TAG_OFFER: u8 = 1;
const TAG_ACCEPT: u8 = 2;
const TAG_DECLINE: u8 = 3;
const TAG_CHUNK: u8 = 4;
const TAG_CREDIT: u8 = 5;
const TAG_COMPLETE: u8 = 6;
const TAG_CANCEL: u8 = 7;

/// Which transfer a message is about, as numbered on this channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransferId(pub u32);

impl TransferId {
    /// Set in ids the relay chooses (transfers the client receives); clear in ids a
    /// client chooses (transfers it sends).
    pub const RELAY_BIT: u32 = 0x8000_0000;

    /// Whether the relay chose this id, i.e. the transfer is one the client receives.
    pub fn is_relay_chosen(self) -> bool {
        self.0 & Self::RELAY_BIT != 0
    }
}

impl std::fmt::Display for TransferId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#010x}", self.0)
    }
}

/// Why a transfer (or one receiver's part of it) was cancelled. The wire byte of each
/// reason is given in brackets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CancelReason {
    /// \[1\] A person cancelled: the sender, or a receiver for its own part.
    Cancelled,
    /// \[2\] The sender may not send files to that side (a view-only agent, a
    /// supervisor), or lost the right during the transfer.
    Forbidden,
    /// \[3\] The offered size is above the relay's `limits.max_file_bytes`.
    TooLarge,
    /// \[4\] A chunk went beyond the window the receivers' credit allows.
    WindowExceeded,
    /// \[5\] A chunk did not start at the next byte.
    OutOfOrder,
    /// \[6\] A chunk went past the offered size.
    PastSize,
    /// \[7\] No open transfer has this id.
    UnknownTransfer,
    /// \[8\] `Complete` came before every offered byte.
    Incomplete,
    /// \[9\] The sender left or closed its `files` channel.
    SenderLeft,
    /// \[10\] The last receiver left or closed its `files` channel.
    ReceiverLeft,
    /// \[11\] Nobody could receive the offer (no open `files` channel on the other side).
    NoReceivers,
    /// \[12\] A receiver did not answer the offer in time.
    Timeout,
    /// \[13\] A message that breaks the protocol otherwise (a chunk before the offer was
    /// accepted, an id in the wrong range, an id already in use, too many transfers).
    ProtocolError,
    /// \[14\] The sender offered files faster than the relay's budget allows
    /// (`rate_limits.file_offer`); offer again later.
    RateLimited,
    /// \[14\] The offered file name could spoof or hide text: control, bidi-control,
    /// tag or other invisible format characters, or nothing visible.
    BadName,
    /// A reason this version does not define (kept, so that newer peers can add some).
    Other(u8),
}

impl CancelReason {
    /// Every defined reason, in wire order (from 1).
    pub const DEFINED: [CancelReason; 15] = [
        CancelReason::Cancelled,
        CancelReason::Forbidden,
        CancelReason::TooLarge,
        CancelReason::WindowExceeded,
        CancelReason::OutOfOrder,
        CancelReason::PastSize,
        CancelReason::UnknownTransfer,
        CancelReason::Incomplete,
        CancelReason::SenderLeft,
        CancelReason::ReceiverLeft,
        CancelReason::NoReceivers,
        CancelReason::Timeout,
        CancelReason::ProtocolError,
        CancelReason::RateLimited,
        CancelReason::BadName,
    ];

    /// The reason with this wire byte (undefined bytes become [`CancelReason::Other`]).
    pub fn from_u8(byte: u8) -> Self {
        match usize::from(byte).checked_sub(1) {
            Some(i) if i < Self::DEFINED.len() => Self::DEFINED[i],
            _ => CancelReason::Other(byte),
        }
    }

    /// The wire byte.
    pub fn to_u8(self) -> u8 {
        match self {
            CancelReason::Other(byte) => byte,
            defined => Self::DEFINED
                .iter()
                .position(|r| *r == defined)
                .map_or(0, |i| i as u8 + 1),
        }
    }

    /// A stable name (logs, documentation).
    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::Cancelled => "cancelled",
            CancelReason::Forbidden => "forbidden",
            CancelReason::TooLarge => "too_large",
            CancelReason::WindowExceeded => "window_exceeded",
            CancelReason::OutOfOrder => "out_of_order",
            CancelReason::PastSize => "past_size",
            CancelReason::UnknownTransfer => "unknown_transfer",
            CancelReason::Incomplete => "incomplete",
            CancelReason::SenderLeft => "sender_left",
            CancelReason::ReceiverLeft => "receiver_left",
            CancelReason::NoReceivers => "no_receivers",
            CancelReason::Timeout => "timeout",
            CancelReason::ProtocolError => "protocol_error",
            CancelReason::RateLimited => "rate_limited",
            CancelReason::BadName => "bad_name",
            CancelReason::Other(_) => "other",
        }
    }
}

/// One message of the `files` channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileMsg {
    /// \[1\] Sender → relay → receivers: a file is offered.
    Offer {
        /// The transfer.
        id: TransferId,
        /// Its exact size in bytes.
        size: u64,
        /// Its name, 1..=[`MAX_NAME_BYTES`] bytes of UTF-8 (receivers must not trust it
        /// as a path).
        name: String,
        /// Its MIME type, if the sender knows it (1..=[`MAX_NAME_BYTES`] bytes).
        mime: Option<String>,
    },
    /// \[2\] Receiver → relay: it wants the file. Relay → sender: the transfer starts.
    Accept {
        /// The transfer.
        id: TransferId,
    },
    /// \[3\] Receiver → relay: it does not want the file. Relay → sender: nobody does.
    Decline {
        /// The transfer.
        id: TransferId,
    },
    /// \[4\] Sender → relay → receivers: the bytes `offset..offset + data.len()`.
    Chunk {
        /// The transfer.
        id: TransferId,
        /// Where the data starts in the file.
        offset: u64,
        /// 1..=[`MAX_CHUNK_BYTES`] bytes.
        data: Bytes,
    },
    /// \[5\] Receiver → relay: it has consumed (written away) the file up to `consumed`.
    /// Relay → sender: every receiver has, so the window moves on.
    Credit {
        /// The transfer.
        id: TransferId,
        /// Bytes consumed from the start of the file.
        consumed: u64,
    },
    /// \[6\] Sender → relay → receivers: every byte was sent; the file's SHA-256.
    Complete {
        /// The transfer.
        id: TransferId,
        /// SHA-256 of the whole file, for the receivers to check.
        sha256: [u8; 32],
    },
    /// \[7\] Either way: the transfer (or this receiver's part of it) is over.
    Cancel {
        /// The transfer.
        id: TransferId,
        /// Why.
        reason: CancelReason,
    },
}

impl FileMsg {
    /// The transfer the message is about.
    pub fn id(&self) -> TransferId {
        match self {
            FileMsg::Offer { id, .. }
            | FileMsg::Accept { id }
            | FileMsg::Decline { id }
            | FileMsg::Chunk { id, .. }
            | FileMsg::Credit { id, .. }
            | FileMsg::Complete { id, .. }
            | FileMsg::Cancel { id, .. } => *id,
        }
    }

    /// The kind's name (logs).
    pub fn kind(&self) -> &'static str {
        match self {
            FileMsg::Offer { .. } => "offer",
            FileMsg::Accept { .. } => "accept",
            FileMsg::Decline { .. } => "decline",
            FileMsg::Chunk { .. } => "chunk",
            FileMsg::Credit { .. } => "credit",
            FileMsg::Complete { .. } => "complete",
            FileMsg::Cancel { .. } => "cancel",
        }
    }

    /// How many bytes [`encode`] writes for this message.
    pub fn encoded_len(&self) -> usize {
        HEADER_BYTES
            + match self {
                FileMsg::Offer { name, mime, .. } => {
                    8 + 1 + name.len() + 1 + mime.as_ref().map_or(0, String::len)
                }
                FileMsg::Accept { .. } | FileMsg::Decline { .. } => 0,
                FileMsg::Chunk { data, .. } => 8 + data.len(),
                FileMsg::Credit { .. } => 8,
                FileMsg::Complete { .. } => 32,
                FileMsg::Cancel { .. } => 1,
            }
    }
}

/// Why bytes are not a valid `files` message, or a message cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    /// The message ends before its fields do.
    #[error("truncated file message: {len} bytes, at least {needed} needed")]
    Truncated {
        /// Bytes received.
        len: usize,
        /// Bytes the header and fields read so far require.
        needed: usize,
    },
    /// A format version this build does not read.
    #[error("unknown file message version {0}")]
    UnknownVersion(u8),
    /// A kind tag this version does not define.
    #[error("unknown file message kind {0}")]
    UnknownKind(u8),
    /// Bytes after the last field.
    #[error("{0} trailing bytes after the file message")]
    TrailingBytes(usize),
    /// A name or MIME type that is not UTF-8.
    #[error("file name or MIME type is not valid UTF-8")]
    InvalidUtf8,
    /// An empty file name, or one over [`MAX_NAME_BYTES`].
    #[error("file name must be 1 to {MAX_NAME_BYTES} bytes (got {0})")]
    BadName(usize),
    /// A MIME type of `Some("")` or over [`MAX_NAME_BYTES`] (encoding only: on the wire,
    /// length 0 means none).
    #[error("MIME type must be 1 to {MAX_NAME_BYTES} bytes (got {0})")]
    BadMime(usize),
    /// A chunk with no data, or more than [`MAX_CHUNK_BYTES`].
    #[error("chunk data must be 1 to {MAX_CHUNK_BYTES} bytes (got {0})")]
    BadChunk(usize),
}

/// Appends the encoding of `msg` to `out`.
///
/// Fails for names, MIME types and chunks out of their ranges; `out` is then unchanged.
pub fn encode(msg: &FileMsg, out: &mut BytesMut) -> Result<(), FileError> {
    match msg {
        FileMsg::Offer { name, mime, .. } => {
            if name.is_empty() || name.len() > MAX_NAME_BYTES {
                return Err(FileError::BadName(name.len()));
            }
            if let Some(mime) = mime {
                if mime.is_empty() || mime.len() > MAX_NAME_BYTES {
                    return Err(FileError::BadMime(mime.len()));
                }
            }
        }
        FileMsg::Chunk { data, .. } if data.is_empty() || data.len() > MAX_CHUNK_BYTES => {
            return Err(FileError::BadChunk(data.len()));
        }
        _ => {}
    }
    let tag = match msg {
        FileMsg::Offer { .. } => TAG_OFFER,
        FileMsg::Accept { .. } => TAG_ACCEPT,
        FileMsg::Decline { .. } => TAG_DECLINE,
        FileMsg::Chunk { .. } => TAG_CHUNK,
        FileMsg::Credit { .. } => TAG_CREDIT,
        FileMsg::Complete { .. } => TAG_COMPLETE,
        FileMsg::Cancel { .. } => TAG_CANCEL,
    };
    out.reserve(msg.encoded_len());
    out.put_u8(VERSION);
    out.put_u8(tag);
    out.put_u32_le(msg.id().0);
    match msg {
        FileMsg::Offer {
            size, name, mime, ..
        } => {
            out.put_u64_le(*size);
            // Lengths checked above: both fit in a byte.
            out.put_u8(name.len() as u8);
            out.put_slice(name.as_bytes());
            let mime = mime.as_deref().unwrap_or("");
            out.put_u8(mime.len() as u8);
            out.put_slice(mime.as_bytes());
        }
        FileMsg::Accept { .. } | FileMsg::Decline { .. } => {}
        FileMsg::Chunk { offset, data, .. } => {
            out.put_u64_le(*offset);
            out.put_slice(data);
        }
        FileMsg::Credit { consumed, .. } => out.put_u64_le(*consumed),
        FileMsg::Complete { sha256, .. } => out.put_slice(sha256),
        FileMsg::Cancel { reason, .. } => out.put_u8(reason.to_u8()),
    }
    Ok(())
}

/// The encoding of `msg` in a new buffer; see [`encode`].
pub fn encode_to_bytes(msg: &FileMsg) -> Result<BytesMut, FileError> {
    let mut out = BytesMut::new();
    encode(msg, &mut out)?;
    Ok(out)
}

/// Parses one data-channel message. A `Chunk`'s data shares `bytes`' buffer.
pub fn decode(bytes: &Bytes) -> Result<FileMsg, FileError> {
    let mut r = Reader { bytes, pos: 0 };
    let version = r.u8()?;
    if version != VERSION {
        return Err(FileError::UnknownVersion(version));
    }
    let tag = r.u8()?;
    if !(TAG_OFFER..=TAG_CANCEL).contains(&tag) {
        return Err(FileError::UnknownKind(tag));
    }
    let id = TransferId(u32::from_le_bytes(r.array()?));
    let msg = match tag {
        TAG_OFFER => {
            let size = u64::from_le_bytes(r.array()?);
            let name_len = usize::from(r.u8()?);
            let name = r.text(name_len)?;
            if name.is_empty() {
                return Err(FileError::BadName(0));
            }
            let mime_len = usize::from(r.u8()?);
            let mime = r.text(mime_len)?;
            FileMsg::Offer {
                id,
                size,
                name,
                mime: (!mime.is_empty()).then_some(mime),
            }
        }
        TAG_ACCEPT => FileMsg::Accept { id },
        TAG_DECLINE => FileMsg::Decline { id },
        TAG_CHUNK => {
            let offset = u64::from_le_bytes(r.array()?);
            let len = bytes.len() - r.pos;
            if len == 0 || len > MAX_CHUNK_BYTES {
                return Err(FileError::BadChunk(len));
            }
            let data = bytes.slice(r.pos..);
            r.pos = bytes.len();
            FileMsg::Chunk { id, offset, data }
        }
        TAG_CREDIT => FileMsg::Credit {
            id,
            consumed: u64::from_le_bytes(r.array()?),
        },
        TAG_COMPLETE => FileMsg::Complete {
            id,
            sha256: r.array()?,
        },
        _ => FileMsg::Cancel {
            id,
            reason: CancelReason::from_u8(r.u8()?),
        },
    };
    match bytes.len() - r.pos {
        0 => Ok(msg),
        extra => Err(FileError::TrailingBytes(extra)),
    }
}

/// A cursor over a message that reports how much was needed when it runs out.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FileError> {
        let needed = self.pos + n;
        let taken = self
            .bytes
            .get(self.pos..needed)
            .ok_or(FileError::Truncated {
                len: self.bytes.len(),
                needed,
            })?;
        self.pos = needed;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FileError> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    fn u8(&mut self) -> Result<u8, FileError> {
        let [byte] = self.array()?;
        Ok(byte)
    }

    fn text(&mut self, len: usize) -> Result<String, FileError> {
        let raw = self.take(len)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| FileError::InvalidUtf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes_of(msg: &FileMsg) -> Bytes {
        encode_to_bytes(msg).unwrap().freeze()
    }

    fn dec(bytes: &[u8]) -> Result<FileMsg, FileError> {
        decode(&Bytes::copy_from_slice(bytes))
    }

    /// One example per kind with its exact encoding. If this fails, the wire format
    /// changed: bump [`VERSION`] instead of editing the expected bytes.
    #[test]
    fn golden_layout() {
        let id = TransferId(0x8403_0201);
        let cases: [(FileMsg, &[u8]); 8] = [
            (
                FileMsg::Offer {
                    id,
                    size: 0x0102,
                    name: "a.txt".into(),
                    mime: Some("text/plain".into()),
                },
                &[
                    1, 1, 1, 2, 3, 0x84, 2, 1, 0, 0, 0, 0, 0, 0, 5, b'a', b'.', b't', b'x', b't',
                    10, b't', b'e', b'x', b't', b'/', b'p', b'l', b'a', b'i', b'n',
                ],
            ),
            (
                FileMsg::Offer {
                    id,
                    size: 0,
                    name: "é".into(),
                    mime: None,
                },
                &[
                    1, 1, 1, 2, 3, 0x84, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0xc3, 0xa9, 0,
                ],
            ),
            (FileMsg::Accept { id }, &[1, 2, 1, 2, 3, 0x84]),
            (FileMsg::Decline { id }, &[1, 3, 1, 2, 3, 0x84]),
            (
                FileMsg::Chunk {
                    id,
                    offset: 0x0100_0000_0000_0001,
                    data: Bytes::from_static(b"xyz"),
                },
                &[
                    1, 4, 1, 2, 3, 0x84, 1, 0, 0, 0, 0, 0, 0, 1, b'x', b'y', b'z',
                ],
            ),
            (
                FileMsg::Credit {
                    id,
                    consumed: 65536,
                },
                &[1, 5, 1, 2, 3, 0x84, 0, 0, 1, 0, 0, 0, 0, 0],
            ),
            (
                FileMsg::Complete {
                    id,
                    sha256: [0xab; 32],
                },
                &[
                    1, 6, 1, 2, 3, 0x84, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab,
                    0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab,
                    0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab,
                ],
            ),
            (
                FileMsg::Cancel {
                    id,
                    reason: CancelReason::TooLarge,
                },
                &[1, 7, 1, 2, 3, 0x84, 3],
            ),
        ];
        for (msg, expected) in cases {
            assert_eq!(&bytes_of(&msg)[..], expected, "{msg:?}");
            assert_eq!(msg.encoded_len(), expected.len());
            assert_eq!(dec(expected).unwrap(), msg);
        }
        assert!(id.is_relay_chosen());
        assert!(!TransferId(7).is_relay_chosen());
    }

    #[test]
    fn cancel_reasons_have_stable_bytes() {
        let bytes: Vec<u8> = CancelReason::DEFINED.iter().map(|r| r.to_u8()).collect();
        assert_eq!(bytes, (1..=15).collect::<Vec<u8>>());
        assert_eq!(CancelReason::Forbidden.as_str(), "forbidden");
        assert_eq!(CancelReason::from_u8(14), CancelReason::RateLimited);
        assert_eq!(CancelReason::from_u8(15), CancelReason::BadName);
        assert_eq!(CancelReason::TooLarge.as_str(), "too_large");
        for byte in 0..=255u8 {
            assert_eq!(CancelReason::from_u8(byte).to_u8(), byte);
        }
        assert_eq!(CancelReason::from_u8(0), CancelReason::Other(0));
        assert_eq!(CancelReason::from_u8(200), CancelReason::Other(200));
    }

    #[test]
    fn chunk_data_shares_the_message_buffer() {
        let frame = bytes_of(&FileMsg::Chunk {
            id: TransferId(1),
            offset: 0,
            data: Bytes::from(vec![7u8; 100]),
        });
        let FileMsg::Chunk { data, .. } = decode(&frame).unwrap() else {
            panic!("not a chunk");
        };
        assert_eq!(data.as_ptr(), frame[HEADER_BYTES + 8..].as_ptr());
    }

    #[test]
    fn tells_errors_apart() {
        let credit = [1, 5, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        assert!(dec(&credit).is_ok());
        let with = |i: usize, v: u8| {
            let mut b = credit.to_vec();
            b[i] = v;
            dec(&b).unwrap_err()
        };
        assert_eq!(with(0, 2), FileError::UnknownVersion(2));
        assert_eq!(with(1, 0), FileError::UnknownKind(0));
        assert_eq!(with(1, 8), FileError::UnknownKind(8));
        assert_eq!(
            dec(&[1, 2, 0, 0, 0, 0, 9]).unwrap_err(),
            FileError::TrailingBytes(1)
        );
        assert_eq!(
            dec(&credit[..9]).unwrap_err(),
            FileError::Truncated { len: 9, needed: 14 }
        );
        assert_eq!(
            dec(&[]).unwrap_err(),
            FileError::Truncated { len: 0, needed: 1 }
        );
        assert_eq!(
            dec(&[1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap_err(),
            FileError::BadChunk(0)
        );
        assert_eq!(
            dec(&[1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap_err(),
            FileError::BadName(0)
        );
        assert_eq!(
            dec(&[1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0xc3, 0x28, 0]).unwrap_err(),
            FileError::InvalidUtf8
        );
    }

    #[test]
    fn limits() {
        let chunk = |n: usize| FileMsg::Chunk {
            id: TransferId(1),
            offset: 0,
            data: Bytes::from(vec![0u8; n]),
        };
        let at_limit = bytes_of(&chunk(MAX_CHUNK_BYTES));
        assert_eq!(at_limit.len(), MAX_MESSAGE_BYTES);
        assert_eq!(decode(&at_limit).unwrap(), chunk(MAX_CHUNK_BYTES));
        let mut over = BytesMut::from(&at_limit[..]);
        over.put_u8(0);
        assert_eq!(
            decode(&over.freeze()).unwrap_err(),
            FileError::BadChunk(MAX_CHUNK_BYTES + 1)
        );

        let mut out = BytesMut::from(&b"keep"[..]);
        assert_eq!(
            encode(&chunk(MAX_CHUNK_BYTES + 1), &mut out).unwrap_err(),
            FileError::BadChunk(MAX_CHUNK_BYTES + 1)
        );
        assert_eq!(encode(&chunk(0), &mut out), Err(FileError::BadChunk(0)));
        let offer = |name: String, mime: Option<String>| FileMsg::Offer {
            id: TransferId(1),
            size: 1,
            name,
            mime,
        };
        assert_eq!(
            encode(&offer("x".repeat(256), None), &mut out),
            Err(FileError::BadName(256))
        );
        assert_eq!(
            encode(&offer(String::new(), None), &mut out),
            Err(FileError::BadName(0))
        );
        assert_eq!(
            encode(&offer("x".into(), Some(String::new())), &mut out),
            Err(FileError::BadMime(0))
        );
        assert_eq!(&out[..], b"keep", "a failed encode leaves the buffer alone");
        let longest = offer("n".repeat(255), Some("m".repeat(255)));
        assert_eq!(decode(&bytes_of(&longest)).unwrap(), longest);
    }

    fn any_reason() -> impl Strategy<Value = CancelReason> {
        any::<u8>().prop_map(CancelReason::from_u8)
    }

    fn any_msg() -> impl Strategy<Value = FileMsg> {
        let id = any::<u32>().prop_map(TransferId);
        (
            id,
            prop_oneof![
                (
                    any::<u64>(),
                    "[^\u{0}]{1,60}",
                    proptest::option::of("[a-z]{1,10}/[a-z0-9.+-]{1,20}")
                )
                    .prop_map(|(size, name, mime)| (1u8, size, name, mime, vec![])),
                Just((2u8, 0, String::new(), None, vec![])),
                Just((3u8, 0, String::new(), None, vec![])),
                (any::<u64>(), proptest::collection::vec(any::<u8>(), 1..300))
                    .prop_map(|(offset, data)| (4u8, offset, String::new(), None, data)),
                any::<u64>().prop_map(|c| (5u8, c, String::new(), None, vec![])),
                proptest::collection::vec(any::<u8>(), 32).prop_map(|h| (
                    6u8,
                    0,
                    String::new(),
                    None,
                    h
                )),
                any_reason().prop_map(|r| (7u8, u64::from(r.to_u8()), String::new(), None, vec![])),
            ],
        )
            .prop_map(|(id, (kind, n, name, mime, data))| match kind {
                1 => FileMsg::Offer {
                    id,
                    size: n,
                    // Names are at most 255 bytes: 60 chars of up to 4 bytes fit.
                    name,
                    mime,
                },
                2 => FileMsg::Accept { id },
                3 => FileMsg::Decline { id },
                4 => FileMsg::Chunk {
                    id,
                    offset: n,
                    data: Bytes::from(data),
                },
                5 => FileMsg::Credit { id, consumed: n },
                6 => FileMsg::Complete {
                    id,
                    sha256: data.try_into().unwrap_or([0; 32]),
                },
                _ => FileMsg::Cancel {
                    id,
                    reason: CancelReason::from_u8(n as u8),
                },
            })
    }

    proptest! {
        #[test]
        fn round_trips(msg in any_msg()) {
            let bytes = bytes_of(&msg);
            prop_assert!(bytes.len() <= MAX_MESSAGE_BYTES);
            prop_assert_eq!(bytes.len(), msg.encoded_len());
            prop_assert_eq!(decode(&bytes), Ok(msg));
        }

        #[test]
        fn every_truncation_is_refused(msg in any_msg()) {
            let bytes = bytes_of(&msg);
            for len in 0..bytes.len() {
                let cut = bytes.slice(..len);
                match decode(&cut) {
                    // A chunk cut inside its data is still a (shorter) valid chunk; the
                    // data-channel message boundary is what delimits it.
                    Ok(FileMsg::Chunk { data, .. }) => {
                        let was_chunk = matches!(msg, FileMsg::Chunk { .. });
                        prop_assert!(was_chunk);
                        prop_assert_eq!(data.len(), len - HEADER_BYTES - 8);
                    }
                    Ok(other) => prop_assert!(false, "{len}: decoded {other:?}"),
                    Err(FileError::Truncated { .. } | FileError::BadChunk(0)) => {}
                    Err(e) => prop_assert!(false, "{len}: {e:?}"),
                }
            }
        }

        #[test]
        fn extra_bytes_are_refused(msg in any_msg(), extra in proptest::collection::vec(any::<u8>(), 1..8)) {
            prop_assume!(!matches!(msg, FileMsg::Chunk { .. }));
            let mut bytes = BytesMut::from(&bytes_of(&msg)[..]);
            bytes.put_slice(&extra);
            prop_assert_eq!(decode(&bytes.freeze()), Err(FileError::TrailingBytes(extra.len())));
        }

        /// Whatever decodes is canonical: it re-encodes to exactly the same bytes.
        #[test]
        fn random_bytes_never_panic(
            head in prop_oneof![Just(vec![]), (0..9u8).prop_map(|kind| vec![VERSION, kind])],
            tail in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let bytes = Bytes::from([head, tail].concat());
            if let Ok(msg) = decode(&bytes) {
                prop_assert_eq!(bytes_of(&msg), bytes);
            }
        }

        #[test]
        fn bit_flips_never_panic(msg in any_msg(), bit in any::<prop::sample::Index>()) {
            let mut bytes = BytesMut::from(&bytes_of(&msg)[..]);
            let bit = bit.index(bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            let bytes = bytes.freeze();
            if let Ok(msg) = decode(&bytes) {
                prop_assert_eq!(bytes_of(&msg), bytes);
            }
        }
    }
}
