//! Feeds arbitrary bytes, as a client would send them, into a server-side WebSocket (the
//! frame parser, with the message limits the exec/attach endpoints use) and the channel
//! multiplexer on top of it (`ws_channels`: channel numbers, base64, v5 close signals), in
//! each of the four framings. Everything the client sends must end in data on a channel, a
//! Close, or the end of the connection: no panic, no hang, memory bounded by the limits.
#![no_main]

#[allow(dead_code, unreachable_pub)]
#[path = "../../src/ws_channels.rs"]
mod ws_channels;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use ws_channels::{Encoding, Framing, Mux};

/// The exec/attach endpoints' limit on a client message and frame.
const MAX_MESSAGE: usize = 1024 * 1024;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let framing = Framing {
        encoding: if mode & 1 == 0 {
            Encoding::Binary
        } else {
            Encoding::Base64
        },
        close_signal: mode & 2 != 0,
    };
    // The message decoder on its own, with the bytes as either kind of message.
    let _ = framing.decode(Message::binary(bytes.to_vec()));
    let _ = framing.decode(Message::text(String::from_utf8_lossy(bytes).into_owned()));

    runtime().block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let input = bytes.to_vec();
        let sending = tokio::spawn(async move {
            let _ = to_server.write_all(&input).await;
            let _ = to_server.shutdown().await;
        });
        let draining = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = from_server.read_to_end(&mut sink).await;
        });
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_MESSAGE))
            .max_frame_size(Some(MAX_MESSAGE));
        let ws = WebSocketStream::from_raw_socket(server, Role::Server, Some(config)).await;
        let mut mux = Mux::start(ws, framing, &[0, 4], &[1, 3]);
        let closed = mux.closed();
        let mut readers = Vec::new();
        for channel in [0, 4] {
            if let Some(mut reader) = mux.reader(channel) {
                readers.push(tokio::spawn(async move {
                    let mut got = Vec::new();
                    let _ = reader.read_to_end(&mut got).await;
                }));
            }
        }
        let mut stdout = mux.writer(1);
        let error = mux.writer(3);
        drop(mux);
        if let Some(stdout) = stdout.as_mut() {
            let _ = stdout.write_all(b"output").await;
        }
        for reader in readers {
            let _ = reader.await;
        }
        drop(stdout);
        drop(error);
        closed.cancelled().await;
        let _ = sending.await;
        let _ = draining.await;
    });
});
