//! Recordings and the review tools (issue 4): recordings built with the library
//! (`RecordingWriter` + the encrypted file writer, real VP8 and H.264 fixtures, chat,
//! roster and input records), reviewed with the REAL `relay recordings ...` commands,
//! and the exported video checked with ffprobe.
//!
//! ffprobe must be installed (`.ci/run` installs ffmpeg): the test fails without it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use age::secrecy::SecretString;
use bytes::Bytes;
use relay::record::file::{RecordingFileWriter, SyncPolicy, open_recording, recording_path};
use relay::record::keys::new_review_key;
use relay_bench::client::FrameSource;
use relay_codec::input::{InputEvent, InputKind, encode_to_vec};
use relay_codec::recording::{
    ChatRecord, ChunkSettings, InputOutcome, InputRecord, Record, Recording, RecordingHeader,
    RecordingWriter, RosterChange, RosterRecord, VideoFrame,
};
use relay_codec::wire::{Audience, Permission, Role, Visibility};

#[path = "recording/export_av1.rs"]
mod export_av1;

const PASSPHRASE: &str = "correct horse battery staple";
const FPS: u64 = 15;

/// A portal identity on disk with its passphrase file.
struct Reviewer {
    identity: PathBuf,
    passphrase_file: PathBuf,
    recipient: age::x25519::Recipient,
}

fn reviewer(dir: &Path, name: &str, passphrase: &str) -> Reviewer {
    let key = new_review_key(
        "support",
        SecretString::from(passphrase.to_owned()),
        Some(10),
    )
    .expect("review key");
    let identity = dir.join(format!("{name}.age"));
    std::fs::write(&identity, &key.identity_file).expect("write identity");
    let passphrase_file = dir.join(format!("{name}.pass"));
    std::fs::write(&passphrase_file, format!("{passphrase}\n")).expect("write passphrase");
    Reviewer {
        identity,
        passphrase_file,
        recipient: key.recipient,
    }
}

/// What a built recording holds.
struct Built {
    path: PathBuf,
    frames: u64,
    chats: Vec<String>,
}

/// Writes a recording of the fixture's frames (VP8: 60, 4 s at 15 fps) with a roster (a
/// customer, a host and a masked agent), chat lines, a note and input events.
fn build_recording(dir: &Path, fixture: &str, session: &str, to: &Reviewer) -> Built {
    let source = FrameSource::open(relay_e2e::fixture(fixture)).expect("fixture");
    let header = RecordingHeader {
        session_id: session.into(),
        portal: "support".into(),
        start_unix_ms: 1_763_900_000_000,
        video_codecs: vec![source.codec().mime_type().into()],
        audio_codecs: vec![],
    };
    let (mut writer, header_bytes) =
        RecordingWriter::new(&header, ChunkSettings::default()).expect("writer");
    let path = recording_path(dir, &header.portal, header.start_unix_ms, session);
    let mut file =
        RecordingFileWriter::create(&path, &to.recipient, &header_bytes, SyncPolicy::default())
            .expect("file writer");
    let mut push = |at_ms: u64, record: Record| {
        if let Some(chunk) = writer.push(at_ms, &record).expect("push") {
            file.append_chunk(&chunk).expect("append");
        }
    };
    let roster = |change, id: &str, role, name: &str, visibility, permission| {
        Record::Roster(RosterRecord {
            change,
            participant_id: id.into(),
            role,
            name: name.into(),
            visibility,
            permission,
        })
    };
    use Permission::{Control, View};
    use Visibility::{Masked, Visible};
    push(
        0,
        roster(
            RosterChange::Joined,
            "c1",
            Role::Customer,
            "Carol",
            Visible,
            View,
        ),
    );
    push(
        0,
        roster(
            RosterChange::Joined,
            "a1",
            Role::Host,
            "Alice",
            Visible,
            Control,
        ),
    );
    push(
        5,
        roster(
            RosterChange::Joined,
            "a2",
            Role::Agent,
            "Bob",
            Visible,
            View,
        ),
    );
    push(
        6,
        roster(RosterChange::Masked, "a2", Role::Agent, "Bob", Masked, View),
    );

    let chats = [
        (
            "c1",
            "Carol",
            Role::Customer,
            false,
            Audience::All,
            "My printer is offline",
        ),
        (
            "a1",
            "Alice",
            Role::Host,
            false,
            Audience::All,
            "Let me have a look",
        ),
        (
            "a2",
            "Bob",
            Role::Agent,
            true,
            Audience::All,
            "Try the driver settings",
        ),
        (
            "a2",
            "Bob",
            Role::Agent,
            true,
            Audience::Agents,
            "Her driver is outdated",
        ),
        (
            "c1",
            "Carol",
            Role::Customer,
            false,
            Audience::All,
            "It works now, thanks!",
        ),
    ];
    let frames = source.frames();
    for (i, frame) in frames.iter().enumerate() {
        let i = i as u64;
        let at_ms = i * 1000 / FPS;
        push(
            at_ms,
            Record::Video(VideoFrame {
                keyframe: frame.is_keyframe,
                codec: 0,
                rtp_timestamp: (i * 90_000 / FPS) as u32,
                data: frame.data.clone(),
            }),
        );
        if i % 12 == 3 {
            let (id, name, role, masked, audience, text) = chats[(i / 12) as usize];
            push(
                at_ms,
                Record::Chat(ChatRecord {
                    participant_id: id.into(),
                    name: name.into(),
                    role,
                    masked,
                    audience,
                    text: text.into(),
                }),
            );
        }
        if i % 10 == 5 {
            let (id, outcome) = if i % 20 == 5 {
                ("a1", InputOutcome::Delivered)
            } else {
                ("a2", InputOutcome::RefusedViewOnly)
            };
            let event = encode_to_vec(&InputEvent {
                seq: i as u32,
                kind: InputKind::MouseMove {
                    x: 1000 * i as u16,
                    y: 500,
                },
            })
            .expect("input");
            push(
                at_ms,
                Record::Input(InputRecord {
                    participant_id: id.into(),
                    outcome,
                    event: Bytes::from(event),
                }),
            );
        }
    }
    push(
        3990,
        roster(RosterChange::Left, "a2", Role::Agent, "Bob", Masked, View),
    );
    file.finish(&writer.finish()).expect("finish");
    Built {
        path,
        frames: frames.len() as u64,
        chats: chats.iter().map(|c| c.5.to_owned()).collect(),
    }
}

