//! The customer portal while the node's support-key budget is spent: it does the proof
//! of work the relay asks for (`challenge_required`) by itself and joins; its solver
//! (`relay/web/js/work.js`) agrees with the relay's puzzle on the documented vector.

use anyhow::{Result, ensure};
use relay_codec::wire::{ErrorCode, Visibility};
use relay_e2e::{ExpectRefusal, RelayBuilder};
use serde_json::json;

use super::driver::Chromium;
use super::{ONE_AT_A_TIME, PORTAL, token};

#[tokio::test]
async fn the_portal_solves_the_challenge_of_a_spent_key_budget_and_joins() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(chromium) = Chromium::start().await? else {
        return Ok(());
    };
    let relay = RelayBuilder::new()
        .key_failures_node(5)
        .extra_toml("[limits]\nkey_challenge_bits = 14\nkey_challenge_max_bits = 16\n")
        .start()
        .await?;
    let alice = token(&relay, "alice", "Alice");
    let s = relay
        .create_session(&alice, PORTAL, Visibility::Visible)
        .await?;
    let attacker = relay.client_from("127.0.0.9".parse()?)?;
    for wrong in [
        "000000001",
        "000000002",
        "000000003",
        "000000004",
        "000000005",
    ] {
        let _ = relay.join_from(&attacker, "Mallory", wrong).await;
    }
    relay
        .join_from(&attacker, "Mallory", "000000006")
        .await
        .refused(429, ErrorCode::ChallengeRequired)?;

    let carol = chromium.page("Carol (customer)").await?;
    carol.goto(&relay.endpoint("/")).await?;
    // The page's solver finds the documented first solution.
    let nonce = carol
        .js_async(
            "const done = arguments[arguments.length - 1];
             import('/web/js/work.js')
               .then((w) => w.solveChallenge(arguments[0], 18))
               .then(done, (e) => done('error: ' + e));",
            vec![json!(
                "v1.18.120000.00112233445566778899aabbccddeeff.0123456789abcdef0123456789abcdef"
            )],
        )
        .await?;
    ensure!(nonce == json!("568552"), "the page's solver says {nonce}");

    carol.fill("#name", "Carol Customer").await?;
    carol.fill("#key", &s.support_key).await?;
    carol.click("#join-button").await?;
    carol
        .wait_for("document.body.dataset.state === 'joined'", "Carol joined")
        .await?;
    ensure!(
        relay
            .metric("relay_support_key_attempts_total{outcome=\"challenged\"}")
            .await?
            .is_some_and(|n| n >= 2.0),
        "the page was asked for work (and the attacker)"
    );
    carol.close().await?;
    Ok(())
}
