//! Debian's Chromium driven through chromedriver (W3C WebDriver) with `fantoccini`.
//!
//! [`Chromium::start`] finds `chromium` and `chromedriver` (`$PATH`, or `CHROMIUM` /
//! `CHROMEDRIVER`) and starts chromedriver on a free loopback port, in a process group of
//! its own; the group (chromedriver and every Chromium it started) is killed on drop.
//! Each [`Page`] is a browser of its own (a WebDriver session: its own Chromium
//! process), so no page is ever a background tab whose timers and video Chromium
//! throttles. When the browser is missing, [`Chromium::start`] returns `None` after
//! printing a loud SKIPPED line, except under CI (`CI` set), where that is an error.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// Default wait for something a page should show.
pub const PAGE_WAIT: Duration = Duration::from_secs(20);

/// The flags every page's Chromium runs with: headless, no GPU, fake capture devices
/// that need no prompt (`getDisplayMedia` gets Chromium's fake screen), and a
/// laptop-sized window. `--allow-loopback-in-peer-connection` lets Chromium gather a
/// loopback candidate, so the tests also pass on a machine whose only network is
/// loopback; otherwise Chromium behaves as a person's browser does: host addresses
/// hidden behind mDNS names, which the pages do not send (the relay learns the
/// browser's address from its connectivity checks).
const CHROMIUM_ARGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--auto-select-desktop-capture-source=Entire screen",
    "--allow-loopback-in-peer-connection",
    "--autoplay-policy=no-user-gesture-required",
    "--window-size=1280,800",
    "--no-first-run",
    "--no-default-browser-check",
];

