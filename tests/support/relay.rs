//! Stand-ins on the wire between a real client and what it talks to: [`Tee`], a relay that
//! records every byte a real client and daemon exchange, and [`Impostor`], a scripted server.

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::raw::{read_some, RawConn};

// ---------------------------------------------------------------------------------------------
// A recording relay
// ---------------------------------------------------------------------------------------------

/// The bytes of one relayed connection, each direction in order.
#[derive(Debug, Default, Clone)]
pub struct Captured {
    /// Client to daemon.
    pub up: Vec<u8>,
    /// Daemon to client.
    pub down: Vec<u8>,
}

type Connections = Arc<Mutex<Vec<Arc<Mutex<Captured>>>>>;

/// A TCP relay on `127.0.0.1:0` in front of `upstream` that records every byte it forwards:
/// what a real client and daemon put on the wire. Threads end when their connections do.
pub struct Tee {
    addr: SocketAddr,
    conns: Connections,
    stop: Arc<AtomicBool>,
}

impl Tee {
    /// Starts relaying to `upstream`.
    pub fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let addr = listener.local_addr().unwrap();
        let conns: Connections = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (conns2, stop2) = (Arc::clone(&conns), Arc::clone(&stop));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let captured = Arc::new(Mutex::new(Captured::default()));
                conns2.lock().unwrap().push(Arc::clone(&captured));
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let cap2 = Arc::clone(&captured);
                std::thread::spawn(move || pump(client, server, &captured, true));
                std::thread::spawn(move || pump(s2, c2, &cap2, false));
            }
        });
        Self { addr, conns, stop }
    }

    /// Where clients connect.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// What each connection carried so far, in accept order.
    pub fn captured(&self) -> Vec<Captured> {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.lock().unwrap().clone())
            .collect()
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, captured: &Mutex<Captured>, up: bool) {
    let mut block = [0u8; 64 * 1024];
    loop {
        match read_some(&mut from, &mut block) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                {
                    let mut c = captured.lock().unwrap();
                    let dir = if up { &mut c.up } else { &mut c.down };
                    dir.extend_from_slice(&block[..n]);
                }
                if to.write_all(&block[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

// ---------------------------------------------------------------------------------------------
// An impostor server
// ---------------------------------------------------------------------------------------------

/// A plaintext server on `127.0.0.1:0` that answers each connection with a script, then keeps
/// everything the client sends until it closes: what a real client does facing an attacker.
pub struct Impostor {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Vec<u8>>>,
}

impl Impostor {
    /// Serves connections one at a time with `script` until [`finish`](Self::finish).
    pub fn start(script: impl Fn(&mut RawConn) + Send + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind impostor");
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let mut conn = RawConn::accepted(stream);
                script(&mut conn);
                conn.drain();
                seen.push(conn.received);
            }
            seen
        });
        Self { addr, stop, thread }
    }

    /// Where clients connect.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Stops serving; returns the bytes each connection's client sent, in order.
    pub fn finish(self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        self.thread.join().expect("impostor thread")
    }
}
