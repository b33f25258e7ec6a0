//! The retention purge: recordings older than `recording.retention` are deleted.
//!
//! Recordings live in `<dir>/<portal>/<yyyy-mm-dd>/<session>.rec` (the UTC day of
//! their start, [`super::file::recording_path`]). A file is purged when BOTH hold:
//!
//! - its day folder ended more than `retention` ago (the session started before that
//!   day's end, so it is at least that old), and
//! - the file was last written more than `retention` ago (a session still being
//!   recorded, or one that ran for days, keeps its file).
//!
//! Only `.rec` files in folders laid out this way are considered: anything else under
//! the folder (a day folder that is not a date, another extension, a symbolic link) is
//! left alone, never deleted. Empty day and portal folders are removed afterwards.
//! [`expired`] is the pure decision; [`purge`] walks the folder; [`spawn`] runs it at
//! start-up and every [`PURGE_INTERVAL`] on a blocking thread, with metrics.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::file::RECORDING_EXTENSION;
use crate::metrics::Metrics;

/// How often the purge runs (and once at start-up).
pub const PURGE_INTERVAL: Duration = Duration::from_secs(3600);

const DAY: Duration = Duration::from_secs(86_400);

/// Whether a recording in the day folder `day` (days since 1970-01-01, UTC), last
/// modified at `modified`, is older than `retention` at `now`.
pub fn expired(day: u64, modified: SystemTime, now: SystemTime, retention: Duration) -> bool {
    let day_end = UNIX_EPOCH + DAY * u32::try_from(day.saturating_add(1)).unwrap_or(u32::MAX);
    let old = |t: SystemTime| t.checked_add(retention).is_some_and(|limit| limit <= now);
    old(day_end) && old(modified)
}

/// The day number of a `yyyy-mm-dd` folder name, or `None` for anything else.
pub fn parse_day(name: &str) -> Option<u64> {
    let b = name.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let num = |s: &str| -> Option<u32> {
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())
            .flatten()
    };
    let (year, month, day) = (num(&name[..4])?, num(&name[5..7])?, num(&name[8..])?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || year < 1970 {
        return None;
    }
    // Hinnant's days_from_civil, the inverse of `civil_date`.
    let y = i64::from(year) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (i64::from(month) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    // 2026-02-31 and the like: only dates that round-trip.
    (super::file::civil_date(days) == (i64::from(year), month, day)).then_some(days)
}

/// What one purge did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PurgeReport {
    /// Recordings deleted.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Files or folders that could not be read or deleted (logged).
    pub errors: u64,
}

/// Deletes the recordings under `dir` that are older than `retention` at `now` (see
/// the module doc), then the day and portal folders left empty. A missing `dir` is
/// nothing to purge.
pub fn purge(dir: &Path, now: SystemTime, retention: Duration) -> PurgeReport {
    let mut report = PurgeReport::default();
    let fail = |what: &Path, e: std::io::Error, report: &mut PurgeReport| {
        tracing::warn!(path = %what.display(), error = %e, "recording retention purge");
        report.errors += 1;
    };
    let portals = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return report,
        Err(e) => {
            fail(dir, e, &mut report);
            return report;
        }
    };
    for portal in portals.flatten() {
        if !portal.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let portal = portal.path();
        let days = match std::fs::read_dir(&portal) {
            Ok(days) => days,
            Err(e) => {
                fail(&portal, e, &mut report);
                continue;
            }
        };
        for day_dir in days.flatten() {
            let Some(day) = day_dir.file_name().to_str().and_then(parse_day) else {
                continue;
            };
            if !day_dir.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let day_dir = day_dir.path();
            let files = match std::fs::read_dir(&day_dir) {
                Ok(files) => files,
                Err(e) => {
                    fail(&day_dir, e, &mut report);
                    continue;
                }
            };
            for file in files.flatten() {
                let path = file.path();
                if path.extension().is_none_or(|e| e != RECORDING_EXTENSION) {
                    continue;
                }
                // `DirEntry::metadata` does not follow symbolic links: a link is left.
                let Ok(meta) = file.metadata() else { continue };
                if !meta.is_file() {
                    continue;
                }
                let modified = meta.modified().unwrap_or(now);
                if !expired(day, modified, now, retention) {
                    continue;
                }
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        report.files += 1;
                        report.bytes += meta.len();
                    }
                    Err(e) => fail(&path, e, &mut report),
                }
            }
            // Fails (and stays) unless empty.
            let _ = std::fs::remove_dir(&day_dir);
        }
        let _ = std::fs::remove_dir(&portal);
    }
    report
}

