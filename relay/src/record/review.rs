//! The review tools behind `relay recordings ...`: verify, repair, list, transcript,
//! events and export. Each opens recordings with a portal's identity
//! ([`super::file::open_recording`]) and returns what to print; the CLI only reads the
//! identity and the passphrase.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use age::x25519;
use relay_codec::input::{self, InputKind};
use relay_codec::recording::{
    self, CHUNK_HEADER_BYTES, FileDirection, FileOutcome, InputOutcome, Record, Recording,
    RecordingError, RosterChange, TimedRecord,
};
use relay_codec::wire::{Audience, Permission, Role, Visibility};

use super::export::{self, ExportError, ExportSummary};
use super::file::{self, DecryptedRecording, EncryptionStatus, RecordingFileError};

/// Why a review command failed.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The file could not be opened or decrypted at all.
    #[error(transparent)]
    File(#[from] RecordingFileError),
    /// It decrypted, but the container's header cannot be read.
    #[error("{path}: {error}")]
    Container {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        error: RecordingError,
    },
    /// The video could not be exported.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// A repair output that is the input.
    #[error("--out must name a new file, not the recording being repaired")]
    SameFile,
    /// A folder could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The folder.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// A decrypted recording and its container, parsed.
struct Opened {
    decrypted: DecryptedRecording,
}

impl Opened {
    fn open(path: &Path, identity: &x25519::Identity) -> Result<Self, ReviewError> {
        let decrypted = file::open_recording(path, identity)?;
        // Check the header now, so that every command reports the same error.
        Recording::parse(&decrypted.container).map_err(|error| ReviewError::Container {
            path: path.to_owned(),
            error,
        })?;
        Ok(Self { decrypted })
    }

    fn recording(&self) -> Recording<'_> {
        // Parsed once in `open`: cannot fail on the same bytes.
        match Recording::parse(&self.decrypted.container) {
            Ok(recording) => recording,
            Err(e) => unreachable!("parsed before: {e}"),
        }
    }
}

/// `verify`: the encryption layer's status and the container's report. The flag is
/// whether nothing at all was lost.
pub fn verify(path: &Path, identity: &x25519::Identity) -> Result<(String, bool), ReviewError> {
    let opened = Opened::open(path, identity)?;
    let report = opened.recording().verify();
    let status = &opened.decrypted.status;
    let intact = status.is_intact() && report.is_clean();
    let mut out = format!(
        "{}: {}\nencryption: {status}\ndecrypted: {} of the container's bytes\n{report}",
        path.display(),
        if intact { "intact" } else { "DAMAGED" },
        opened.decrypted.container.len(),
    );
    if !intact {
        out.push_str(
            "\nreadable up to the last complete chunk; `relay recordings repair` rewrites it \
             with a fresh index",
        );
    }
    Ok((out, intact))
}

/// `repair`: decrypts what is readable, keeps the chunks that verify, and writes them
/// with a fresh index to `out`, encrypted to the identity's own public key.
pub fn repair(path: &Path, out: &Path, identity: &x25519::Identity) -> Result<String, ReviewError> {
    if out == path
        || std::fs::canonicalize(out)
            .ok()
            .zip(std::fs::canonicalize(path).ok())
            .is_some_and(|(a, b)| a == b)
    {
        return Err(ReviewError::SameFile);
    }
    let opened = Opened::open(path, identity)?;
    let before = opened.recording().verify();
    let repaired =
        recording::repair(&opened.decrypted.container).map_err(|error| ReviewError::Container {
            path: path.to_owned(),
            error,
        })?;
    let after = Recording::parse(&repaired)
        .map_err(|error| ReviewError::Container {
            path: out.to_owned(),
            error,
        })?
        .verify();
    let bytes = file::write_recording(out, &identity.to_public(), &repaired)?;
    Ok(format!(
        "wrote {} ({bytes} bytes): {} chunks kept, {} video frames, {} ms; \
         dropped {} corrupt chunk(s){}{}",
        out.display(),
        after.chunks_ok,
        after.counts.video_frames,
        after.duration_ms,
        before.corrupt.len(),
        if before.tail.is_some() {
            " and a cut-off tail"
        } else {
            ""
        },
        match opened.decrypted.status {
            EncryptionStatus::Intact => String::new(),
            ref lost => format!("; encryption layer was {lost}"),
        }
    ))
}

