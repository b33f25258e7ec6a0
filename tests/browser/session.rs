//! One support session in three browsers: Alice opens it from her console (masked, so
//! the customer never learns of her; she has control as the host) and invites Victor
//! (visible, view only), who accepts in his console; Carol joins on the portal with the
//! key and shares her screen.

use anyhow::{Context, Result, ensure};
use rand::RngCore;
use serde_json::{Value, json};

use super::{ONE_AT_A_TIME, VIDEO_WAIT, save_screenshot, setup, token};

/// The keys Victor's page sends on its own, bypassing its disabled controls: the relay
/// must drop them. `KeyB` as a HID usage.
const KEY_B: u32 = 0x0007_0005;

#[tokio::test]
async fn customer_and_two_agents_in_browsers() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some((relay, chromium)) = setup().await? else {
        return Ok(());
    };
    let (carol, alice, victor) = tokio::try_join!(
        chromium.page("Carol (customer)"),
        chromium.page("Alice (host, masked)"),
        chromium.page("Victor (view only)"),
    )?;

    // --- A wrong key is refused with words a customer understands ------------------
    carol.goto(&relay.endpoint("/")).await?;
    carol.fill("#name", "Carol Customer").await?;
    carol.fill("#key", "000 000 000").await?;
    carol.click("#join-button").await?;
    carol
        .wait_for(
            "document.body.dataset.error === 'wrong_key'",
            "the wrong-key error",
        )
        .await?;
    let said = carol.text("#join-status").await?;
    ensure!(said.contains("no session with this support key"), "{said}");

    // --- Alice opens a masked session from her console ------------------------------
    alice
        .goto(&relay.endpoint(&format!(
            "/agent?token={}",
            token(&relay, "alice", "Alice Host")
        )))
        .await?;
    alice
        .wait_for("document.body.dataset.state === 'home'", "Alice signed in")
        .await?;
    ensure!(
        alice.js("return location.search", vec![]).await? == json!(""),
        "the token stays in the address bar"
    );
    alice.click("#start-masked").await?;
    alice.click("#start-button").await?;
    alice
        .wait_for(
            "document.body.dataset.state === 'session'",
            "Alice's session",
        )
        .await?;
    let key: String = alice.text("#support-key").await?;
    ensure!(
        key.len() == 11 && key.chars().filter(char::is_ascii_digit).count() == 9,
        "support key shown as {key:?}"
    );
    let mailto = alice
        .js("return document.querySelector('#mailto').href", vec![])
        .await?;
    let digits: String = key.split(' ').collect();
    ensure!(
        mailto
            .as_str()
            .is_some_and(|m| m.starts_with("mailto:") && m.contains(&digits[..3])),
        "mailto link {mailto}"
    );

    // --- Victor signs in; Alice invites him (visible, view only); he accepts ---------
    victor
        .goto(&relay.endpoint(&format!(
            "/agent?token={}",
            token(&relay, "victor", "Victor Viewer")
        )))
        .await?;
    victor
        .wait_for("document.body.dataset.state === 'home'", "Victor signed in")
        .await?;
    alice.click("#invite-box summary").await?;
    alice.fill("#invite-target", "victor").await?;
    alice
        .fill("#invite-comment", "watch the printer dialog")
        .await?;
    alice.click("#invite-form button[type=submit]").await?;
    victor
        .wait_for(
            "document.querySelector('#invitations').textContent.includes('watch the printer dialog')",
            "Victor's invitation with Alice's comment",
        )
        .await?;
    victor.click(".accept-invitation").await?;
    victor
        .wait_for(
            "document.body.dataset.state === 'session'",
            "Victor in the session",
        )
        .await?;
    ensure!(
        victor
            .js(
                "return document.querySelector('#control-button').disabled",
                vec![]
            )
            .await?
            == json!(true),
        "a view-only agent is offered control"
    );

    // --- Carol joins with the key and shares her screen ------------------------------
    carol.fill("#key", &key).await?;
    carol.click("#join-button").await?;
    carol
        .wait_for("document.body.dataset.state === 'joined'", "Carol joined")
        .await?;
    carol.click("#share-button").await?;
    carol
        .wait_for("document.body.dataset.state === 'sharing'", "Carol sharing")
        .await?;
    carol
        .wait_for(
            "document.body.dataset.peer === 'connected'",
            "Carol's peer connection",
        )
        .await?;

    // Both agents' Chromium decode her screen.
    for page in [&alice, &victor] {
        page.wait_for_within(
            "Number(document.querySelector('#remote').dataset.framesDecoded) > 30",
            "30 decoded frames of the customer's screen",
            VIDEO_WAIT,
        )
        .await?;
    }

    // Carol is shown Victor, never Alice.
    carol
        .wait_for(
            "document.querySelector('#agents').textContent.includes('Victor Viewer')",
            "Victor in Carol's roster",
        )
        .await?;
    let roster = carol.text("#agents").await?;
    ensure!(
        !roster.contains("Alice"),
        "the masked host is shown to the customer: {roster}"
    );
    let everything = carol.js("return document.body.innerText", vec![]).await?;
    ensure!(
        !everything.as_str().unwrap_or_default().contains("Alice"),
        "the customer's page names the masked host"
    );

    // --- Input: Alice's reaches Carol's page, Victor's never does -------------------
    alice.click("#control-button").await?;
    alice.click("#remote").await?; // a move, a press and a release over the video
    alice.type_into("#remote", "hi").await?;
    carol
        .wait_for(
            "(document.querySelector('#remote-layer').dataset.keys || '').includes('KeyI')",
            "Alice's keys on Carol's page",
        )
        .await?;
    let log = carol.js("return window.__inputLog", vec![]).await?;
    let log = log.as_array().context("input log")?;
    ensure!(
        log.iter().any(|e| e["kind"] == "move")
            && log
                .iter()
                .any(|e| e["kind"] == "button" && e["down"] == true)
            && log
                .iter()
                .any(|e| e["kind"] == "key" && e["code"] == 0x0007_000b),
        "Carol's page got {log:?}"
    );
    // The click landed in the middle of the video: the cursor is drawn near the middle.
    let at = carol
        .js("const d = document.querySelector('#remote-layer').dataset; return [Number(d.x), Number(d.y)]", vec![])
        .await?;
    let near_middle = |v: &Value| v.as_f64().is_some_and(|c| (c - 32767.0).abs() < 6000.0);
    ensure!(near_middle(&at[0]) && near_middle(&at[1]), "cursor at {at}");
    ensure!(
        carol
            .js(
                "return !document.querySelector('#remote-cursor').hidden",
                vec![]
            )
            .await?
            == json!(true),
        "no remote cursor drawn"
    );

    // Victor's page sends input on its own; the relay refuses it.
    let sent = victor
        .js(
            &format!(
                "return window.__console.sendInput({{kind: 'key', code: {KEY_B}, down: true, modifiers: 0}}) \
                 && window.__console.sendInput({{kind: 'move', x: 1, y: 1}})"
            ),
            vec![],
        )
        .await?;
    ensure!(sent == json!(true), "Victor's input channel is not open");
    victor
        .wait_for(
            "Number(document.body.dataset.forbidden) > 0",
            "the relay's `forbidden` to Victor",
        )
        .await?;
    // A later event of Alice's arrives; nothing of Victor's came before it.
    alice.type_into("#remote", "z").await?;
    carol
        .wait_for(
            "(document.querySelector('#remote-layer').dataset.keys || '').includes('KeyZ')",
            "Alice's last key",
        )
        .await?;
    let log = carol.js("return window.__inputLog", vec![]).await?;
    let log = log.as_array().context("input log")?;
    ensure!(
        !log.iter()
            .any(|e| e["code"] == KEY_B || (e["kind"] == "move" && e["x"] == 1 && e["y"] == 1)),
        "the view-only agent's input reached the customer: {log:?}"
    );

    // Alice gives Victor control from her console; his page offers it to him.
    alice.select("#people select.permission", "control").await?;
    victor
        .wait_for(
            "!document.querySelector('#control-button').disabled",
            "control offered to Victor after Alice's change",
        )
        .await?;

    // --- Chat both ways; a note stays among the agents --------------------------------
    carol
        .fill("#chat-text", "Hello, my printer stopped")
        .await?;
    carol.click("#chat-form button").await?;
    for page in [&alice, &victor] {
        page.wait_for(
            "document.querySelector('#chat-log').textContent.includes('Hello, my printer stopped')",
            "the customer's chat",
        )
        .await?;
    }
    alice.click("#chat-note").await?;
    alice.fill("#chat-text", "driver 3.1 breaks it").await?;
    alice.click("#chat-form button").await?;
    alice.click("#chat-note").await?;
    alice
        .fill("#chat-text", "Please open the printer settings")
        .await?;
    alice.click("#chat-form button").await?;
    carol
        .wait_for(
            "document.querySelector('#chat-log').textContent.includes('Please open the printer settings')",
            "the agent's chat",
        )
        .await?;
    victor
        .wait_for(
            "document.querySelector('#chat-log').textContent.includes('driver 3.1 breaks it')",
            "Alice's note",
        )
        .await?;
    let chat = carol.text("#chat-log").await?;
    ensure!(
        !chat.contains("driver 3.1") && !chat.contains("Alice") && chat.contains("Support agent"),
        "Carol's chat: {chat}"
    );

    // --- A file from Alice arrives byte-identical on Carol's page ---------------------
    let mut data = vec![0u8; 300 * 1024 + 123]; // beyond the 256 KiB window
    rand::rng().fill_bytes(&mut data);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("printer-driver.bin");
    std::fs::write(&path, &data)?;
    alice.choose_file("#file-input", &path).await?;
    carol.click(".accept-file").await?;
    carol
        .wait_for("document.querySelector('a.save-file')", "the received file")
        .await?;
    let got = carol
        .js_async(
            "const done = arguments[arguments.length - 1];
             fetch(document.querySelector('a.save-file').href)
               .then(r => r.arrayBuffer())
               .then(b => { let s = ''; for (const x of new Uint8Array(b)) s += String.fromCharCode(x); done(btoa(s)); })
               .catch(e => done('error: ' + e));",
            vec![],
        )
        .await?;
    let got = got.as_str().context("file bytes")?;
    let got = base64_decode(got).with_context(|| format!("file bytes: {:.80}", got))?;
    ensure!(
        got.len() == data.len(),
        "{} bytes arrived of {}",
        got.len(),
        data.len()
    );
    ensure!(got == data, "the received file differs from the sent one");
    let name = carol.text("a.save-file").await?;
    ensure!(name.contains("printer-driver.bin"), "{name}");
    alice
        .wait_for(
            "document.querySelector('#transfers [data-state=done]')",
            "Alice's transfer shown as sent",
        )
        .await?;

    // Nothing went wrong that Carol or Alice were shown.
    for page in [&carol, &alice] {
        let errors = page
            .js(
                "return [...document.querySelectorAll('.status.error:not([hidden])')].map(e => e.textContent)",
                vec![],
            )
            .await?;
        ensure!(errors == json!([]), "errors shown: {errors}");
    }

    // Pictures of both pages for the README (see `save_screenshot`).
    for page in [&carol, &alice] {
        page.js(
            "document.activeElement.blur(); window.scrollTo(0, 0);
             for (const d of document.querySelectorAll('details')) d.open = false;
             for (const s of document.querySelectorAll('.side')) s.scrollTop = 0;",
            vec![],
        )
        .await?;
    }
    save_screenshot("portal.png", &carol.screenshot().await?)?;
    save_screenshot("console.png", &alice.screenshot().await?)?;

    // --- Alice ends the session; both others are told --------------------------------
    alice.click("#end-button").await?;
    for page in [&carol, &victor] {
        page.wait_for(
            "document.body.dataset.endReason === 'ended_by_host'",
            "the session's end",
        )
        .await?;
    }
    let said = carol.text("#session-status").await?;
    ensure!(said.contains("ended the session"), "{said}");

    for page in [carol, alice, victor] {
        page.close().await?;
    }
    Ok(())
}

/// Standard base64 (what `btoa` writes) to bytes.
fn base64_decode(s: &str) -> Result<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = ALPHABET
            .iter()
            .position(|&a| a == c)
            .context("not base64")? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}
