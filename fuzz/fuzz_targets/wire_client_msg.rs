//! `relay_codec::wire`: the signalling entry points for untrusted WebSocket input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_codec::wire;

fuzz_target!(|data: &[u8]| {
    // The default limit, and a small one so that the size check itself is exercised.
    for limit in [wire::DEFAULT_MAX_MESSAGE_BYTES, 64] {
        match wire::parse_client_msg(data, limit) {
            Ok(_) => assert!(data.len() <= limit),
            Err(err) => {
                let _ = err.code().as_str();
            }
        }
    }
    let _ = wire::peek_id(data);
    if let Ok(text) = std::str::from_utf8(data)
        && let Some(key) = wire::normalize_support_key(text)
    {
        assert_eq!(key.len(), 9);
        assert!(key.bytes().all(|b| b.is_ascii_digit()));
    }
});
