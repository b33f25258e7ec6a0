//! Browser end-to-end tests: the customer portal and the agent console the relay serves,
//! in Debian's headless Chromium driven through chromedriver, against the real `relay`
//! binary on loopback. Each test asserts what a person at one of the pages would
//! notice: the customer's screen playing in the agents' `<video>` (Chromium's own
//! decoder counts the frames), who the customer is shown, input that arrives or never
//! does, chat and files.
//!
//! Chromium missing (or, for the cluster test, `redis-server`): every test prints a loud
//! SKIPPED line and passes, unless `CI` is set, where it fails. The tests take a lock so that only one of them drives browsers
//! at a time (each page is a Chromium process; two cores do not run two sessions' worth
//! of video encoders and decoders at once without starving them).

use std::time::Duration;

use anyhow::Result;
use relay_e2e::{Relay, RelayBuilder};

/// Chromium and chromedriver.
#[path = "browser/driver.rs"]
mod driver;

/// A customer page and two agent pages (one masked host, one view-only) in one session,
/// with an agent resume, a reload, masking, a supervisor and a used key on the way.
#[path = "browser/session.rs"]
mod session;

/// The native clients of `relay-bench` with the browser ones, both ways.
#[path = "browser/interop.rs"]
mod interop;

/// The pages in a cluster: moved to the node of their session, resumed through the node
/// first reached, told when the session was lost with its node.
#[path = "browser/cluster.rs"]
mod cluster;

/// The portal while the node's support-key budget is spent: it does the proof of work.
#[path = "browser/key_budget.rs"]
mod key_budget;

use driver::Chromium;

/// The portal the tests' agents work in.
const PORTAL: &str = "support";

/// How long a page may take to show decoded video.
const VIDEO_WAIT: Duration = Duration::from_secs(30);

/// Serialises the tests of this target (see the crate docs).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A relay and a chromedriver for one test, or `None` when the browser is missing
/// outside CI (the test then passes after the SKIPPED line).
async fn setup() -> Result<Option<(Relay, Chromium)>> {
    let Some(chromium) = Chromium::start().await? else {
        return Ok(None);
    };
    let relay = RelayBuilder::new().start().await?;
    Ok(Some((relay, chromium)))
}

/// The session WebSocket's `?token=` agent token of `agent` in [`PORTAL`].
fn token(relay: &Relay, agent: &str, name: &str) -> String {
    relay.token(agent, name, &[PORTAL], false)
}

/// Where the screenshots of the pages go: `docs/screenshots/` when
/// `RELAY_E2E_SCREENSHOTS=1` (how the README's pictures are made), else nowhere.
fn save_screenshot(name: &str, png: &[u8]) -> Result<()> {
    if std::env::var_os("RELAY_E2E_SCREENSHOTS").is_none() {
        return Ok(());
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/screenshots");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(name), png)?;
    Ok(())
}
