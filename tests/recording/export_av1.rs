//! AV1 recordings exported to WebM: a recording of the AV1 fixture (30 frames, 2 s at
//! 15 fps, keyframes at frames 0 and 15) exported with the real `relay recordings
//! export`, then read back by ffprobe and decoded by ffmpeg, whole and with
//! `--from/--to`.

use std::path::Path;
use std::process::Command;

use super::{PASSPHRASE, build_recording, expect_status, ffprobe, recordings, reviewer, s, text};

/// The MD5 of each decoded picture (`ffmpeg -f framemd5`), in order.
fn decoded_picture_hashes(video: &Path) -> Vec<String> {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(video)
        .args(["-map", "0:v", "-f", "framemd5", "-"])
        .output()
        .unwrap_or_else(|e| panic!("ffmpeg is required for this test: {e}"));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "ffmpeg failed: {stderr}");
    assert!(stderr.trim().is_empty(), "ffmpeg complained: {stderr}");
    stdout
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit(',').next().map(|h| h.trim().to_owned()))
        .collect()
}

/// Packet flags as ffprobe reads them from the container (`K` for a keyframe).
fn keyframe_packets(video: &Path) -> Vec<usize> {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0"])
        .args(["-show_entries", "packet=flags", "-of", "csv=p=0"])
        .arg(video)
        .output()
        .expect("ffprobe");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "ffprobe failed: {stderr}");
    stdout
        .lines()
        .enumerate()
        .filter(|(_, flags)| flags.starts_with('K'))
        .map(|(i, _)| i)
        .collect()
}

/// `ffprobe -show_streams` fields of the video stream.
fn stream_fields(video: &Path) -> serde_json::Value {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-show_streams"])
        .args(["-of", "json"])
        .arg(video)
        .output()
        .expect("ffprobe");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "ffprobe failed: {stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("ffprobe json");
    json["streams"][0].clone()
}

#[test]
fn an_av1_recording_exports_to_webm_that_decodes_like_the_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    let who = reviewer(dir.path(), "support", PASSPHRASE);
    let built = build_recording(dir.path(), "screen-av1.ivf", "sess-av1", &who);
    assert_eq!(built.frames, 30);
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/screen-av1.ivf");
    let source = decoded_picture_hashes(&fixture);
    assert_eq!(source.len(), 30);

    let video = dir.path().join("screen.webm");
    let out = expect_status(
        &recordings(&who, &["export", s(&built.path), "--out", s(&video)]),
        0,
        "export",
    );
    assert!(
        out.contains("video/AV1 640x360, 30 frames (2 keyframes), 2.000s"),
        "{out}"
    );
    let (codec, frames, duration) = ffprobe(&video);
    assert_eq!(codec, "av1");
    assert_eq!(frames, built.frames);
    assert!((duration - 2.0).abs() < 0.01, "duration {duration}");
    let stream = stream_fields(&video);
    assert_eq!(stream["profile"], "Main", "{stream}");
    assert_eq!(stream["level"], 1, "{stream}");
    assert_eq!(
        (&stream["width"], &stream["height"]),
        (&640.into(), &360.into())
    );
    assert_eq!(stream["pix_fmt"], "yuv420p", "{stream}");
    assert_eq!(keyframe_packets(&video), [0, 15]);
    // Every picture as the encoder made it.
    assert_eq!(decoded_picture_hashes(&video), source);

    // From 1.2 s to 1.8 s: from the keyframe at 1.0 s (frame 15) through frame 27
    // (recorded at 1800 ms), 13 frames.
    let part = dir.path().join("part.webm");
    let out = expect_status(
        &recordings(
            &who,
            &[
                "export",
                s(&built.path),
                "--out",
                s(&part),
                "--from",
                "1.2",
                "--to",
                "1.8",
            ],
        ),
        0,
        "export --from --to",
    );
    assert!(out.contains("13 frames (1 keyframes)"), "{out}");
    assert!(out.contains("from +00:00:01.000"), "{out}");
    let (codec, frames, duration) = ffprobe(&part);
    assert_eq!(codec, "av1");
    assert_eq!(frames, 13);
    assert!((duration - 13.0 / 15.0).abs() < 0.01, "duration {duration}");
    assert_eq!(keyframe_packets(&part), [0]);
    assert_eq!(decoded_picture_hashes(&part), source[15..28]);

    // AV1 does not go into MP4.
    let out = recordings(
        &who,
        &[
            "export",
            s(&built.path),
            "--out",
            s(&dir.path().join("x.mp4")),
        ],
    );
    expect_status(&out, 2, "export av1 as mp4");
    assert!(text(&out).1.contains("use .webm"), "{}", text(&out).1);
}
