//! Arbitrary bytes as the client side of an HBONE HTTP/2 connection (after the client
//! preface), in memory, to an h2 server configured as the HBONE listener's whose
//! request handler answers with `connect_target`'s decision. Finds panics and hangs in
//! the frame handling in front of the CONNECT decision.
#![no_main]

use std::{net::IpAddr, sync::LazyLock};

use http::{Response, StatusCode};
use libfuzzer_sys::fuzz_target;
use mesh_node::{
    hbone::client::CONNECTION_WINDOW, hbone::client::STREAM_WINDOW, hbone::target::connect_target,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, DuplexStream},
    runtime::Runtime,
};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

static RUNTIME: LazyLock<Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a tokio runtime")
});

static LOCAL: LazyLock<Vec<IpAddr>> = LazyLock::new(|| {
    ["10.0.1.5", "fd00::1:5"]
        .iter()
        .map(|ip| ip.parse().expect("an IP"))
        .collect()
});

async fn serve(io: DuplexStream) {
    let Ok(mut connection) = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake::<_, bytes::Bytes>(io)
        .await
    else {
        return;
    };
    while let Some(next) = connection.accept().await {
        let Ok((request, mut respond)) = next else {
            return;
        };
        let status = match connect_target(&request, &LOCAL) {
            Ok(_) => StatusCode::OK,
            Err(refusal) => refusal.status(),
        };
        if let Ok(response) = Response::builder().status(status).body(()) {
            let _ = respond.send_response(response, true);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    RUNTIME.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let send = async move {
            let _ = to_server.write_all(PREFACE).await;
            let _ = to_server.write_all(data).await;
            let _ = to_server.shutdown().await;
        };
        let drain = async move {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = from_server.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        };
        tokio::join!(send, drain, serve(server));
    });
});