/// Runs [`purge`] of `dir` now and every [`PURGE_INTERVAL`], off the async threads,
/// counting into `relay_recordings_purged_total` and
/// `relay_recording_purge_errors_total`.
pub fn spawn(dir: PathBuf, retention: Duration, metrics: Arc<Metrics>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(PURGE_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let dir = dir.clone();
            let done =
                tokio::task::spawn_blocking(move || purge(&dir, SystemTime::now(), retention))
                    .await;
            let Ok(report) = done else { continue };
            metrics.recordings_purged_total.inc_by(report.files);
            metrics.recording_purge_errors_total.inc_by(report.errors);
            if report.files > 0 || report.errors > 0 {
                tracing::info!(
                    files = report.files,
                    bytes = report.bytes,
                    errors = report.errors,
                    retention = %humantime::format_duration(retention),
                    "recording retention purge"
                );
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::file::{civil_date, recording_path};

    const HOUR: Duration = Duration::from_secs(3600);

    fn at(unix_s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(unix_s)
    }

    #[test]
    fn day_folder_names_round_trip_with_the_writers_dates() {
        for days in [0, 59, 365, 10_957, 20_000, 20_415, 30_000] {
            let (y, m, d) = civil_date(days);
            assert_eq!(parse_day(&format!("{y:04}-{m:02}-{d:02}")), Some(days));
        }
        for bad in [
            "2026-02-30",
            "2026-13-01",
            "2026-00-10",
            "1969-12-31",
            "2026-1-01",
            "2026_11_23",
            "+026-11-23",
            "latest",
            "",
        ] {
            assert_eq!(parse_day(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_recording_expires_when_both_its_day_and_its_last_write_are_older() {
        let retention = 30 * DAY;
        let day = 20_000;
        let day_end = (day + 1) * 86_400;
        let written = at(day_end - 3600);
        let limit = day_end + retention.as_secs();
        assert!(!expired(day, written, at(limit - 1), retention));
        assert!(expired(day, written, at(limit), retention));
        // Written to until long after its day (a session of several days): kept.
        let late = at(day_end + 5 * 86_400);
        assert!(!expired(day, late, at(limit), retention));
        assert!(expired(day, late, at(limit + 5 * 86_400), retention));
        // A clock far in the past or future never panics.
        assert!(!expired(day, written, UNIX_EPOCH, retention));
        assert!(!expired(u64::MAX, written, at(limit), retention));
        assert!(!expired(day, written, at(limit), Duration::MAX));
    }

    fn write(path: &Path, bytes: usize, modified: SystemTime) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        let file = std::fs::File::create(path).expect("create");
        file.set_len(bytes as u64).expect("size");
        file.set_modified(modified).expect("mtime");
    }

    #[test]
    fn purge_deletes_old_recordings_and_empty_folders_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let retention = 2 * HOUR;
        let now = at(20_010 * 86_400 + 12 * 3600);
        let old_ms = 20_000 * 86_400 * 1000 + 1000;
        let today_ms = 20_010 * 86_400 * 1000;
        let old = recording_path(root, "support", old_ms, "s-old");
        let old_other = recording_path(root, "billing", old_ms, "s-old2");
        let fresh = recording_path(root, "support", today_ms, "s-today");
        // Started long ago, still written to an hour ago: kept.
        let long = recording_path(root, "support", old_ms, "s-long");
        write(&old, 1000, at(20_000 * 86_400 + 3600));
        write(&old_other, 500, at(20_000 * 86_400 + 3600));
        write(&fresh, 100, now - HOUR);
        write(&long, 100, now - HOUR);
        // Not recordings, or not in a day folder: never touched.
        let note = old.with_file_name("notes.txt");
        write(&note, 10, at(0));
        let stray = root.join("support").join("archive").join("x.rec");
        write(&stray, 10, at(0));
        let loose = root.join("loose.rec");
        write(&loose, 10, at(0));

        let report = purge(root, now, retention);
        assert_eq!(
            report,
            PurgeReport {
                files: 2,
                bytes: 1500,
                errors: 0
            }
        );
        assert!(!old.exists() && !old_other.exists());
        for kept in [&fresh, &long, &note, &stray, &loose] {
            assert!(kept.exists(), "{} deleted", kept.display());
        }
        // billing's day folder and the portal folder went with their last file;
        // support's old day folder still holds the long session and the note.
        assert!(!root.join("billing").exists());
        assert!(old.parent().expect("day").exists());

        // Again later: the long session's file is old too now; the note stays.
        let report = purge(root, now + 2 * DAY, retention);
        assert_eq!(report.files, 2, "{report:?}");
        assert!(!long.exists() && !fresh.exists() && note.exists());
    }

    #[test]
    fn a_missing_folder_is_nothing_to_purge() {
        let dir = tempfile::tempdir().expect("tempdir");
        let report = purge(&dir.path().join("none"), SystemTime::now(), HOUR);
        assert_eq!(report, PurgeReport::default());
    }
}
