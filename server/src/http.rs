//! The HTTP/1 accept loop, like `axum::serve` but with a cap on each connection's read buffer.
//!
//! hyper grows a connection's read buffer (adaptively, up to about 400 KB) while a request body
//! streams in, and the connection keeps that capacity until it closes. Devices keep their
//! connections open between requests, so with a thousand devices uploading 4 MB updates these
//! buffers were most of the server's heap (heaptrack, 1,000 uploads per round: 83 MB of a 150 MB
//! peak). Capped at [`READ_BUFFER_LIMIT`], a connection costs at most that much, and a body is read
//! in more, smaller reads.

use std::time::Duration;

use axum::Router;
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use tokio::net::TcpListener;
use tracing::{debug, warn};

/// Largest read buffer of one connection (hyper's minimum is 8 KiB; it also bounds a request's
/// header block).
pub const READ_BUFFER_LIMIT: usize = 16 * 1024;

/// Accepts connections on `listener` and serves `app` on each, until the task is dropped (the
/// `Result` is `axum::serve`'s signature; accept errors are waited out, not returned).
pub async fn serve(listener: TcpListener, app: Router) -> std::io::Result<()> {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // E.g. out of file descriptors: wait for connections to close rather than spin.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .max_buf_size(READ_BUFFER_LIMIT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                debug!(error = %e, "connection ended with an error");
            }
        });
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
    async fn start() -> String {
        let app = Router::new().route("/len", post(|body: Bytes| async move { body.len().to_string() }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, app));
        format!("http://{addr}/len")
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
