//! The HTTP/1 accept loop, like `axum::serve` but with a cap on each connection's read buffer.
//!
//! hyper grows a connection's read buffer (adaptively, up to about 400 KB) while a request body
//! streams in, and the connection keeps that capacity until it closes. Devices keep their
//! connections open between requests, so with a thousand devices uploading 4 MB updates these
//! buffers were most of the server's heap (heaptrack, 1,000 uploads per round: 83 MB of a 150 MB
//! peak). Capped at [`READ_BUFFER_LIMIT`], a connection costs at most that much, and a body is read
//! in more, smaller reads.
//!
//! It also bounds what clients that hold connections open can take ([`ConnectionLimits`]): a
//! request's header block must arrive within a time limit (slowloris), and past a number of open
//! connections the loop stops accepting until one closes (the kernel's backlog queues the rest).
//!
//! With TLS ([`crate::tls`]) each connection's handshake comes first, within the same time limit as
//! a header block; the limits above then hold for the decrypted stream as they do in the clear.
//!
//! Shutdown is graceful: the loop stops accepting, and each connection finishes the request it is
//! serving (an upload in flight is read, checked and acknowledged) and then closes.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, extract::ConnectInfo};
use hyper::{Request, body::Incoming};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use prometheus_client::metrics::gauge::Gauge;
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_rustls::TlsAcceptor;
use tower::{ServiceExt, util::MapRequest};
use tracing::{debug, warn};

use crate::tls::ClientCertificate;

/// Limits of the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open connections at most (each costs a file descriptor and about 20 KB of buffers).
    pub max_connections: usize,
    /// Time a client has to send a request's whole header block, from the connection's start or
    /// from the first byte of a later request on it; then the connection is closed.
    pub header_read_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 50_000,
            header_read_timeout: Duration::from_secs(30),
        }
    }
}

/// Largest read buffer of one connection (hyper's minimum is 8 KiB; it also bounds a request's
/// header block).
pub const READ_BUFFER_LIMIT: usize = 16 * 1024;

/// Accepts connections on `listener` (over TLS with `tls`) and serves `app` on each until `shutdown` resolves (or the
/// task is dropped), keeping `open_connections` at the number open; then stops accepting, lets every connection finish the request it is serving
/// (and close instead of waiting for another), and returns once all have closed. Bound the wait
/// from outside (see [`crate::RunningServer::drain`]). Accept errors are waited out, not returned
/// (the `Result` is `axum::serve`'s signature).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsAcceptor>,
    limits: ConnectionLimits,
    open_connections: Gauge,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let (closing, closing_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = accept(&listener, &open) => accepted,
        };
        let (stream, peer, permit) = accepted;
        // Without it, a TLS handshake's second flight waits for the client's delayed ACK (40 ms on
        // Linux: 192 handshakes/s instead of thousands, `fedhive-load handshakes --tls`), and so
        // does any answer written in more than one piece.
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "setting TCP_NODELAY failed");
        }
        let app = app.clone();
        let tls = tls.clone();
        let closing = closing_rx.clone();
        let counted = Counted::new(&open_connections);
        tokio::spawn(async move {
            let _open = (permit, counted);
            let Some(tls) = tls else {
                return serve_connection(stream, with_peer(app, peer, None), limits, closing).await;
            };
            // The handshake gets the header block's time limit: a client that opens a connection
            // and sends nothing holds no slot for longer over TLS than in the clear.
            let stream = match tokio::time::timeout(limits.header_read_timeout, tls.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return debug!(error = %e, "TLS handshake failed"),
                Err(_) => return debug!("TLS handshake timed out"),
            };
            let certificate = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| ClientCertificate {
                    fingerprint: Sha256::digest(leaf.as_ref()).into(),
                });
            serve_connection(stream, with_peer(app, peer, certificate), limits, closing).await
        });
    }
    drop(listener);
    let _ = closing.send(true);
    // Every connection holds a permit until it closes.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = open.acquire_many(all).await;
    Ok(())
}

/// `app` with the peer's address as axum's `ConnectInfo` (per-address rate limits) and its verified
/// client certificate, if any, in each request's extensions.
fn with_peer(
    app: Router,
    peer: SocketAddr,
    certificate: Option<ClientCertificate>,
) -> TowerToHyperService<MapRequest<Router, impl FnMut(Request<Incoming>) -> Request<Incoming> + Clone>> {
    TowerToHyperService::new(app.map_request(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        if let Some(certificate) = &certificate {
            request.extensions_mut().insert(certificate.clone());
        }
        request
    }))
}

