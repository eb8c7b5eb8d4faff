//! The TCP accept loop, with a bound on concurrent connections, for plain MQTT and MQTTS.

use crate::auth::authenticator::ListenerAuth;
use crate::limits::ACCEPT_BACKOFF;
use crate::mqtt::connection::ClientTransport;
use crate::mqtt::{ServerContext, connection};
use crate::tls;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// Accepts connections until shutdown, with TLS when `tls` is given, asking clients what
/// `auth` says. Each holds a permit of
/// `connections` (shared by the listeners); at the limit new sockets wait in the kernel's
/// backlog instead of costing memory here.
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    auth: ListenerAuth,
    context: Arc<ServerContext>,
    connections: Arc<Semaphore>,
) {
    loop {
        let permit = tokio::select! {
            () = context.shutdown.cancelled() => return,
            permit = Arc::clone(&connections).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            () = context.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((socket, peer)) => {
                let _ = socket.set_nodelay(true);
                let context = Arc::clone(&context);
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        Some(tls) => serve_tls(socket, peer, &tls, auth, context).await,
                        None => {
                            let client = ClientTransport {
                                peer,
                                certificates: None,
                            };
                            connection::serve(socket, client, auth, context).await;
                        }
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                // Usually EMFILE: back off instead of spinning.
                tracing::warn!("failed to accept a connection: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

async fn serve_tls(
    socket: TcpStream,
    peer: SocketAddr,
    tls: &TlsAcceptor,
    auth: ListenerAuth,
    context: Arc<ServerContext>,
) {
    let stream = tokio::select! {
        () = context.shutdown.cancelled() => return,
        stream = tls::handshake(tls, socket, peer) => match stream {
            Some(stream) => stream,
            None => return,
        },
    };
    // The chain the client presented, if any: checked at CONNECT against the identity it names.
    let certificates = stream
        .get_ref()
        .1
        .peer_certificates()
        .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect());
    let client = ClientTransport { peer, certificates };
    connection::serve(stream, client, auth, context).await;
}
