//! The records a chunk holds, and how each is encoded inside a chunk's raw payload.
//!
//! Every record is framed as `tag: u8`, `at_ms: u64`, `body_len: u32`, then the body.
//! The framing is the same for every type, so a reader skips a record type it does not
//! know by its length, and ignores body bytes after the fields it knows (a newer minor
//! version may append fields).

use bytes::Bytes;

use super::cursor::{Cursor, put_bytes32, put_str16};
use super::{FieldError, MAX_RECORD_BYTES, RecordError};
use crate::wire::{Audience, Permission, Role, Visibility};

/// Bytes of framing before each record's body: tag, time, body length.
pub const RECORD_HEADER_BYTES: usize = 13;

const TAG_VIDEO: u8 = 1;
const TAG_AUDIO: u8 = 2;
const TAG_INPUT: u8 = 3;
const TAG_CHAT: u8 = 4;
const TAG_ROSTER: u8 = 5;
const TAG_FILE_TRANSFER: u8 = 6;
const TAG_GAP: u8 = 7;

/// A record and when it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedRecord {
    /// Milliseconds since the recording started ([`super::RecordingHeader::start_unix_ms`]).
    pub at_ms: u64,
    /// What happened.
    pub record: Record,
}

/// One thing that happened in a session. New types may be added in a minor version;
/// readers skip the ones they do not know.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Record {
    /// \[1\] An encoded video frame of the customer's screen.
    Video(VideoFrame),
    /// \[2\] An encoded audio frame.
    Audio(AudioFrame),
    /// \[3\] An input event an agent sent, and what the relay did with it.
    Input(InputRecord),
    /// \[4\] A chat message or agent note.
    Chat(ChatRecord),
    /// \[5\] A change to the roster.
    Roster(RosterRecord),
    /// \[6\] What happened to a file transfer.
    FileTransfer(FileTransferRecord),
    /// \[7\] Something is missing or changed in what was recorded.
    Gap(GapRecord),
}

/// The streams of a recording: record times never go backwards within a stream, but
/// records of different streams may interleave slightly out of order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// [`Record::Video`].
    Video = 0,
    /// [`Record::Audio`].
    Audio = 1,
    /// [`Record::Input`].
    Input = 2,
    /// [`Record::Chat`].
    Chat = 3,
    /// [`Record::Roster`].
    Roster = 4,
    /// [`Record::FileTransfer`].
    FileTransfer = 5,
    /// [`Record::Gap`].
    Gap = 6,
}

impl Stream {
    /// How many streams there are.
    pub const COUNT: usize = 7;
}

/// A depacketized video frame: the bytes a decoder takes, not RTP packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VideoFrame {
    /// Whether the frame decodes on its own.
    pub keyframe: bool,
    /// Position of the frame's codec in [`super::RecordingHeader::video_codecs`].
    pub codec: u8,
    /// The RTP timestamp of the frame (90 kHz clock), for exact export timing.
    pub rtp_timestamp: u32,
    /// The encoded frame.
    pub data: Bytes,
}

/// A depacketized audio frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudioFrame {
    /// Position of the frame's codec in [`super::RecordingHeader::audio_codecs`].
    pub codec: u8,
    /// The RTP timestamp of the frame (the codec's clock).
    pub rtp_timestamp: u32,
    /// The encoded frame.
    pub data: Bytes,
}

/// An input event as an agent sent it, with who sent it and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRecord {
    /// The sending participant (agents stay named in recordings: they are for
    /// supervisors).
    pub participant_id: String,
    /// What the relay did with it.
    pub outcome: InputOutcome,
    /// The message as received: a [`crate::input`] encoding, or the malformed bytes.
    pub event: Bytes,
}

/// What the relay did with an input event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InputOutcome {
    /// 0: forwarded to the customer.
    Delivered = 0,
    /// 1: refused, the sender may only view.
    RefusedViewOnly = 1,
    /// 2: refused, not a valid input event.
    Malformed = 2,
}

/// A chat message or agent note, with its sender named whatever the audience saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatRecord {
    /// The sender.
    pub participant_id: String,
    /// The sender's display name.
    pub name: String,
    /// The sender's role.
    pub role: Role,
    /// Whether the sender was masked (hidden from the customer) when sending.
    pub masked: bool,
    /// Who it was for.
    pub audience: Audience,
    /// The text.
    pub text: String,
}

/// A roster change and the participant's state after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RosterRecord {
    /// What changed.
    pub change: RosterChange,
    /// Who.
    pub participant_id: String,
    /// Their role after the change.
    pub role: Role,
    /// Their display name.
    pub name: String,
    /// Their visibility after the change (customers are always visible).
    pub visibility: Visibility,
    /// Their permission after the change (customers: view).
    pub permission: Permission,
}