/// Serves HTTP/1 on one connection (plain or TLS) until it closes, or, once `closing` turns true,
/// until the request in progress is answered.
async fn serve_connection<S>(
    stream: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    service: S,
    limits: ConnectionLimits,
    mut closing: tokio::sync::watch::Receiver<bool>,
) where
    S: hyper::service::HttpService<Incoming>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connection = hyper::server::conn::http1::Builder::new()
        .max_buf_size(READ_BUFFER_LIMIT)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        _ = async { closing.wait_for(|closing| *closing).await.map(|_| ()) } => {
            // Finish the request in progress, then close.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = ended {
        debug!(error = %e, "connection ended with an error");
    }
}

/// Counts one open connection in a gauge while alive.
struct Counted(Gauge);

impl Counted {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Counted(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The next connection, once fewer than the limit are open.
async fn accept(
    listener: &TcpListener,
    open: &Arc<Semaphore>,
) -> (tokio::net::TcpStream, std::net::SocketAddr, OwnedSemaphorePermit) {
    let permit = open
        .clone()
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => return (stream, peer, permit),
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // E.g. out of file descriptors: wait for connections to close rather than spin.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Errors of one connection that went away before it was accepted; the listener is fine.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}

#[cfg(test)]
mod tests {
    use axum::{body::Bytes, routing::post};

    use super::*;

    /// A server on loopback that answers a POST with the length of its body.
    async fn start_with(limits: ConnectionLimits) -> String {
        let app = Router::new().route("/len", post(|body: Bytes| async move { body.len().to_string() }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(
            listener,
            app,
            None,
            limits,
            Gauge::default(),
            std::future::pending(),
        ));
        format!("http://{addr}/len")
    }

    async fn start() -> String {
        start_with(ConnectionLimits::default()).await
    }

    #[tokio::test]
    async fn a_header_block_that_never_ends_is_cut_off() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_millis(300),
            ..ConnectionLimits::default()
        };
        let url = start_with(limits).await;
        let addr = url.trim_start_matches("http://").trim_end_matches("/len");
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"POST /len HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        // The server answers 408 or just closes; either way the read ends, well before 10 s.
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut answer))
            .await
            .expect("the server closed the stalled connection")
            .unwrap();
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(250), "closed after {waited:?}");
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "{answer}"
        );
    }

    #[tokio::test]
    async fn past_the_connection_cap_new_connections_wait_for_one_to_close() {
        let limits = ConnectionLimits {
            max_connections: 1,
            ..ConnectionLimits::default()
        };
        let url = start_with(limits).await;
        let first = reqwest::Client::new();
        assert_eq!(
            first
                .post(&url)
                .body("ab")
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
            "2"
        );
        // `first` keeps its connection open: a second client's connection is not served.
        let second = reqwest::Client::builder()
            .timeout(Duration::from_millis(500))
            .build()
            .unwrap();
        assert!(second.post(&url).body("abc").send().await.is_err());
        drop(first);
        let third = reqwest::Client::new();
        let answer = tokio::time::timeout(Duration::from_secs(10), third.post(&url).body("abcd").send())
            .await
            .expect("served once the first connection closed")
            .unwrap();
        assert_eq!(answer.text().await.unwrap(), "4");
    }

    #[tokio::test]
    async fn bodies_larger_than_the_buffer_arrive_whole() {
        let url = start().await;
        let client = reqwest::Client::new();
        let body = vec![7u8; 1 << 20];
        for _ in 0..2 {
            // Twice, the second time on the kept-alive connection.
            let answer = client.post(&url).body(body.clone()).send().await.unwrap();
            assert_eq!(answer.status(), 200);
            assert_eq!(answer.text().await.unwrap(), (1 << 20).to_string());
        }
    }

    #[tokio::test]
    async fn a_header_block_over_the_limit_is_refused() {
        let url = start().await;
        let client = reqwest::Client::new();
        let answer = client
            .post(&url)
            .header("x-padding", "a".repeat(READ_BUFFER_LIMIT))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 431);
        let small = client.post(&url).body("abc").send().await.unwrap();
        assert_eq!(small.text().await.unwrap(), "3");
    }
}