impl Reviewer {
    /// The identity, opened with [`PASSPHRASE`].
    fn open(&self) -> age::x25519::Identity {
        relay::record::keys::open_identity(
            &std::fs::read(&self.identity).expect("identity"),
            SecretString::from(PASSPHRASE.to_owned()),
        )
        .map_err(|e| e.to_string())
        .expect("the identity opens")
    }
}

/// `relay recordings repair PATH --out REPAIRED`, then `verify REPAIRED`, both of which
/// must succeed; returns what `verify` printed.
fn repair_and_verify(who: &Reviewer, path: &Path, repaired: &Path) -> String {
    expect_status(
        &recordings(who, &["repair", s(path), "--out", s(repaired)]),
        0,
        "repair",
    );
    expect_status(
        &recordings(who, &["verify", s(repaired)]),
        0,
        "verify repaired",
    )
}

/// Runs `relay recordings <args> --identity .. --passphrase-file ..`.
fn recordings(who: &Reviewer, args: &[&str]) -> Output {
    let bin = relay_e2e::relay_binary().expect("relay binary");
    Command::new(bin)
        .arg("recordings")
        .args(args)
        .arg("--identity")
        .arg(&who.identity)
        .arg("--passphrase-file")
        .arg(&who.passphrase_file)
        .output()
        .expect("run relay")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn expect_status(out: &Output, code: i32, what: &str) -> String {
    let (stdout, stderr) = text(out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: exit status\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    stdout
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// What ffprobe reads from a video: codec, decoded frames, duration in seconds.
fn ffprobe(video: &Path) -> (String, u64, f64) {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-show_entries"])
        .arg("stream=nb_read_frames,codec_name")
        .args(["-show_entries", "format=duration", "-of", "json"])
        .arg(video)
        .output()
        .unwrap_or_else(|e| {
            panic!("ffprobe is required for this test (apt-get install ffmpeg): {e}")
        });
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "ffprobe failed: {stderr}");
    assert!(stderr.trim().is_empty(), "ffprobe complained: {stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("ffprobe json");
    let stream = &json["streams"][0];
    let frames = stream["nb_read_frames"]
        .as_str()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no frame count: {stdout}"));
    let duration = json["format"]["duration"]
        .as_str()
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("no duration: {stdout}"));
    (
        stream["codec_name"].as_str().unwrap_or("").to_owned(),
        frames,
        duration,
    )
}

#[test]
fn a_vp8_recording_verifies_exports_to_webm_and_transcribes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let who = reviewer(dir.path(), "support", PASSPHRASE);
    let rec_dir = dir.path().join("recordings");
    let built = build_recording(&rec_dir, "screen-vp8.ivf", "sess-vp8", &who);
    assert!(
        built.path.ends_with("support/2025-11-23/sess-vp8.rec"),
        "{}",
        built.path.display()
    );

    let out = expect_status(&recordings(&who, &["verify", s(&built.path)]), 0, "verify");
    assert!(out.contains(": intact"), "{out}");
    assert!(out.contains("encryption: intact"), "{out}");
    assert!(out.contains("60 video frames (2 keyframes)"), "{out}");

    let video = dir.path().join("screen.webm");
    let out = expect_status(
        &recordings(&who, &["export", s(&built.path), "--out", s(&video)]),
        0,
        "export",
    );
    assert!(out.contains("60 frames"), "{out}");
    let (codec, frames, duration) = ffprobe(&video);
    assert_eq!(codec, "vp8");
    assert_eq!(frames, built.frames);
    assert!((duration - 4.0).abs() < 0.01, "duration {duration}");

    // From 2.5 s: the video starts at the keyframe at 2.0 s (frame 30).
    let part = dir.path().join("part.webm");
    expect_status(
        &recordings(
            &who,
            &["export", s(&built.path), "--out", s(&part), "--from", "2.5"],
        ),
        0,
        "export --from",
    );
    let (_, frames, duration) = ffprobe(&part);
    assert_eq!(frames, 30);
    assert!((duration - 2.0).abs() < 0.01, "duration {duration}");

    let out = expect_status(
        &recordings(&who, &["transcript", s(&built.path)]),
        0,
        "transcript",
    );
    let mut rest = out.as_str();
    for line in &built.chats {
        let at = rest
            .find(line.as_str())
            .unwrap_or_else(|| panic!("{line:?} missing or out of order in:\n{out}"));
        rest = &rest[at + line.len()..];
    }
    assert!(
        out.contains("Bob (agent, masked): Try the driver settings"),
        "{out}"
    );
    assert!(out.contains("note (agents only)"), "{out}");
    assert!(out.contains("Bob (agent, masked) became masked"), "{out}");
    assert!(out.contains("2025-11-23T"), "{out}");
    let json = expect_status(
        &recordings(&who, &["transcript", s(&built.path), "--format", "json"]),
        0,
        "transcript json",
    );
    let json: serde_json::Value = serde_json::from_str(&json).expect("json transcript");
    let texts: Vec<&str> = json
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|e| e["text"].as_str())
        .collect();
    assert_eq!(texts, built.chats);

    let out = expect_status(&recordings(&who, &["events", s(&built.path)]), 0, "events");
    assert_eq!(out.lines().count(), 6, "{out}");
    assert!(out.contains("Alice") && out.contains("delivered"), "{out}");
    assert!(
        out.contains("Bob") && out.contains("refused (view only)"),
        "{out}"
    );
    assert!(out.contains("mouse move 5000,500"), "{out}");

    let out = expect_status(&recordings(&who, &["list", s(&rec_dir)]), 0, "list");
    let line = out
        .lines()
        .find(|l| l.contains("sess-vp8"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("Alice, Bob"), "{line}");
    assert!(line.contains("3.990s"), "{line}");
}

#[test]
fn an_h264_recording_exports_to_mp4() {
    let dir = tempfile::tempdir().expect("tempdir");
    let who = reviewer(dir.path(), "support", PASSPHRASE);
    let built = build_recording(dir.path(), "screen-h264.h264", "sess-h264", &who);
    let video = dir.path().join("screen.mp4");
    expect_status(
        &recordings(&who, &["export", s(&built.path), "--out", s(&video)]),
        0,
        "export",
    );
    let (codec, frames, duration) = ffprobe(&video);
    assert_eq!(codec, "h264");
    assert_eq!(frames, built.frames);
    assert!((duration - 4.0).abs() < 0.01, "duration {duration}");

    // H.264 does not go into WebM.
    let out = recordings(
        &who,
        &[
            "export",
            s(&built.path),
            "--out",
            s(&dir.path().join("x.webm")),
        ],
    );
    expect_status(&out, 2, "export h264 as webm");
    assert!(text(&out).1.contains("use .mp4"), "{}", text(&out).1);
}

#[test]
fn a_wrong_passphrase_or_another_identity_cannot_read_a_recording() {
    let dir = tempfile::tempdir().expect("tempdir");
    let who = reviewer(dir.path(), "support", PASSPHRASE);
    let built = build_recording(dir.path(), "screen-vp8.ivf", "sess", &who);

    let wrong = Reviewer {
        passphrase_file: dir.path().join("wrong.pass"),
        identity: who.identity.clone(),
        recipient: who.recipient.clone(),
    };
    std::fs::write(&wrong.passphrase_file, "not the passphrase at all\n").expect("write");
    let out = recordings(&wrong, &["verify", s(&built.path)]);
    expect_status(&out, 2, "wrong passphrase");
    assert!(
        text(&out)
            .1
            .contains("wrong passphrase for this identity file"),
        "{}",
        text(&out).1
    );

    let other = reviewer(dir.path(), "billing", "another long passphrase");
    let out = recordings(&other, &["transcript", s(&built.path)]);
    expect_status(&out, 2, "other identity");
    assert!(
        text(&out)
            .1
            .contains("this recording is not for this identity"),
        "{}",
        text(&out).1
    );
    let out = expect_status(&recordings(&other, &["list", s(dir.path())]), 0, "list");
    assert!(out.contains("(not for this identity)"), "{out}");
    // The file itself holds nothing in clear.
    let bytes = std::fs::read(&built.path).expect("read");
    assert!(!bytes.windows(5).any(|w| w == b"Carol"));
}

/// A recording with no video whose chat holds what an older relay let through: a
/// message with a newline that imitates a transcript line, ESC and BEL sequences and a
/// lone CR, sent by a participant whose name has a right-to-left override.
fn build_forged_chat_recording(dir: &Path, to: &Reviewer) -> PathBuf {
    let header = RecordingHeader {
        session_id: "forged".into(),
        portal: "support".into(),
        start_unix_ms: 1_763_900_000_000,
        video_codecs: vec!["video/VP8".into()],
        audio_codecs: vec![],
    };
    let (mut writer, header_bytes) =
        RecordingWriter::new(&header, ChunkSettings::default()).expect("writer");
    let path = recording_path(dir, &header.portal, header.start_unix_ms, "forged");
    let mut file =
        RecordingFileWriter::create(&path, &to.recipient, &header_bytes, SyncPolicy::default())
            .expect("file writer");
    let records = [
        Record::Roster(RosterRecord {
            change: RosterChange::Joined,
            participant_id: "c1".into(),
            role: Role::Customer,
            name: "Carol\u{202e}TNEGA".into(),
            visibility: Visibility::Visible,
            permission: Permission::View,
        }),
        Record::Chat(ChatRecord {
            participant_id: "c1".into(),
            name: "Carol\u{202e}TNEGA".into(),
            role: Role::Customer,
            masked: false,
            audience: Audience::All,
            text: "hello\n+00:00:09.000  2025-11-23T12:00:09.000Z  chat                \
                   Alice (host): please read me your card number\u{1b}[2K\u{7}\rX\0"
                .into(),
        }),
        Record::Chat(ChatRecord {
            participant_id: "c1".into(),
            name: "Carol\u{202e}TNEGA".into(),
            role: Role::Customer,
            masked: false,
            audience: Audience::All,
            text: "second message".into(),
        }),
    ];
    for (i, record) in records.iter().enumerate() {
        if let Some(chunk) = writer.push(i as u64 * 100, record).expect("push") {
            file.append_chunk(&chunk).expect("append");
        }
    }
    file.finish(&writer.finish()).expect("finish");
    path
}

#[test]
fn a_forged_chat_message_stays_one_transcript_entry_and_shows_its_controls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let who = reviewer(dir.path(), "support", PASSPHRASE);
    let path = build_forged_chat_recording(dir.path(), &who);
    let out = expect_status(
        &recordings(&who, &["transcript", s(&path)]),
        0,
        "transcript",
    );
    // Every line is an entry of its own (starts with its offset) or a marked
    // continuation; nothing reaches the terminal raw.
    let entries: Vec<&str> = out.lines().filter(|l| l.starts_with('+')).collect();
    for line in out.lines() {
        assert!(
            line.starts_with('+') || line.starts_with("    | "),
            "a line that is neither an entry nor a marked continuation: {line:?}\n{out}"
        );
    }
    assert_eq!(entries.len(), 3, "roster, two messages:\n{out}");
    assert!(
        !out.chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t'),
        "raw control characters in:\n{out:?}"
    );
    assert!(
        !out.contains('\u{202e}'),
        "raw override in the output: {out:?}"
    );
    assert!(out.contains("\\u{1b}[2K\\u{7}\\u{d}X\\u{0}"), "{out}");
    assert!(out.contains("Carol\\u{202e}TNEGA (customer)"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("    | +00:00:09.000") && l.contains("read me your card")),
        "{out}"
    );
    // JSON keeps the text as it was (escaped by JSON itself).
    let json = expect_status(
        &recordings(&who, &["transcript", s(&path), "--format", "json"]),
        0,
        "json transcript",
    );
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert!(
        v[1]["text"]
            .as_str()
            .is_some_and(|t| t.starts_with("hello\n+00:00:09.000")),
        "{json}"
    );
}