/// What changed in the roster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RosterChange {
    /// 0: joined the session.
    Joined = 0,
    /// 1: left the session (or timed out).
    Left = 1,
    /// 2: became masked.
    Masked = 2,
    /// 3: became visible.
    Unmasked = 3,
    /// 4: permission changed.
    PermissionChanged = 4,
    /// 5: role changed (e.g. became host).
    RoleChanged = 5,
}

/// What happened to a file transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileTransferRecord {
    /// The agent who sent or received the file.
    pub participant_id: String,
    /// Which way the file went.
    pub direction: FileDirection,
    /// What happened.
    pub outcome: FileOutcome,
    /// Size in bytes, as offered.
    pub size: u64,
    /// File name, as offered.
    pub name: String,
}

/// Which way a file went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileDirection {
    /// 0: from the customer to agents.
    FromCustomer = 0,
    /// 1: from an agent to the customer.
    ToCustomer = 1,
}

/// What happened to a file transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileOutcome {
    /// 0: offered.
    Offered = 0,
    /// 1: received in full.
    Completed = 1,
    /// 2: declined by the receiver.
    Declined = 2,
    /// 3: cancelled or failed before completion.
    Cancelled = 3,
}

/// A marker that something is missing from, or changed in, what follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GapRecord {
    /// What happened.
    pub kind: GapKind,
    /// Records the recorder dropped since the previous marker, when it knows (else 0).
    pub dropped: u32,
}

/// What a [`GapRecord`] marks. Open-ended: kinds from newer versions read as
/// [`GapKind::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GapKind {
    /// 0: the customer's connection dropped; no video until it returns.
    CustomerReconnecting,
    /// 1: the customer is back.
    CustomerReturned,
    /// 2: the recorder could not keep up and records keyframes only from here.
    KeyframesOnly,
    /// 3: the recorder records every frame again.
    FullRate,
    /// 4: the recorder dropped records (see [`GapRecord::dropped`]).
    RecordsDropped,
    /// A kind this version does not know.
    Other(u8),
}

impl GapKind {
    /// The wire byte.
    pub fn to_u8(self) -> u8 {
        match self {
            GapKind::CustomerReconnecting => 0,
            GapKind::CustomerReturned => 1,
            GapKind::KeyframesOnly => 2,
            GapKind::FullRate => 3,
            GapKind::RecordsDropped => 4,
            GapKind::Other(byte) => byte,
        }
    }

    /// The kind with this wire byte (never fails: unknown bytes are [`GapKind::Other`]).
    pub fn from_u8(byte: u8) -> Self {
        match byte {
            0 => GapKind::CustomerReconnecting,
            1 => GapKind::CustomerReturned,
            2 => GapKind::KeyframesOnly,
            3 => GapKind::FullRate,
            4 => GapKind::RecordsDropped,
            other => GapKind::Other(other),
        }
    }
}

impl Record {
    /// The stream the record belongs to.
    pub fn stream(&self) -> Stream {
        match self {
            Record::Video(_) => Stream::Video,
            Record::Audio(_) => Stream::Audio,
            Record::Input(_) => Stream::Input,
            Record::Chat(_) => Stream::Chat,
            Record::Roster(_) => Stream::Roster,
            Record::FileTransfer(_) => Stream::FileTransfer,
            Record::Gap(_) => Stream::Gap,
        }
    }

    /// Whether this is a video keyframe.
    pub fn is_keyframe(&self) -> bool {
        matches!(self, Record::Video(frame) if frame.keyframe)
    }

    fn tag(&self) -> u8 {
        match self {
            Record::Video(_) => TAG_VIDEO,
            Record::Audio(_) => TAG_AUDIO,
            Record::Input(_) => TAG_INPUT,
            Record::Chat(_) => TAG_CHAT,
            Record::Roster(_) => TAG_ROSTER,
            Record::FileTransfer(_) => TAG_FILE_TRANSFER,
            Record::Gap(_) => TAG_GAP,
        }
    }
}

