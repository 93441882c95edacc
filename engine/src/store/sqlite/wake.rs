//! Waking the host of a SQLite file when another process commits work for it (a `cairn start`
//! or `cairn publish`, a service with a client of its own), without a busy poll: SQLite has no
//! `NOTIFY`.
//!
//! The host listens on a local datagram socket named after the database file (Linux's abstract
//! socket namespace: no file to leave behind, no path length to overflow): `cairn-wake-` and the
//! first 16 hex digits of the SHA-256 of the file's canonical path. A store of another process
//! (or a second store of this one) that commits work sends it one byte after the commit; the host
//! then claims at once instead of at its next poll. Nothing depends on the datagram arriving: a
//! lost one (no host listening, its queue full) leaves the work to the host's poll, as before.
//! Any local process may send one; all it can do is make the host look for work.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The wake-up socket of one database file, as a store sees it.
#[derive(Debug, Default)]
pub(super) struct Wake {
    /// The socket's abstract name; `None` for an in-memory database, or where abstract sockets
    /// do not exist.
    name: Option<String>,
    /// Whether this store is the host's, listening: its own commits need no datagram.
    listening: AtomicBool,
}

impl Wake {
    /// The wake-up socket of the database file at `path`.
    pub(super) fn for_file(path: &Path) -> Self {
        let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        let digest = Sha256::digest(path.as_os_str().as_encoded_bytes());
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Self {
            name: cfg!(target_os = "linux").then(|| format!("cairn-wake-{hex}")),
            listening: AtomicBool::new(false),
        }
    }

    /// Tells the host of this file that a commit made work for it. Never blocks: a datagram
    /// that cannot be sent at once is dropped (the host's poll finds the work).
    pub(super) fn others(&self) {
        if self.listening.load(Ordering::Relaxed) {
            return;
        }
        if let Some(name) = &self.name {
            if let Err(e) = send(name) {
                tracing::trace!(error = %e, "no host woken (none listens, or its queue is full)");
            }
        }
    }

    /// Wakes `wake` at each datagram until `stop`; returns at once where there is no socket to
    /// listen on (an in-memory database, another host listening, a platform without abstract
    /// sockets), leaving the host to its poll.
    pub(super) async fn listen(self: Arc<Self>, wake: Arc<Notify>, stop: CancellationToken) {
        let Some(name) = self.name.clone() else {
            return;
        };
        let socket = match bind(&name) {
            Ok(socket) => socket,
            Err(e) => {
                tracing::warn!(error = %e, socket = %name, "cannot listen for other processes' work on this SQLite file; the host polls for it");
                return;
            }
        };
        self.listening.store(true, Ordering::Relaxed);
        let mut buf = [0u8; 16];
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                got = socket.recv(&mut buf) => match got {
                    Ok(_) => wake.notify_one(),
                    Err(e) => {
                        tracing::warn!(error = %e, "the wake-up socket failed; the host polls for other processes' work");
                        break;
                    }
                },
            }
        }
        self.listening.store(false, Ordering::Relaxed);
    }
}

#[cfg(target_os = "linux")]
fn address(name: &str) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
}

#[cfg(not(target_os = "linux"))]
fn address(_name: &str) -> std::io::Result<std::os::unix::net::SocketAddr> {
    Err(std::io::Error::other("abstract sockets are Linux's"))
}

fn send(name: &str) -> std::io::Result<()> {
    let socket = std::os::unix::net::UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    socket.send_to_addr(b"w", &address(name)?)?;
    Ok(())
}

fn bind(name: &str) -> std::io::Result<tokio::net::UnixDatagram> {
    let socket = std::os::unix::net::UnixDatagram::bind_addr(&address(name)?)?;
    socket.set_nonblocking(true)?;
    tokio::net::UnixDatagram::from_std(socket)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_commit_elsewhere_wakes_the_listening_host_and_its_own_do_not_send() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.db");
        std::fs::write(&file, b"").unwrap();
        let host = Arc::new(Wake::for_file(&file));
        let other = Wake::for_file(&file);
        let (wake, stop) = (Arc::new(Notify::new()), CancellationToken::new());
        let listening = tokio::spawn(host.clone().listen(wake.clone(), stop.clone()));
        // Listening once its flag is up.
        while !host.listening.load(Ordering::Relaxed) {
            tokio::task::yield_now().await;
        }
        other.others();
        tokio::time::timeout(Duration::from_secs(5), wake.notified())
            .await
            .expect("the host was not woken");
        // The host's own store does not send to itself.
        host.others();
        assert!(
            tokio::time::timeout(Duration::from_millis(100), wake.notified())
                .await
                .is_err(),
            "the host's own commit sent a datagram"
        );
        stop.cancel();
        listening.await.unwrap();
    }

    #[test]
    fn a_file_has_one_socket_name_whatever_path_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.db");
        std::fs::write(&file, b"").unwrap();
        let dotted = dir.path().join(".").join("w.db");
        assert_eq!(Wake::for_file(&file).name, Wake::for_file(&dotted).name);
        let other = dir.path().join("x.db");
        std::fs::write(&other, b"").unwrap();
        assert_ne!(Wake::for_file(&file).name, Wake::for_file(&other).name);
    }
}