/// `relay recordings list` on a folder with a symlink back to itself, a symlink to a
/// file outside, and a FIFO named `*.rec` ends at once: it lists the recording,
/// reports each of them as skipped, and follows no link.
#[test]
fn list_ends_on_symlink_loops_and_fifos_and_odd_paths_are_refused_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let who = reviewer(dir.path(), "support", PASSPHRASE);
    let recs = dir.path().join("recs");
    let built = build_forged_chat_recording(&recs, &who);
    std::os::unix::fs::symlink("..", recs.join("support").join("loop")).expect("symlink loop");
    std::os::unix::fs::symlink(&recs, recs.join("again")).expect("symlink to the folder");
    let outside = dir.path().join("outside.rec");
    std::fs::copy(&built, &outside).expect("copy");
    std::os::unix::fs::symlink(&outside, recs.join("outside.rec")).expect("symlink out");
    let fifo = recs.join("x.rec");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());

    let started = std::time::Instant::now();
    let out = run_with_deadline(&who, &["list", s(&recs)]);
    let listed = expect_status(&out, 0, "list");
    assert_eq!(
        listed.lines().filter(|l| l.starts_with("forged ")).count(),
        1,
        "the recording once, no link followed:\n{listed}"
    );
    for skipped in [
        "skipped (a FIFO): ",
        "skipped (symbolic link, not followed): ",
    ] {
        assert!(listed.contains(skipped), "{skipped:?} missing:\n{listed}");
    }
    assert!(listed.contains(&format!("{}", recs.join("support").join("loop").display())));
    assert!(listed.contains(&format!("{}", recs.join("outside.rec").display())));

    // Commands that read one recording refuse what is not a regular file.
    for (path, kind) in [
        (fifo.as_path(), "a FIFO"),
        (Path::new("/dev/zero"), "a device"),
        (recs.as_path(), "a directory"),
    ] {
        for command in ["verify", "transcript", "events"] {
            let out = run_with_deadline(&who, &[command, s(path)]);
            expect_status(&out, 2, command);
            let err = text(&out).1;
            assert!(
                err.contains(&format!("is not a regular file (it is {kind})")),
                "{command} {}: {err}",
                path.display()
            );
        }
    }

    // A passphrase or identity "file" that never ends is refused at once, not read.
    let endless = Reviewer {
        passphrase_file: PathBuf::from("/dev/zero"),
        identity: who.identity.clone(),
        recipient: who.recipient.clone(),
    };
    let out = run_with_deadline(&endless, &["verify", s(&built)]);
    expect_status(&out, 2, "passphrase /dev/zero");
    assert!(
        text(&out)
            .1
            .contains("first line is longer than 4096 bytes"),
        "{}",
        text(&out).1
    );
    let endless = Reviewer {
        identity: PathBuf::from("/dev/zero"),
        passphrase_file: who.passphrase_file.clone(),
        recipient: who.recipient.clone(),
    };
    let out = run_with_deadline(&endless, &["list", s(&recs)]);
    expect_status(&out, 2, "identity /dev/zero");
    assert!(
        text(&out).1.contains("larger than 64 KiB"),
        "{}",
        text(&out).1
    );
    // Generous: scrypt runs once per command; an endless read would never end.
    assert!(started.elapsed() < std::time::Duration::from_secs(120));
}

