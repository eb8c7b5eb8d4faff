//! The TCP accept loop, with a bound on concurrent connections.

use crate::mqtt::{ServerContext, connection};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Accepts connections until shutdown. Each holds a permit of `connections`; at the limit new
/// sockets wait in the kernel's backlog instead of costing memory here.
pub async fn accept_loop(
    listener: TcpListener,
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
                tokio::spawn(async move {
                    connection::serve(socket, peer, context).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // Usually EMFILE: back off instead of spinning.
                tracing::warn!("failed to accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
