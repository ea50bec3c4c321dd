//! The server side of HBONE framing: the HTTP/2 settings a 15008 listener offers,
//! the peer's SPIFFE ID from its client certificate, and CONNECT replies. The listener
//! that uses them (per pod, with authorization) is `proxy::inbound_hbone`.

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Response, StatusCode};
use rustls::ServerConnection;

use crate::{
    hbone::client::CONNECTION_WINDOW, hbone::client::STREAM_WINDOW, identity::spiffe::spiffe_id,
    identity::Identity,
};

/// The largest CONNECT header block accepted (SETTINGS_MAX_HEADER_LIST_SIZE): a CONNECT
/// carries an authority and a few headers, nothing near this.
pub(crate) const MAX_HEADER_LIST: u32 = 16 * 1024;

/// HTTP/2 server settings for one HBONE connection carrying at most `max_streams`
/// tunnels at once.
pub(crate) fn h2_settings(max_streams: u32) -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(max_streams);
    builder
}

/// The SPIFFE ID of the client certificate a TLS session was established with.
pub(crate) fn peer_identity(tls: &ServerConnection) -> Result<Identity, String> {
    match tls.peer_certificates().and_then(|c| c.first()) {
        Some(cert) => spiffe_id(cert),
        None => Err("no client certificate".into()),
    }
}

/// Answers a CONNECT with `status` and no body.
pub(crate) fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    if let Ok(resp) = Response::builder().status(status).body(()) {
        let _ = respond.send_response(resp, true);
    }
}