/// [`recordings`] with a deadline: a command still running after 60 s is killed and
/// the test fails (an endless walk or read must not hang the test run).
fn run_with_deadline(who: &Reviewer, args: &[&str]) -> Output {
    let bin = relay_e2e::relay_binary().expect("relay binary");
    let mut child = Command::new(bin)
        .arg("recordings")
        .args(args)
        .arg("--identity")
        .arg(&who.identity)
        .arg("--passphrase-file")
        .arg(&who.passphrase_file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run relay");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "relay recordings {args:?} did not end within 60 s: {}",
                text(&out).0
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn a_cut_off_recording_verifies_to_its_last_complete_chunk_and_repair_makes_it_exportable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let who = reviewer(dir.path(), "support", PASSPHRASE);
    let built = build_recording(dir.path(), "screen-vp8.ivf", "sess", &who);
    let whole = std::fs::read(&built.path).expect("read");
    let identity = who.open();
    let full = open_recording(&built.path, &identity).expect("open");
    let full = Recording::parse(&full.container).expect("parse");

    for percent in [45, 70, 90, 99] {
        let cut = whole.len() * percent / 100;
        let path = dir.path().join(format!("cut-{percent}.rec"));
        std::fs::write(&path, &whole[..cut]).expect("write");
        let decrypted = open_recording(&path, &identity).expect("open cut");
        let kept = full
            .chunks()
            .iter()
            .filter(|c| c.range().end <= decrypted.container.len() as u64)
            .count();
        assert!(kept > 0, "cut at {percent}% keeps no chunk");
        let out = expect_status(
            &recordings(&who, &["verify", s(&path)]),
            1,
            &format!("verify cut at {percent}%"),
        );
        assert!(out.contains("DAMAGED"), "{out}");
        assert!(out.contains("encryption: cut off"), "{out}");
        assert!(
            out.contains(&format!("chunks: {kept} intact")),
            "cut at {percent}%: expected {kept} chunks\n{out}"
        );

        let repaired = dir.path().join(format!("repaired-{percent}.rec"));
        let out = repair_and_verify(&who, &path, &repaired);
        let frames: u64 = out
            .split(" video frames")
            .next()
            .and_then(|s| s.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{out}"));
        assert!(frames > 0 && frames < built.frames, "{out}");
        let video = dir.path().join(format!("repaired-{percent}.webm"));
        expect_status(
            &recordings(&who, &["export", s(&repaired), "--out", s(&video)]),
            0,
            "export repaired",
        );
        let (_, exported, _) = ffprobe(&video);
        assert_eq!(exported, frames, "cut at {percent}%");
    }

    // Repair never overwrites its input.
    let out = recordings(&who, &["repair", s(&built.path), "--out", s(&built.path)]);
    expect_status(&out, 2, "repair onto itself");
}

/// A relay recording to a portal review key, with a session whose host is connected.
struct Live {
    relay: relay_e2e::Relay,
    tls: Arc<rustls::ClientConfig>,
    host_jwt: String,
    session: relay_e2e::wire::CreateSessionResponse,
    host: relay_bench::client::Agent,
}

impl Live {
    /// Starts the relay with `who`'s public key for the portal `support`, opens a
    /// session and connects its host.
    async fn start(who: &Reviewer) -> Live {
        use relay_bench::client::{Agent, AgentOptions, tls_trusting_pem_file};
        relay_e2e::install_crypto();
        let key = who.recipient.to_string();
        let relay = relay_e2e::RelayBuilder::new()
            .extra_toml(&format!("[recording.review_keys]\nsupport = \"{key}\"\n"))
            .start()
            .await
            .expect("relay starts");
        let tls = tls_trusting_pem_file(relay.data_dir().join("tls/cert.pem")).expect("tls");
        let host_jwt = relay.token("a0", "Alice Host", &["support"], false);
        let session = relay
            .create_session(&host_jwt, "support", Visibility::Visible)
            .await
            .expect("session");
        let host = Agent::connect(&session.host.ws_url, tls.clone(), AgentOptions::default())
            .await
            .expect("host connects");
        host.wait_connected(LIVE_WAIT)
            .await
            .expect("host's connection");
        Live {
            relay,
            tls,
            host_jwt,
            session,
            host,
        }
    }

    /// The customer joins with the support key and publishes the VP8 fixture.
    async fn customer(&self, name: &str) -> relay_bench::client::Customer {
        use relay_bench::client::{Customer, CustomerOptions};
        let joined = self
            .relay
            .join(name, &self.session.support_key)
            .await
            .expect("join");
        let source = FrameSource::open(relay_e2e::fixture("screen-vp8.ivf")).expect("fixture");
        let customer = Customer::connect(
            &joined.ws_url,
            self.tls.clone(),
            source,
            CustomerOptions::default(),
        )
        .await
        .expect("customer connects");
        customer
            .wait_connected(LIVE_WAIT)
            .await
            .expect("customer's connection");
        customer
            .wait_input_open(LIVE_WAIT)
            .await
            .expect("input channel");
        customer
    }

    /// The one recording file under the relay's recording folder, once `ready` holds
    /// for it.
    async fn recording_when(&self, what: &str, ready: impl Fn(&Path) -> bool) -> PathBuf {
        let rec_dir = self.relay.data_dir().join("recordings");
        let deadline = std::time::Instant::now() + LIVE_WAIT;
        loop {
            let found = find_recordings(&rec_dir);
            if let [path] = &found[..]
                && ready(path)
            {
                return path.clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no recording {what} in {}: {found:?}",
                rec_dir.display()
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

/// Longest wait for a connection, a frame or a file in the live tests.
const LIVE_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// The video frames of the recording at `path`, read with `who`'s identity; each
/// chunk must be intact.
fn recorded_frames(path: &Path, who: &Reviewer) -> Vec<VideoFrame> {
    let identity = who.open();
    let plain = open_recording(path, &identity).expect("decrypts");
    let recording = Recording::parse(&plain.container).expect("parses");
    recording
        .records()
        .map(|r| r.expect("intact"))
        .filter_map(|r| match r.record {
            Record::Video(v) => Some(v),
            _ => None,
        })
        .collect()
}

/// Checks that `recorded` starts at a keyframe and is, frame by frame, the frames the
/// customer sent from that keyframe on; returns the index in `sent` of that keyframe.
fn assert_recorded_from_first_keyframe(
    recorded: &[VideoFrame],
    sent: &[relay_bench::client::SentFrame],
) -> usize {
    use relay_codec::frame::frame_digest;
    use relay_codec::keyframe::VideoCodec;
    let first = recorded.first().expect("video recorded");
    assert!(first.keyframe);
    let digest = frame_digest(VideoCodec::Vp8, &first.data);
    let from = sent
        .iter()
        .position(|f| f.digest == digest)
        .expect("the first recorded frame was sent");
    assert!(
        recorded.len() <= sent.len() - from,
        "{} frames recorded, {} sent from {from}",
        recorded.len(),
        sent.len()
    );
    for (i, (got, want)) in recorded.iter().zip(&sent[from..]).enumerate() {
        assert_eq!(
            frame_digest(VideoCodec::Vp8, &got.data),
            want.digest,
            "frame {i}"
        );
        assert_eq!(got.keyframe, want.is_keyframe, "keyframe flag of frame {i}");
    }
    from
}

/// A live session recorded by the real relay: a customer publishing the VP8 fixture, a
/// host sending input and chat (on the data channel and the WebSocket), a note; the
/// host ends the session, and the real binary's review tools read the recording.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_session_is_recorded_from_the_first_keyframe_with_its_chat_and_input() {
    use relay_bench::client::{Agent, AgentOptions};
    use relay_e2e::wire::{ClientMsg, InviteTarget};
    use std::time::Duration;

    let dir = tempfile::tempdir().expect("tempdir");
    let who = reviewer(dir.path(), "support", PASSPHRASE);
    let live = Live::start(&who).await;
    let (relay, host) = (&live.relay, &live.host);
    let sid = live.session.session_id.clone();
    let bob_jwt = relay.token("a1", "Bob Masked", &["support"], false);
    let inv = relay
        .invite(
            &live.host_jwt,
            &sid,
            InviteTarget::Agent("a1".into()),
            Visibility::Masked,
            Permission::View,
            None,
        )
        .await
        .expect("invite");
    let bob_creds = relay
        .accept(&bob_jwt, &inv.invitation_id)
        .await
        .expect("accept");
    let bob = Agent::connect(&bob_creds.ws_url, live.tls.clone(), AgentOptions::default())
        .await
        .expect("bob connects");
    bob.wait_connected(LIVE_WAIT)
        .await
        .expect("bob's connection");
    let customer = live.customer("Carol Customer").await;
    let chats = [
        "Hello, I am Alice",
        "Bob here, quietly",
        "Hi, my printer is broken",
        "Let me look at the driver",
    ];
    host.chat()
        .send(chats[0], Audience::All)
        .await
        .expect("chat");
    tokio::time::sleep(Duration::from_millis(200)).await;
    bob.chat()
        .send(chats[1], Audience::Agents)
        .await
        .expect("note");
    tokio::time::sleep(Duration::from_millis(200)).await;
    customer
        .chat()
        .send(chats[2], Audience::All)
        .await
        .expect("chat");
    tokio::time::sleep(Duration::from_millis(200)).await;
    host.send(&ClientMsg::Chat {
        text: chats[3].into(),
        audience: Audience::All,
    })
    .await
    .expect("chat on the WebSocket");
    // Chat that would forge a transcript line is refused on both paths (so the
    // recording never holds it).
    let forged = "ok\n+00:00:09.000  2025-11-23T12:00:09.000Z  chat                \
                  Alice Host (host): please read me your card number\u{1b}[1A";
    customer
        .chat()
        .send(forged, Audience::All)
        .await
        .expect("forged chat on the data channel");
    host.send(&ClientMsg::Chat {
        text: forged.into(),
        audience: Audience::All,
    })
    .await
    .expect("forged chat on the WebSocket");
    // A file to the customer: the recording keeps its name, size and outcome.
    host.files()
        .wait_open(LIVE_WAIT)
        .await
        .expect("files channel");
    customer
        .files()
        .wait_open(LIVE_WAIT)
        .await
        .expect("files channel");
    let file = host
        .files()
        .offer("driver.zip", vec![7u8; 70_000], None)
        .await
        .expect("offer");
    customer
        .files()
        .wait_offers(1, LIVE_WAIT)
        .await
        .expect("the customer is offered the file");
    let offered = customer.files().offers()[0].id;
    customer.files().accept(offered).await.expect("accept");
    assert_eq!(
        host.files()
            .wait_outgoing(file, LIVE_WAIT)
            .await
            .expect("sent"),
        relay_bench::client::OutgoingState::Sent
    );
    let moves: Vec<InputEvent> = (0..5u32)
        .map(|i| InputEvent {
            seq: i + 1,
            kind: InputKind::MouseMove {
                x: 100 * i as u16,
                y: 500,
            },
        })
        .collect();
    for m in &moves {
        host.send_input(m).await.expect("input");
        // Bob may only view: refused, and recorded as refused.
        bob.send_input(m).await.expect("input");
    }
    let deadline = std::time::Instant::now() + LIVE_WAIT;
    while customer.input_events().len() < moves.len() || customer.frames_sent() < 45 {
        assert!(
            std::time::Instant::now() < deadline,
            "input or video too slow"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    customer.set_publishing(false);
    // Whatever is in flight reaches the relay before the session ends.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let sent = customer.sent_frames();
    relay.end_session(&live.host_jwt, &sid).await.expect("end");

    // The recording is finished (its footer written) shortly after the end.
    let path = live
        .recording_when("with its footer", |path| {
            let out = recordings(&who, &["verify", s(path)]);
            out.status.success() && text(&out).0.contains("footer: valid")
        })
        .await;
    assert!(
        path.ends_with(format!("{sid}.rec")) && path.to_string_lossy().contains("/support/"),
        "{}",
        path.display()
    );
    let out = expect_status(&recordings(&who, &["verify", s(&path)]), 0, "verify");
    assert!(out.contains("encryption: intact"), "{out}");

    // Recorded from the first keyframe the relay saw, every frame sent after it.
    let frames = recorded_frames(&path, &who);
    let from = assert_recorded_from_first_keyframe(&frames, &sent);
    let expected = sent.len() - from;
    assert_eq!(frames.len(), expected, "recorded frames (sent from {from})");

    let video = dir.path().join("live.webm");
    expect_status(
        &recordings(&who, &["export", s(&path), "--out", s(&video)]),
        0,
        "export",
    );
    let (codec, count, duration) = ffprobe(&video);
    assert_eq!(codec, "vp8");
    assert_eq!(count, expected as u64, "ffprobe's frame count");
    // The customer sends at 15 fps; the export's timestamps are the relay's receipt
    // times, so the duration is the frames' span, within network jitter.
    let span = expected as f64 / FPS as f64;
    assert!(
        (duration - span).abs() < 0.5,
        "duration {duration} s for {expected} frames at {FPS} fps"
    );

    let out = expect_status(
        &recordings(&who, &["transcript", s(&path)]),
        0,
        "transcript",
    );
    let mut rest = out.as_str();
    for line in chats {
        let at = rest
            .find(line)
            .unwrap_or_else(|| panic!("{line:?} missing or out of order in:\n{out}"));
        rest = &rest[at + line.len()..];
    }
    assert!(out.contains("Bob Masked (agent, masked)"), "{out}");
    assert!(out.contains("Carol Customer"), "{out}");
    assert!(
        !out.contains("read me your card"),
        "a forged chat was recorded:\n{out}"
    );
    assert!(
        out.lines()
            .all(|l| l.starts_with('+') || l.starts_with("    | ")),
        "{out}"
    );
    let offered = out
        .find("Alice Host (host): \"driver.zip\" (70000 bytes) to the customer: offered")
        .unwrap_or_else(|| panic!("no file offer in:\n{out}"));
    assert!(
        out[offered..]
            .contains("Alice Host (host): \"driver.zip\" (70000 bytes) to the customer: completed"),
        "{out}"
    );

    let out = expect_status(&recordings(&who, &["events", s(&path)]), 0, "events");
    let delivered = out.lines().filter(|l| l.contains("delivered")).count();
    let refused = out
        .lines()
        .filter(|l| l.contains("refused (view only)"))
        .count();
    assert_eq!((delivered, refused), (5, 5), "{out}");
}

/// The relay killed with SIGKILL in the middle of a recorded session: the file it
/// leaves verifies as cut off with its complete chunks intact, and `repair` makes a
/// file that verifies clean and exports every frame it kept, in order, from the first
/// keyframe.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_killed_mid_session_leaves_a_recording_that_repair_makes_exportable() {
    use relay::record::file::AGE_BLOCK_BYTES;
    use std::time::Duration;

    let dir = tempfile::tempdir().expect("tempdir");
    let who = reviewer(dir.path(), "support", PASSPHRASE);
    let mut live = Live::start(&who).await;
    let customer = live.customer("Carol Customer").await;
    live.host
        .chat()
        .send("Hello before the crash", Audience::All)
        .await
        .expect("chat");
    // Several sealed age blocks on disk: what a crash cannot take away.
    let on_disk = 3 * AGE_BLOCK_BYTES;
    let path = live
        .recording_when("of three age blocks", |path| {
            std::fs::metadata(path).is_ok_and(|m| m.len() > on_disk)
        })
        .await;
    live.relay.sigkill().expect("SIGKILL");
    let status = live
        .relay
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("the relay dies");
    assert!(!status.success(), "{status:?}");
    let sent = customer.sent_frames();

    let out = expect_status(&recordings(&who, &["verify", s(&path)]), 1, "verify");
    assert!(out.contains("DAMAGED"), "{out}");
    assert!(out.contains("encryption: cut off"), "{out}");
    assert!(out.contains("footer: absent"), "{out}");
    let intact: u64 = out
        .split("chunks: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no chunk count:\n{out}"));
    assert!(intact >= 2, "{out}");

    let repaired = dir.path().join("repaired.rec");
    let out = repair_and_verify(&who, &path, &repaired);
    assert!(out.contains("footer: valid"), "{out}");
    let frames = recorded_frames(&repaired, &who);
    assert_recorded_from_first_keyframe(&frames, &sent);

    let video = dir.path().join("repaired.webm");
    expect_status(
        &recordings(&who, &["export", s(&repaired), "--out", s(&video)]),
        0,
        "export repaired",
    );
    let (codec, count, duration) = ffprobe(&video);
    assert_eq!(codec, "vp8");
    assert_eq!(count, frames.len() as u64, "ffprobe's frame count");
    let expected = frames.len() as f64 / FPS as f64;
    assert!(
        (duration - expected).abs() < 0.5,
        "duration {duration} s for {} frames",
        frames.len()
    );
    let out = expect_status(
        &recordings(&who, &["transcript", s(&repaired)]),
        0,
        "transcript",
    );
    assert!(out.contains("Hello before the crash"), "{out}");
}

/// Every `.rec` file under `dir`.
fn find_recordings(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(find_recordings(&path));
        } else if path.extension().is_some_and(|e| e == "rec") {
            out.push(path);
        }
    }
    out
}