/// `list`: every `*.rec` under `dir`, one line each, then the entries left out:
/// symbolic links (files or folders; never followed) and `*.rec` entries that are not
/// regular files.
pub fn list(dir: &Path, identity: &x25519::Identity) -> Result<String, ReviewError> {
    let mut found = Found::default();
    find_recordings(dir, &mut found)?;
    let Found {
        recordings: mut files,
        mut skipped,
    } = found;
    files.sort();
    skipped.sort();
    let mut out = format!(
        "{:<24} {:<12} {:<24} {:>10} {:<24} {:>10} {:>6}  {}\n",
        "ID", "PORTAL", "START (UTC)", "DURATION", "AGENTS", "SIZE", "RATIO", "FILE"
    );
    for path in files {
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let line = match Opened::open(&path, identity) {
            Ok(opened) => {
                let recording = opened.recording();
                let header = recording.header();
                let records = all_records(&recording);
                let mut agents = Vec::new();
                for r in &records {
                    if let Record::Roster(roster) = &r.record {
                        if roster.role != Role::Customer && !agents.contains(&roster.name) {
                            agents.push(crate::text::escape_line(&roster.name));
                        }
                    }
                }
                let (raw, stored) = chunk_sizes(&recording);
                let ratio = if stored == 0 {
                    "-".to_owned()
                } else {
                    format!("{:.2}", raw as f64 / stored as f64)
                };
                let damaged = if opened.decrypted.status.is_intact()
                    && recording.tail().is_none()
                    && recording.unreadable().is_empty()
                {
                    ""
                } else {
                    " (damaged: run verify)"
                };
                format!(
                    "{:<24} {:<12} {:<24} {:>10} {:<24} {:>10} {:>6}  {}{damaged}",
                    crate::text::escape_line(&header.session_id),
                    crate::text::escape_line(&header.portal),
                    absolute_time(header.start_unix_ms, 0),
                    format_duration(recording.duration_ms()),
                    if agents.is_empty() {
                        "-".to_owned()
                    } else {
                        agents.join(", ")
                    },
                    size,
                    ratio,
                    path.display()
                )
            }
            Err(ReviewError::File(RecordingFileError::NotForThisIdentity(_))) => format!(
                "{:<24} {:<12} {:<24} {:>10} {:<24} {:>10} {:>6}  {} (not for this identity)",
                "?",
                "?",
                "?",
                "?",
                "?",
                size,
                "?",
                path.display()
            ),
            Err(e) => format!("{:<24} unreadable: {e}", "?"),
        };
        out.push_str(&line);
        out.push('\n');
    }
    for (path, why) in skipped {
        let shown = crate::text::escape_line(&path.display().to_string());
        let _ = writeln!(out, "{:<24} skipped ({why}): {shown}", "-");
    }
    Ok(out)
}

