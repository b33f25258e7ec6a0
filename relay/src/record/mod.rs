//! Session recordings: who may read them ([`keys`]: review keys, one per portal).
//!
//! Recordings are encrypted, as they are written, to the public review key of the
//! session's portal; only the holder of the portal's passphrase-protected identity
//! file can read them. The container itself is `relay_codec::recording`.
//!
//! Live recording: [`recorder`] is the sans-IO core (RTP to frames, records to
//! chunks); [`live`] its IO shell (a writer thread per recording, the bounded queue the
//! media path feeds, metrics). [`retention`] deletes recordings older than
//! `recording.retention`.

pub mod av1;
pub mod bitstream;
pub mod export;
pub mod file;
pub mod keys;
pub mod live;
pub mod recorder;
pub mod retention;
pub mod review;
