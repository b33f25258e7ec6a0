//! `relay_codec::files`: the file-transfer data-channel messages. Whatever decodes
//! re-encodes to the same bytes (the encoding is canonical).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use relay_codec::files;

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    if let Ok(msg) = files::decode(&bytes) {
        let encoded = files::encode_to_bytes(&msg).expect("decoded messages encode");
        assert_eq!(&encoded[..], data);
    }
});