/// What `list` found under its folder.
#[derive(Default)]
struct Found {
    /// Regular `*.rec` files.
    recordings: Vec<PathBuf>,
    /// Entries left out, and why: symbolic links (never followed, so a link cannot
    /// lead out of the folder or round in a cycle) and `*.rec` entries that are not
    /// regular files (FIFOs, sockets, devices, directories).
    skipped: Vec<(PathBuf, &'static str)>,
}

/// Walks `dir` without following symbolic links (the folder itself may be one). Each
/// directory is entered once (by device and inode), so no mount loop can make it
/// endless either.
fn find_recordings(dir: &Path, found: &mut Found) -> Result<(), ReviewError> {
    use std::os::unix::fs::MetadataExt as _;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ReviewError::Io { path, source }
    };
    let mut seen = std::collections::HashSet::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let meta = std::fs::metadata(&dir).map_err(io(&dir))?;
        if !meta.is_dir() {
            return Err(ReviewError::Io {
                path: dir,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotADirectory,
                    format!("not a folder (it is {})", file::file_kind(meta.file_type())),
                ),
            });
        }
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let path = entry.path();
            // `file_type` does not follow symbolic links.
            let file_type = entry.file_type().map_err(io(&path))?;
            let is_rec = path
                .extension()
                .is_some_and(|e| e == file::RECORDING_EXTENSION);
            if file_type.is_symlink() {
                found.skipped.push((path, "symbolic link, not followed"));
            } else if file_type.is_dir() {
                pending.push(path);
            } else if is_rec && file_type.is_file() {
                found.recordings.push(path);
            } else if is_rec {
                found.skipped.push((path, file::file_kind(file_type)));
            }
        }
    }
    Ok(())
}

/// Raw and stored payload bytes of every chunk, from the chunk headers' `stored_len`
/// (offset 40) and `raw_len` (offset 44); see docs/recording-format.md.
fn chunk_sizes(recording: &Recording<'_>) -> (u64, u64) {
    let file = recording.file();
    let field = |at: u64| {
        usize::try_from(at)
            .ok()
            .and_then(|at| file.get(at..at + 4))
            .map_or(0, |b| {
                u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            })
    };
    recording
        .chunks()
        .iter()
        .fold((0, 0), |(raw, stored), chunk| {
            (
                raw + field(chunk.offset + 44),
                stored + field(chunk.offset + 40),
            )
        })
}

// The lengths read by `chunk_sizes` are inside the chunk header.
const _: () = assert!(CHUNK_HEADER_BYTES >= 48);

/// Every readable record; chunks that fail their checks are left out.
fn all_records(recording: &Recording<'_>) -> Vec<TimedRecord> {
    recording.records().filter_map(Result::ok).collect()
}

/// The transcript's output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TranscriptFormat {
    /// One line per message or roster change.
    Text,
    /// A JSON array of objects.
    Json,
}

