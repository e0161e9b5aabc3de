//! The probe port's guard: at most [`MAX_CONNECTIONS`] connections at once (more wait in the
//! accept queue) and a read timeout, so a client that opens a connection and sends its headers
//! slowly, or nothing at all, cannot hold the port.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

/// Connections the probe port serves at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Longest a probe connection may go without sending a byte (request headers included).
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A listener that admits at most `max_connections` connections at once.
pub struct GuardedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    read_timeout: Duration,
}

impl GuardedListener {
    /// Guards `inner` with the given limits.
    pub fn new(inner: TcpListener, max_connections: usize, read_timeout: Duration) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(max_connections)),
            read_timeout,
        }
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = GuardedStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // Waiting for a permit leaves further connections in the kernel's accept queue.
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        (
            GuardedStream {
                inner: stream,
                _permit: permit,
                timeout: self.read_timeout,
                deadline: Box::pin(tokio::time::sleep(self.read_timeout)),
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection holding its place until it closes, and failing a read that waits too long.
pub struct GuardedStream {
    inner: TcpStream,
    _permit: OwnedSemaphorePermit,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                let next = tokio::time::Instant::now() + this.timeout;
                this.deadline.as_mut().reset(next);
                Poll::Ready(result)
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "probe client sent nothing for too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_silent_client_is_cut_off_and_the_port_keeps_answering() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let guarded = GuardedListener::new(listener, 1, Duration::from_millis(300));
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        tokio::spawn(async move {
            let _ = axum::serve(guarded, app).await;
        });
        // Takes the only place and sends half a request line, then nothing.
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        silent.write_all(b"GET / HT").await.expect("write");
        // Once the silent one is cut off, a real request gets through.
        let answered = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Ok(answer) = crate::http::get(addr, "/", Duration::from_secs(2)).await {
                    return answer;
                }
            }
        })
        .await
        .expect("the port answers again after the read timeout");
        assert!(answered.1.contains("ok"), "{answered:?}");
    }
}
