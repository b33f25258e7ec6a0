//! One support session in three browsers: Alice opens it from her console (masked, so
//! the customer never learns of her; she has control as the host) and invites Victor
//! (visible, view only), who accepts in his console; Carol joins on the portal with the
//! key and shares her screen. Along the way: Alice's console drops and resumes on a new
//! peer connection, Victor is masked and reloads his console back into the session, and
//! Victor's browser then serves Sue, a supervisor who monitors silently, and a second
//! customer whose key was already used.

use anyhow::{Context, Result, ensure};
use rand::RngCore;
use serde_json::{Value, json};

use super::{ONE_AT_A_TIME, PORTAL, VIDEO_WAIT, save_screenshot, setup, token};

/// The keys Victor's page sends on its own, bypassing its disabled controls: the relay
/// must drop them. `KeyB` as a HID usage.
const KEY_B: u32 = 0x0007_0005;

/// The key Victor sends once he has control, after reloading his console (`KeyC`).
const KEY_C: u32 = 0x0007_0006;

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

    // Alice's Ctrl+Alt+Del button reaches Carol's input layer.
    alice.click("#cad-button").await?;
    carol
        .wait_for(
            "window.__inputLog.some(e => e.kind === 'cad') \
             && document.querySelector('#input-log').textContent.includes('Ctrl+Alt+Del')",
            "Alice's Ctrl+Alt+Del on Carol's page",
        )
        .await?;

    // --- Alice's console loses its connection and comes back -------------------------
    // A new WebSocket with her resume token and a new peer connection: her video plays
    // again and her input reaches Carol again.
    alice
        .js("window.__dropConnection(); return true", vec![])
        .await?;
    alice
        .wait_for(
            "window.__resumes === 1 && document.body.dataset.state === 'session'",
            "Alice's console resumed",
        )
        .await?;
    alice
        .wait_for_within(
            "window.__console.decoded() > 30 && window.__console.inputOpen()",
            "30 decoded frames and the input channel on Alice's new peer connection",
            VIDEO_WAIT,
        )
        .await?;
    ensure!(
        alice
            .js(
                "return document.querySelector('#control-button').getAttribute('aria-pressed')",
                vec![]
            )
            .await?
            == json!("true"),
        "Alice lost control across the resume"
    );
    alice.type_into("#remote", "q").await?;
    carol
        .wait_for(
            "(document.querySelector('#remote-layer').dataset.keys || '').includes('KeyQ')",
            "Alice's key after her resume on Carol's page",
        )
        .await?;
    // The relay replaced her old peer connection and its channels, not added to them.
    for (metric, want) in [
        ("relay_peer_connections_active", 3.0),
        ("relay_data_channels_open{label=\"chat\"}", 3.0),
        ("relay_data_channels_open{label=\"files\"}", 3.0),
    ] {
        let got = relay.metric(metric).await?;
        ensure!(
            got == Some(want),
            "{metric} is {got:?} after Alice's resume"
        );
    }

    // --- A network change: Carol's page and Alice's console restart ICE ----------------
    // (what they do by themselves when their path drops) on their peer connections, over
    // the same WebSockets: the relay answers on the same peer connections, replacing
    // none; Alice's video keeps decoding and her input keeps reaching Carol.
    let negotiations = |outcome: &'static str| {
        let relay = &relay;
        async move {
            let q = format!("relay_negotiations_total{{outcome=\"{outcome}\"}}");
            Ok::<_, anyhow::Error>(relay.metric(&q).await?.unwrap_or(0.0))
        }
    };
    let replaced = negotiations("replaced").await?;
    let restarts = negotiations("ice_restart").await?;
    let mut ufrags = Vec::new();
    for (page, conn) in [
        (&carol, "window.__connection()"),
        (&alice, "window.__console.connection()"),
    ] {
        let ufrag = ice_ufrag(page, conn).await?;
        ensure!(!ufrag.is_empty(), "no ICE transport on the page");
        ensure!(
            page.js("return window.__restartIce()", vec![]).await? == json!(true),
            "the page did not start an ICE restart"
        );
        ufrags.push((page, conn, ufrag));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while negotiations("ice_restart").await? < restarts + 2.0 {
        ensure!(
            std::time::Instant::now() < deadline,
            "the relay counted {} ICE restarts of 2",
            negotiations("ice_restart").await? - restarts
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    ensure!(
        negotiations("replaced").await? == replaced,
        "an ICE restart replaced a peer connection"
    );
    // Chromium's ICE transport runs on the new credentials, connected.
    for (page, conn, before) in ufrags {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let now = ice_ufrag(page, conn).await?;
            if !now.is_empty() && now != before {
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "the ICE transport still uses {before:?} (now {now:?})"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    let decoded = alice
        .js("return window.__console.decoded()", vec![])
        .await?
        .as_f64()
        .unwrap_or(0.0);
    alice
        .wait_for_within(
            &format!(
                "window.__console.decoded() > {} && document.body.dataset.peer === 'connected'",
                decoded + 15.0
            ),
            "Alice's video decoding on after the ICE restarts",
            VIDEO_WAIT,
        )
        .await?;
    alice.type_into("#remote", "w").await?;
    carol
        .wait_for(
            "(document.querySelector('#remote-layer').dataset.keys || '').includes('KeyW') \
             && document.body.dataset.peer === 'connected'",
            "Alice's key on Carol's page after the ICE restarts",
        )
        .await?;

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

    // --- Alice masks Victor: Carol's page stops listing him ----------------------------
    alice
        .click("#people li[data-role=agent] button.link")
        .await?;
    carol
        .wait_for(
            "!document.querySelector('#agents').textContent.includes('Victor')",
            "Victor gone from Carol's roster once masked",
        )
        .await?;
    victor
        .wait_for(
            "document.querySelector('#people li[data-role=agent]').textContent.includes('masked')",
            "Victor's console showing him masked",
        )
        .await?;

    // --- Victor reloads his console: it comes back into the session ------------------
    // (the resume token kept in the tab), with the chat so far, video, and his input,
    // now that he has control, reaching Carol.
    victor.js("location.reload(); return true", vec![]).await?;
    victor
        .wait_for(
            "window.__resumes === 1 && document.body.dataset.state === 'session'",
            "Victor's console back in the session after a reload",
        )
        .await?;
    victor
        .wait_for_within(
            "window.__console.decoded() > 10",
            "decoded frames after Victor's reload",
            VIDEO_WAIT,
        )
        .await?;
    let chat = victor.text("#chat-log").await?;
    ensure!(
        chat.contains("Hello, my printer stopped") && chat.contains("driver 3.1 breaks it"),
        "Victor's chat after the reload: {chat}"
    );
    victor
        .wait_for(
            &format!(
                "window.__console.sendInput({{kind: 'key', code: {KEY_C}, down: true, modifiers: 0}})"
            ),
            "Victor's input channel open after the reload",
        )
        .await?;
    carol
        .wait_for(
            "(document.querySelector('#remote-layer').dataset.keys || '').includes('KeyC')",
            "Victor's key after his reload on Carol's page",
        )
        .await?;

    // --- A supervisor (in Victor's browser) sees the live session, monitors silently ----
    let sue = victor;
    sue.goto(&relay.endpoint(&format!(
        "/agent?token={}",
        relay.token("sue", "Sue Supervisor", &[PORTAL], true)
    )))
    .await?;
    sue.wait_for(
        "document.body.dataset.state === 'home' \
         && document.querySelector('#live-sessions').textContent.includes('Alice Host')",
        "the live-session list on Sue's console",
    )
    .await?;
    let row = sue.text("#live-sessions").await?;
    ensure!(row.contains("Carol Customer"), "live sessions: {row}");
    sue.click("#live-sessions button.monitor").await?;
    sue.wait_for(
        "document.body.dataset.state === 'session' && document.body.dataset.role === 'supervisor'",
        "Sue monitoring",
    )
    .await?;
    sue.wait_for_within(
        "window.__console.decoded() > 10",
        "decoded frames on Sue's console",
        VIDEO_WAIT,
    )
    .await?;
    let seen = sue.text("#people").await?;
    ensure!(
        seen.contains("Alice Host") && seen.contains("Carol Customer"),
        "Sue sees {seen}"
    );
    for (page, name) in [(&carol, "Carol"), (&alice, "Alice")] {
        let text = page.js("return document.body.innerText", vec![]).await?;
        ensure!(
            !text.as_str().unwrap_or_default().contains("Sue"),
            "{name}'s page shows the supervisor"
        );
    }

    // --- The used key on the portal: the answer of any wrong key (a guesser learns
    // nothing), in words a customer understands --------------------------------------
    sue.goto(&relay.endpoint("/")).await?;
    sue.fill("#name", "Mallory").await?;
    sue.fill("#key", &key).await?;
    sue.click("#join-button").await?;
    sue.wait_for(
        "document.body.dataset.error === 'wrong_key'",
        "the wrong-key error",
    )
    .await?;
    let said = sue.text("#join-status").await?;
    ensure!(said.contains("Check the nine digits"), "{said}");

    // --- Alice ends the session; Carol is told -----------------------------------------
    alice.click("#end-button").await?;
    carol
        .wait_for(
            "document.body.dataset.endReason === 'ended_by_host'",
            "the session's end",
        )
        .await?;
    let said = carol.text("#session-status").await?;
    ensure!(said.contains("ended the session"), "{said}");

    for page in [carol, alice, sue] {
        page.close().await?;
    }
    Ok(())
}

/// The local ICE username fragment of the connected ICE transport of the page's peer
/// connection (`conn`: the JavaScript expression of its `SessionConnection`), or "".
async fn ice_ufrag(page: &super::driver::Page, conn: &str) -> Result<String> {
    let v = page
        .js_async(
            &format!(
                "const done = arguments[arguments.length - 1];
                 {conn}.pc.getStats().then((stats) => {{
                   let u = '';
                   stats.forEach((s) => {{
                     if (s.type === 'transport' && s.iceState === 'connected') u = s.iceLocalUsernameFragment || '';
                   }});
                   done(u);
                 }}).catch(() => done(''));"
            ),
            vec![],
        )
        .await?;
    Ok(v.as_str().unwrap_or_default().to_owned())
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