/// `transcript`: chat, notes, roster changes and file transfers in time order. Masked agents appear by
/// name, marked "(masked)": transcripts are for supervisors.
pub fn transcript(
    path: &Path,
    identity: &x25519::Identity,
    format: TranscriptFormat,
) -> Result<String, ReviewError> {
    let opened = Opened::open(path, identity)?;
    let recording = opened.recording();
    let start = recording.header().start_unix_ms;
    let mut lines: Vec<&TimedRecord> = Vec::new();
    let records = all_records(&recording);
    lines.extend(records.iter().filter(|r| {
        matches!(
            r.record,
            Record::Chat(_) | Record::Roster(_) | Record::FileTransfer(_)
        )
    }));
    // Who each participant id is (file records name only the id).
    let people: HashMap<&str, (&str, Role, bool)> = records
        .iter()
        .filter_map(|r| match &r.record {
            Record::Roster(p) => Some((
                p.participant_id.as_str(),
                (p.name.as_str(), p.role, p.visibility == Visibility::Masked),
            )),
            _ => None,
        })
        .collect();
    // Stable: records of one stream keep their order.
    lines.sort_by_key(|r| r.at_ms);
    let mut json = Vec::new();
    let mut text = String::new();
    for r in lines {
        let rel = format_offset(r.at_ms);
        let abs = absolute_time(start, r.at_ms);
        match &r.record {
            Record::Chat(chat) => {
                let who = person(&chat.name, chat.role, chat.masked);
                let kind = match chat.audience {
                    Audience::Agents => "note (agents only)",
                    _ => "chat",
                };
                // One message is one entry, however it was written: continuation
                // lines are marked, controls shown as escapes (old recordings may
                // hold text the relay refuses today).
                let _ = writeln!(
                    text,
                    "{rel}  {abs}  {kind:<18}  {who}: {}",
                    crate::text::transcript_text(&chat.text)
                );
                json.push(serde_json::json!({
                    "at_ms": r.at_ms, "time": abs, "kind": if chat.audience == Audience::Agents { "note" } else { "chat" },
                    "participant_id": chat.participant_id, "name": chat.name,
                    "role": role_name(chat.role), "masked": chat.masked,
                    "agents_only": chat.audience == Audience::Agents, "text": chat.text,
                }));
            }
            Record::Roster(roster) => {
                let masked = roster.visibility == Visibility::Masked;
                let who = person(&roster.name, roster.role, masked);
                let change = change_name(roster.change);
                let permission = permission_name(roster.permission);
                let _ = writeln!(
                    text,
                    "{rel}  {abs}  {:<18}  {who} {change} (permission: {permission})",
                    "roster"
                );
                json.push(serde_json::json!({
                    "at_ms": r.at_ms, "time": abs, "kind": "roster",
                    "change": change, "participant_id": roster.participant_id,
                    "name": roster.name, "role": role_name(roster.role), "masked": masked,
                    "permission": permission,
                }));
            }
            Record::FileTransfer(f) => {
                let (name, role, masked) = people
                    .get(f.participant_id.as_str())
                    .copied()
                    .unwrap_or((f.participant_id.as_str(), Role::Agent, false));
                let who = person(name, role, masked);
                let (verb, direction) = match f.direction {
                    FileDirection::ToCustomer => ("to the customer", "to_customer"),
                    FileDirection::FromCustomer => ("from the customer", "from_customer"),
                };
                let outcome = match f.outcome {
                    FileOutcome::Offered => "offered",
                    FileOutcome::Completed => "completed",
                    FileOutcome::Declined => "declined",
                    FileOutcome::Cancelled => "cancelled",
                };
                let _ = writeln!(
                    text,
                    "{rel}  {abs}  {:<18}  {who}: {:?} ({} bytes) {verb}: {outcome}",
                    "file", f.name, f.size
                );
                json.push(serde_json::json!({
                    "at_ms": r.at_ms, "time": abs, "kind": "file",
                    "participant_id": f.participant_id, "name": name,
                    "role": role_name(role), "masked": masked, "direction": direction,
                    "file": f.name, "size": f.size, "outcome": outcome,
                }));
            }
            _ => {}
        }
    }
    Ok(match format {
        TranscriptFormat::Text => text,
        TranscriptFormat::Json => {
            serde_json::to_string_pretty(&json).unwrap_or_else(|e| format!("\"{e}\""))
        }
    })
}

/// `events`: input events with time, agent, what they did and what the relay did.
pub fn events(path: &Path, identity: &x25519::Identity) -> Result<String, ReviewError> {
    let opened = Opened::open(path, identity)?;
    let recording = opened.recording();
    let start = recording.header().start_unix_ms;
    let records = all_records(&recording);
    let mut names: HashMap<&str, &str> = HashMap::new();
    for r in &records {
        match &r.record {
            Record::Roster(roster) => {
                names.insert(&roster.participant_id, &roster.name);
            }
            Record::Chat(chat) => {
                names.entry(&chat.participant_id).or_insert(&chat.name);
            }
            _ => {}
        }
    }
    let mut out = String::new();
    for r in &records {
        let Record::Input(event) = &r.record else {
            continue;
        };
        let who = crate::text::escape_line(
            names
                .get(event.participant_id.as_str())
                .copied()
                .unwrap_or(&event.participant_id),
        );
        let outcome = match event.outcome {
            InputOutcome::Delivered => "delivered",
            InputOutcome::RefusedViewOnly => "refused (view only)",
            InputOutcome::Malformed => "refused (malformed)",
        };
        let _ = writeln!(
            out,
            "{}  {}  {who:<16}  {:<40}  {outcome}",
            format_offset(r.at_ms),
            absolute_time(start, r.at_ms),
            describe_input(&event.event)
        );
    }
    Ok(out)
}

