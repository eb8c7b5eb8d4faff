//! What spool's HTTP servers share (the workload API on unix sockets, the direct-method
//! endpoint on HTTPS): one connection served with HTTP/1.1 within a time limit for its request
//! head, bodies read up to a limit, and JSON answers.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// An answer.
pub type Answer = Response<Full<Bytes>>;

/// How long a connection may take to send a request's head, and then its body: a client
/// cannot hold a connection slot for ever.
const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves HTTP/1.1 on `io` until the client closes it, answering each request with `answer`;
/// a client that takes longer than `REQUEST_HEAD_TIMEOUT` to send a request's head (an idle
/// kept-alive connection too) is cut off.
pub async fn serve_connection<I, F, A>(io: I, answer: F)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> A + Send + Sync + 'static,
    A: Future<Output = Answer> + Send + 'static,
{
    let answer = std::sync::Arc::new(answer);
    let service = hyper::service::service_fn(move |request| {
        let answer = std::sync::Arc::clone(&answer);
        async move { Ok::<_, std::convert::Infallible>(answer(request).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_HEAD_TIMEOUT)
        .serve_connection(TokioIo::new(io), service)
        .await;
    if let Err(e) = served {
        tracing::debug!("HTTP connection: {e}");
    }
}

/// A request's body, if it has at most `bytes_max` bytes and comes within `BODY_TIMEOUT`.
///
/// # Errors
/// Why it could not be read: too long, too slow, or the connection failed.
pub async fn body(request: Request<Incoming>, bytes_max: usize) -> Result<Bytes, String> {
    let read = Limited::new(request.into_body(), bytes_max).collect();
    match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Ok(Ok(body)) => Ok(body.to_bytes()),
        Ok(Err(e)) => Err(format!("the request: {e}")),
        Err(_) => Err(format!(
            "the request's body took more than {BODY_TIMEOUT:?}"
        )),
    }
}

/// A JSON answer.
#[must_use]
pub fn json(status: StatusCode, value: &serde_json::Value) -> Answer {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