/// Appends the framed encoding of a record to `out`, or leaves `out` as it was.
pub(super) fn encode(at_ms: u64, record: &Record, out: &mut Vec<u8>) -> Result<(), RecordError> {
    let start = out.len();
    let result = encode_framed(at_ms, record, out);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn encode_framed(at_ms: u64, record: &Record, out: &mut Vec<u8>) -> Result<(), RecordError> {
    let start = out.len();
    out.push(record.tag());
    out.extend_from_slice(&at_ms.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    let body_start = out.len();
    // Check the big fields before copying them.
    let data_len = match record {
        Record::Video(frame) => frame.data.len(),
        Record::Audio(frame) => frame.data.len(),
        Record::Input(input) => input.event.len(),
        _ => 0,
    };
    if data_len > MAX_RECORD_BYTES {
        return Err(RecordError::TooLarge {
            len: data_len,
            max: MAX_RECORD_BYTES,
        });
    }
    match record {
        Record::Video(frame) => {
            out.extend_from_slice(&[u8::from(frame.keyframe), frame.codec]);
            out.extend_from_slice(&frame.rtp_timestamp.to_le_bytes());
            put_bytes32(out, &frame.data);
        }
        Record::Audio(frame) => {
            out.push(frame.codec);
            out.extend_from_slice(&frame.rtp_timestamp.to_le_bytes());
            put_bytes32(out, &frame.data);
        }
        Record::Input(input) => {
            put_str16(out, "participant_id", &input.participant_id)?;
            out.push(input.outcome as u8);
            put_bytes32(out, &input.event);
        }
        Record::Chat(chat) => {
            put_str16(out, "participant_id", &chat.participant_id)?;
            put_str16(out, "name", &chat.name)?;
            out.extend_from_slice(&[
                role_to_u8(chat.role),
                u8::from(chat.masked),
                audience_to_u8(chat.audience),
            ]);
            put_str16(out, "text", &chat.text)?;
        }
        Record::Roster(roster) => {
            out.push(roster.change as u8);
            put_str16(out, "participant_id", &roster.participant_id)?;
            out.push(role_to_u8(roster.role));
            put_str16(out, "name", &roster.name)?;
            out.extend_from_slice(&[
                visibility_to_u8(roster.visibility),
                permission_to_u8(roster.permission),
            ]);
        }
        Record::FileTransfer(file) => {
            put_str16(out, "participant_id", &file.participant_id)?;
            out.extend_from_slice(&[file.direction as u8, file.outcome as u8]);
            out.extend_from_slice(&file.size.to_le_bytes());
            put_str16(out, "name", &file.name)?;
        }
        Record::Gap(gap) => {
            out.push(gap.kind.to_u8());
            out.extend_from_slice(&gap.dropped.to_le_bytes());
        }
    }
    let body_len = out.len() - body_start;
    if body_len > MAX_RECORD_BYTES {
        return Err(RecordError::TooLarge {
            len: body_len,
            max: MAX_RECORD_BYTES,
        });
    }
    // At most MAX_RECORD_BYTES, which fits in a u32.
    out[start + 9..body_start].copy_from_slice(&(body_len as u32).to_le_bytes());
    Ok(())
}

/// One framed record as read from a chunk.
pub(super) enum Decoded {
    /// A record of a type this version knows.
    Known(TimedRecord),
    /// A record of a newer type, skipped by its length.
    Unknown {
        /// When it happened.
        at_ms: u64,
    },
}

/// Why a chunk's raw payload does not hold valid records: the record's position in
/// the chunk and what was wrong with it.
pub(super) type DecodeFailure = (u32, FieldError);

/// Decodes every record of a chunk's raw payload. Frame data are slices of `raw`.
pub(super) fn decode_all(raw: &Bytes) -> Result<Vec<Decoded>, DecodeFailure> {
    let mut records = Vec::new();
    let mut r = Cursor::new(raw);
    let mut index = 0u32;
    while r.remaining() > 0 {
        let fail = |error| (index, error);
        let tag = r.u8("record tag").map_err(fail)?;
        let at_ms = r.u64("record time").map_err(fail)?;
        let body = r.bytes32("record body").map_err(fail)?;
        if body.len() > MAX_RECORD_BYTES {
            return Err(fail(FieldError::TooLong {
                field: "record body",
                len: body.len(),
                max: MAX_RECORD_BYTES,
            }));
        }
        let decoded = match decode_body(tag, raw.slice(body)).map_err(fail)? {
            Some(record) => Decoded::Known(TimedRecord { at_ms, record }),
            None => Decoded::Unknown { at_ms },
        };
        records.push(decoded);
        index = index.saturating_add(1);
    }
    Ok(records)
}

/// The record in `body`, or `None` for a tag this version does not know.
fn decode_body(tag: u8, body: Bytes) -> Result<Option<Record>, FieldError> {
    let mut r = Cursor::new(&body);
    let record = match tag {
        TAG_VIDEO => {
            let [flags, codec] = r.array("video flags")?;
            let rtp_timestamp = r.u32("rtp_timestamp")?;
            let data = body.slice(r.bytes32("video data")?);
            Record::Video(VideoFrame {
                // Other flag bits are reserved for newer minor versions.
                keyframe: flags & 1 == 1,
                codec,
                rtp_timestamp,
                data,
            })
        }
        TAG_AUDIO => {
            let codec = r.u8("audio codec")?;
            let rtp_timestamp = r.u32("rtp_timestamp")?;
            let data = body.slice(r.bytes32("audio data")?);
            Record::Audio(AudioFrame {
                codec,
                rtp_timestamp,
                data,
            })
        }
        TAG_INPUT => {
            let participant_id = r.str16("participant_id")?.to_owned();
            let outcome = match r.u8("input outcome")? {
                0 => InputOutcome::Delivered,
                1 => InputOutcome::RefusedViewOnly,
                2 => InputOutcome::Malformed,
                value => return Err(invalid("input outcome", value)),
            };
            let event = body.slice(r.bytes32("input event")?);
            Record::Input(InputRecord {
                participant_id,
                outcome,
                event,
            })
        }
        TAG_CHAT => {
            let participant_id = r.str16("participant_id")?.to_owned();
            let name = r.str16("name")?.to_owned();
            let [role, masked, audience] = r.array("chat flags")?;
            Record::Chat(ChatRecord {
                participant_id,
                name,
                role: role_from_u8(role)?,
                masked: bool_from(masked, "masked")?,
                audience: audience_from_u8(audience)?,
                text: r.str16("text")?.to_owned(),
            })
        }
        TAG_ROSTER => {
            let change = match r.u8("roster change")? {
                0 => RosterChange::Joined,
                1 => RosterChange::Left,
                2 => RosterChange::Masked,
                3 => RosterChange::Unmasked,
                4 => RosterChange::PermissionChanged,
                5 => RosterChange::RoleChanged,
                value => return Err(invalid("roster change", value)),
            };
            let participant_id = r.str16("participant_id")?.to_owned();
            let role = role_from_u8(r.u8("role")?)?;
            let name = r.str16("name")?.to_owned();
            let [visibility, permission] = r.array("roster state")?;
            Record::Roster(RosterRecord {
                change,
                participant_id,
                role,
                name,
                visibility: visibility_from_u8(visibility)?,
                permission: permission_from_u8(permission)?,
            })
        }
        TAG_FILE_TRANSFER => {
            let participant_id = r.str16("participant_id")?.to_owned();
            let [direction, outcome] = r.array("file transfer state")?;
            let direction = match direction {
                0 => FileDirection::FromCustomer,
                1 => FileDirection::ToCustomer,
                value => return Err(invalid("file direction", value)),
            };
            let outcome = match outcome {
                0 => FileOutcome::Offered,
                1 => FileOutcome::Completed,
                2 => FileOutcome::Declined,
                3 => FileOutcome::Cancelled,
                value => return Err(invalid("file outcome", value)),
            };
            Record::FileTransfer(FileTransferRecord {
                participant_id,
                direction,
                outcome,
                size: r.u64("file size")?,
                name: r.str16("file name")?.to_owned(),
            })
        }
        TAG_GAP => Record::Gap(GapRecord {
            kind: GapKind::from_u8(r.u8("gap kind")?),
            dropped: r.u32("gap dropped")?,
        }),
        _ => return Ok(None),
    };
    Ok(Some(record))
}

fn invalid(field: &'static str, value: u8) -> FieldError {
    FieldError::InvalidValue { field, value }
}

fn bool_from(byte: u8, field: &'static str) -> Result<bool, FieldError> {
    match byte {
        0 => Ok(false),
        1 => Ok(true),
        value => Err(invalid(field, value)),
    }
}

fn role_to_u8(role: Role) -> u8 {
    match role {
        Role::Host => 0,
        Role::Agent => 1,
        Role::Customer => 2,
        Role::Supervisor => 3,
    }
}

fn role_from_u8(byte: u8) -> Result<Role, FieldError> {
    match byte {
        0 => Ok(Role::Host),
        1 => Ok(Role::Agent),
        2 => Ok(Role::Customer),
        3 => Ok(Role::Supervisor),
        value => Err(invalid("role", value)),
    }
}

fn audience_to_u8(audience: Audience) -> u8 {
    match audience {
        Audience::All => 0,
        Audience::Agents => 1,
    }
}

fn audience_from_u8(byte: u8) -> Result<Audience, FieldError> {
    match byte {
        0 => Ok(Audience::All),
        1 => Ok(Audience::Agents),
        value => Err(invalid("audience", value)),
    }
}

fn visibility_to_u8(visibility: Visibility) -> u8 {
    match visibility {
        Visibility::Visible => 0,
        Visibility::Masked => 1,
    }
}

fn visibility_from_u8(byte: u8) -> Result<Visibility, FieldError> {
    match byte {
        0 => Ok(Visibility::Visible),
        1 => Ok(Visibility::Masked),
        value => Err(invalid("visibility", value)),
    }
}

fn permission_to_u8(permission: Permission) -> u8 {
    match permission {
        Permission::View => 0,
        Permission::Control => 1,
    }
}

fn permission_from_u8(byte: u8) -> Result<Permission, FieldError> {
    match byte {
        0 => Ok(Permission::View),
        1 => Ok(Permission::Control),
        value => Err(invalid("permission", value)),
    }
}
