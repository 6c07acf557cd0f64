//! What a worker process writes to its socket, split into frames exactly as the runner does
//! (a 4-byte length prefix, capped) and decoded. A worker runs user code and may write
//! anything; the decoder must answer every frame with a message or an error, never a panic.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::{Decoder, LengthDelimitedCodec};

fuzz_target!(|data: &[u8]| {
    let mut codec = LengthDelimitedCodec::builder()
        .max_frame_length(1 << 20)
        .new_codec();
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        let _ = agentry_runner::protocol::decode(frame.freeze());
    }
    // A frame body on its own, without the prefix.
    let _ = agentry_runner::protocol::decode(bytes::Bytes::copy_from_slice(data));
});