fn find_program(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

/// A running chromedriver.
pub struct Chromium {
    driver: Child,
    url: String,
    binary: PathBuf,
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // chromedriver runs in a process group of its own, with every Chromium it
        // started: kill the whole group, so that a test that failed before closing its
        // pages leaves no browser behind to starve the next tests of CPU.
        if let Some(group) = rustix::process::Pid::from_raw(self.driver.id() as i32) {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Chromium {
    /// Starts chromedriver, or returns `None` (having said so loudly) when Chromium or
    /// chromedriver is not installed and `CI` is not set.
    pub async fn start() -> Result<Option<Chromium>> {
        let binary = find_program(
            "CHROMIUM",
            &["chromium", "chromium-browser", "google-chrome"],
        );
        let driver = find_program("CHROMEDRIVER", &["chromedriver"]);
        let (Some(binary), Some(driver)) = (binary, driver) else {
            let what = "Chromium and chromedriver (`apt-get install chromium chromium-driver`)";
            if std::env::var_os("CI").is_some() {
                bail!("the browser tests need {what}, and CI is set: they must run");
            }
            eprintln!(
                "\n==========================================================================\n\
                 SKIPPED: browser tests: {what} not found.\n\
                 Install them to run these tests; under CI (CI set) they fail instead.\n\
                 ==========================================================================\n"
            );
            return Ok(None);
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(&driver)
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", driver.display()))?;
        let chromium = Chromium {
            driver: child,
            url: format!("http://127.0.0.1:{port}"),
            binary,
        };
        let started = Instant::now();
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!("chromedriver did not listen on port {port} within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Some(chromium))
    }

    /// A new browser (its own Chromium process) with a blank page.
    pub async fn page(&self, label: &str) -> Result<Page> {
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert("acceptInsecureCerts".into(), json!(true));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": self.binary, "args": CHROMIUM_ARGS }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&self.url)
            .await
            .map_err(|e| anyhow!("{label}: starting Chromium through chromedriver: {e}"))?;
        Ok(Page {
            client,
            label: label.to_owned(),
        })
    }
}

/// One browser page.
pub struct Page {
    client: Client,
    label: String,
}

impl Page {
    /// Opens `url`.
    pub async fn goto(&self, url: &str) -> Result<()> {
        self.client
            .goto(url)
            .await
            .with_context(|| format!("{}: opening {url}", self.label))
    }

    /// Clicks the element `css`.
    pub async fn click(&self, css: &str) -> Result<()> {
        let el = self.find(css).await?;
        el.click()
            .await
            .with_context(|| format!("{}: clicking {css}", self.label))
    }

    /// Types `text` into the element `css` (after clearing it, for form fields).
    pub async fn fill(&self, css: &str, text: &str) -> Result<()> {
        let el = self.find(css).await?;
        let _ = el.clear().await;
        el.send_keys(text)
            .await
            .with_context(|| format!("{}: typing into {css}", self.label))
    }

    /// Types `text` into the element `css` as it is (focus and key events only).
    pub async fn type_into(&self, css: &str, text: &str) -> Result<()> {
        let el = self.find(css).await?;
        el.send_keys(text)
            .await
            .with_context(|| format!("{}: typing into {css}", self.label))
    }

    /// Picks the option with `value` in the select element `css`.
    pub async fn select(&self, css: &str, value: &str) -> Result<()> {
        let el = self.find(css).await?;
        el.select_by_value(value)
            .await
            .with_context(|| format!("{}: choosing {value} in {css}", self.label))
    }

    /// Hands a local file to the file input `css`.
    pub async fn choose_file(&self, css: &str, path: &Path) -> Result<()> {
        let el = self.find(css).await?;
        let path = path.to_str().context("file path is not UTF-8")?;
        el.send_keys(path)
            .await
            .with_context(|| format!("{}: choosing a file in {css}", self.label))
    }

    async fn find(&self, css: &str) -> Result<fantoccini::elements::Element> {
        self.client
            .wait()
            .at_most(PAGE_WAIT)
            .for_element(Locator::Css(css))
            .await
            .with_context(|| format!("{}: no element {css}", self.label))
    }

    /// The text of the element `css`.
    pub async fn text(&self, css: &str) -> Result<String> {
        let el = self.find(css).await?;
        Ok(el.text().await?)
    }

    /// Runs `script` (a function body; `arguments` are `args`) and returns its value.
    pub async fn js(&self, script: &str, args: Vec<Value>) -> Result<Value> {
        self.client
            .execute(script, args)
            .await
            .with_context(|| format!("{}: running {script:?}", self.label))
    }

    /// Runs an async script: it finishes by calling `arguments[arguments.length - 1]`.
    pub async fn js_async(&self, script: &str, args: Vec<Value>) -> Result<Value> {
        self.client
            .execute_async(script, args)
            .await
            .with_context(|| format!("{}: running {script:?}", self.label))
    }

    /// Waits until `expr` (a JavaScript expression) is truthy, and returns its value.
    pub async fn wait_for(&self, expr: &str, what: &str) -> Result<Value> {
        self.wait_for_within(expr, what, PAGE_WAIT).await
    }

    /// [`Self::wait_for`] with its own timeout.
    pub async fn wait_for_within(&self, expr: &str, what: &str, limit: Duration) -> Result<Value> {
        let script = format!("try {{ return ({expr}); }} catch (e) {{ return null; }}");
        let started = Instant::now();
        loop {
            let v = self.js(&script, vec![]).await?;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return Ok(v);
            }
            if started.elapsed() > limit {
                let status = self
                    .js(
                        "return [...document.querySelectorAll('.status')].map(s => s.textContent).join(' | ') \
                         + ' | state=' + document.body.dataset.state + ' peer=' + document.body.dataset.peer",
                        vec![],
                    )
                    .await
                    .unwrap_or_default();
                bail!(
                    "{}: waited {limit:?} for {what} ({expr}); page says: {status}",
                    self.label
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Result<Vec<u8>> {
        Ok(self.client.screenshot().await?)
    }

    /// Closes the browser.
    pub async fn close(self) -> Result<()> {
        Ok(self.client.close().await?)
    }
}
