//! `relay_codec::input`: decode and validate agree, and whatever decodes re-encodes to
//! the same bytes (the encoding is canonical).
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_codec::input;

fuzz_target!(|data: &[u8]| {
    let decoded = input::decode(data);
    assert_eq!(
        input::validate(data),
        decoded.as_ref().map(drop).map_err(Clone::clone)
    );
    if let Ok(event) = decoded {
        assert!(data.len() <= input::MAX_EVENT_BYTES);
        assert_eq!(
            input::encode_to_vec(&event).expect("decoded events encode"),
            data
        );
    }
});