/// `export`: the screen video as WebM or MP4.
pub fn export(
    path: &Path,
    identity: &x25519::Identity,
    out: &Path,
    from_ms: Option<u64>,
    to_ms: Option<u64>,
) -> Result<String, ReviewError> {
    let opened = Opened::open(path, identity)?;
    let ExportSummary {
        codec,
        frames,
        keyframes,
        duration_ms,
        first_ms,
        width,
        height,
        corrupt_chunks,
        skipped_frames,
    } = export::export_video(&opened.recording(), out, from_ms, to_ms)?;
    let mut summary = format!(
        "wrote {}: {codec} {width}x{height}, {frames} frames ({keyframes} keyframes), \
         {} from {} of the recording",
        out.display(),
        format_duration(duration_ms),
        format_offset(first_ms),
    );
    if corrupt_chunks > 0 || skipped_frames > 0 {
        let _ = write!(
            summary,
            "; {corrupt_chunks} unreadable chunk(s), {skipped_frames} frame(s) left out"
        );
    }
    Ok(summary)
}

/// A time given on the command line: seconds (`90`, `1.5`) or a duration (`1m30s`).
pub fn parse_time(s: &str) -> Result<u64, String> {
    if let Ok(seconds) = s.parse::<f64>() {
        if seconds.is_finite() && seconds >= 0.0 {
            return Ok((seconds * 1000.0).round() as u64);
        }
        return Err(format!("{s:?} is not a time (seconds or e.g. 1m30s)"));
    }
    humantime::parse_duration(s)
        .map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64)
        .map_err(|e| format!("{s:?} is not a time (seconds or e.g. 1m30s): {e}"))
}

fn describe_input(bytes: &[u8]) -> String {
    let Ok(event) = input::decode(bytes) else {
        return format!("malformed ({} bytes)", bytes.len());
    };
    match event.kind {
        InputKind::MouseMove { x, y } => format!("mouse move {x},{y}"),
        InputKind::MouseButton { button, down } => {
            format!("mouse {button:?} {}", if down { "down" } else { "up" })
        }
        InputKind::Wheel { dx, dy } => format!("wheel {dx},{dy}"),
        InputKind::Key {
            code,
            down,
            modifiers,
        } => format!(
            "key {code:#010x} {}{}",
            if down { "down" } else { "up" },
            if modifiers.bits() == 0 {
                String::new()
            } else {
                format!(" modifiers {:#04x}", modifiers.bits())
            }
        ),
        InputKind::CtrlAltDel => "ctrl+alt+del".to_owned(),
        // The text may be a password: its length says enough for a review.
        InputKind::Clipboard { text } => format!("clipboard ({} characters)", text.chars().count()),
    }
}

/// A participant for the text outputs: the name with every control, bidi or
/// invisible character escaped (see [`crate::text::escape_line`]).
fn person(name: &str, role: Role, masked: bool) -> String {
    format!(
        "{} ({}{})",
        crate::text::escape_line(name),
        role_name(role),
        if masked { ", masked" } else { "" }
    )
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Host => "host",
        Role::Agent => "agent",
        Role::Customer => "customer",
        Role::Supervisor => "supervisor",
    }
}

fn change_name(change: RosterChange) -> &'static str {
    match change {
        RosterChange::Joined => "joined",
        RosterChange::Left => "left",
        RosterChange::Masked => "became masked",
        RosterChange::Unmasked => "became visible",
        RosterChange::PermissionChanged => "permission changed",
        RosterChange::RoleChanged => "role changed",
    }
}

fn permission_name(permission: Permission) -> &'static str {
    match permission {
        Permission::Control => "control",
        Permission::View => "view",
    }
}

/// `+HH:MM:SS.mmm` since the recording started.
fn format_offset(ms: u64) -> String {
    format!(
        "+{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

fn format_duration(ms: u64) -> String {
    format!("{}.{:03}s", ms / 1000, ms % 1000)
}

/// RFC 3339 UTC time of a record.
fn absolute_time(start_unix_ms: u64, at_ms: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(start_unix_ms.saturating_add(at_ms));
    humantime::format_rfc3339_millis(at).to_string()
}
