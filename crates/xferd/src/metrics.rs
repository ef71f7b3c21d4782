//! The daemon's counters and gauges, and the small HTTP/1.1 responder that serves them in the
//! Prometheus text format (`xferd --metrics 127.0.0.1:9108`, then `GET /metrics`).
//!
//! Every metric is one atomic: the handler bumps it with one call and nothing here takes a lock
//! or blocks. A transfer is counted once per file, whatever number of connections carry it.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// A count that only goes up.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A level that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one away.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Transfers in one direction, counted per file.
#[derive(Debug, Default)]
pub struct Transfers {
    /// Open now.
    pub active: Gauge,
    /// Finished with every byte in place (uploads committed, downloads whose digest was served
    /// and whose connections all said goodbye).
    pub completed: Counter,
    /// Ended without that: connections lost, commit refused.
    pub failed: Counter,
    /// Started with bytes already held from an earlier attempt.
    pub resumed: Counter,
}

/// Everything `/metrics` reports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Payload bytes of chunks received, verified and written.
    pub bytes_received: Counter,
    /// Payload bytes of chunks sent.
    pub bytes_sent: Counter,
    /// Bytes on the wire of the chunks received (compressed ones as they travelled).
    pub wire_bytes_received: Counter,
    /// Bytes on the wire of the chunks sent (compressed ones as they travelled).
    pub wire_bytes_sent: Counter,
    /// File bytes of the small files of trees stored (`PutFile`, packed or not).
    pub small_file_bytes_received: Counter,
    /// File bytes of the small files of trees sent (`FileData`, packed or not).
    pub small_file_bytes_sent: Counter,
    /// What those small files took on the wire: a packed batch its compressed bytes.
    pub small_file_wire_bytes_received: Counter,
    /// What the small files sent took on the wire.
    pub small_file_wire_bytes_sent: Counter,
    /// Chunks received with a bad CRC (and asked for again).
    pub crc_errors: Counter,
    /// Bytes of delta uploads copied from the file already held instead of received.
    pub delta_copied: Counter,
    /// Bytes of the files held read to find what delta uploads copy.
    pub delta_basis_read: Counter,
    /// Uploads committed without a flush of their own: a tree's large and light files, made
    /// durable by the tree's `Sync` (`CAP_TREE_SYNC`, `CAP_DELTA_PUT_SYNC`).
    pub commits_left_to_sync: Counter,
    /// Uploads (client to daemon).
    pub uploads: Transfers,
    /// Downloads (daemon to client).
    pub downloads: Transfers,
    /// Connections open, whatever they are doing.
    pub connections_open: Gauge,
    /// Connections accepted since start.
    pub connections_accepted: Counter,
    /// Connections past their handshake waiting for a stream slot.
    pub connections_waiting: Gauge,
    /// Connections holding a stream slot.
    pub streams_active: Gauge,
    /// Stream slots (`max_streams`).
    pub streams_max: Gauge,
    /// Configuration reloads applied (`SIGHUP`).
    pub reloads: Counter,
    /// Early proofs (`CAP_ZERO_RTT`) taken, refused (a fallback to the challenge) and wrong.
    pub early_proofs: EarlyProofs,
    /// The memory budget chunk and frame buffers come from, once the daemon runs.
    pub buffers: std::sync::OnceLock<xfer_core::MemoryBudget>,
}

/// What became of the clients' early proofs (`CAP_ZERO_RTT`).
#[derive(Debug, Default)]
pub struct EarlyProofs {
    /// Taken: the requests behind them were served without a challenge.
    pub accepted: Counter,
    /// Their time lay outside the window.
    pub skew: Counter,
    /// Their nonce had been taken already.
    pub replay: Counter,
    /// The replay cache was full.
    pub full: Counter,
    /// Made over a nonce of the wrong length.
    pub malformed: Counter,
    /// Wrong proofs: refused with `Error{Auth}`.
    pub wrong: Counter,
}

impl EarlyProofs {
    /// The counter of proofs refused for `why`.
    pub fn refused(&self, why: xfer_proto::replay::Refusal) -> &Counter {
        use xfer_proto::replay::Refusal;
        match why {
            Refusal::Skew => &self.skew,
            Refusal::Replay => &self.replay,
            Refusal::Full => &self.full,
            Refusal::Malformed => &self.malformed,
        }
    }
}

/// Takes one from a gauge of a shared [`Metrics`] when dropped.
pub(crate) struct GaugeGuard {
    metrics: Arc<Metrics>,
    gauge: fn(&Metrics) -> &Gauge,
}

impl GaugeGuard {
    /// Adds one to `gauge` now and takes it away again on drop.
    pub(crate) fn new(metrics: &Arc<Metrics>, gauge: fn(&Metrics) -> &Gauge) -> Self {
        gauge(metrics).inc();
        Self {
            metrics: Arc::clone(metrics),
            gauge,
        }
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        (self.gauge)(&self.metrics).dec();
    }
}

impl Metrics {
    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let mut family = |name: &str, kind: &str, help: &str, samples: &[(&str, String)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let one = |v: String| [("", v)];
        let both = |f: &dyn Fn(&Transfers) -> String| {
            [
                (r#"{direction="upload"}"#, f(&self.uploads)),
                (r#"{direction="download"}"#, f(&self.downloads)),
            ]
        };
        family(
            "xferd_bytes_received_total",
            "counter",
            "Payload bytes received in verified chunks.",
            &one(self.bytes_received.get().to_string()),
        );
        family(
            "xferd_delta_copied_bytes_total",
            "counter",
            "Bytes of delta uploads copied from the file already held.",
            &one(self.delta_copied.get().to_string()),
        );
        family(
            "xferd_delta_basis_read_bytes_total",
            "counter",
            "Bytes of the files already held read to find what delta uploads copy.",
            &one(self.delta_basis_read.get().to_string()),
        );
        family(
            "xferd_commits_left_to_sync_total",
            "counter",
            "Uploads committed without a flush of their own, made durable by a tree's Sync.",
            &one(self.commits_left_to_sync.get().to_string()),
        );
        family(
            "xferd_bytes_sent_total",
            "counter",
            "Payload bytes sent in chunks.",
            &one(self.bytes_sent.get().to_string()),
        );
        family(
            "xferd_wire_bytes_received_total",
            "counter",
            "Bytes on the wire of verified chunks received, after compression.",
            &one(self.wire_bytes_received.get().to_string()),
        );
        family(
            "xferd_wire_bytes_sent_total",
            "counter",
            "Bytes on the wire of chunks sent, after compression.",
            &one(self.wire_bytes_sent.get().to_string()),
        );
        let received_sent = |received: &Counter, sent: &Counter| {
            [
                (r#"{direction="received"}"#, received.get().to_string()),
                (r#"{direction="sent"}"#, sent.get().to_string()),
            ]
        };
        family(
            "xferd_small_file_bytes_total",
            "counter",
            "File bytes of the small files of trees, stored or sent whole.",
            &received_sent(&self.small_file_bytes_received, &self.small_file_bytes_sent),
        );
        family(
            "xferd_small_file_wire_bytes_total",
            "counter",
            "Bytes on the wire of the small files of trees, after compression.",
            &received_sent(
                &self.small_file_wire_bytes_received,
                &self.small_file_wire_bytes_sent,
            ),
        );
        family(
            "xferd_transfers_active",
            "gauge",
            "Transfers in progress, per file.",
            &both(&|t| t.active.get().to_string()),
        );
        family(
            "xferd_transfers_completed_total",
            "counter",
            "Transfers finished with every byte in place.",
            &both(&|t| t.completed.get().to_string()),
        );
        family(
            "xferd_transfers_failed_total",
            "counter",
            "Transfers that ended before completing (resumable by a rerun).",
            &both(&|t| t.failed.get().to_string()),
        );
        family(
            "xferd_resumes_total",
            "counter",
            "Transfers that started from bytes held by an earlier attempt.",
            &both(&|t| t.resumed.get().to_string()),
        );
        let proofs = &self.early_proofs;
        family(
            "xferd_early_proofs_total",
            "counter",
            "Early proofs (zero round trip): accepted, refused by reason (then challenged), or wrong.",
            &[
                (r#"{result="accepted"}"#, proofs.accepted.get().to_string()),
                (r#"{result="skew"}"#, proofs.skew.get().to_string()),
                (r#"{result="replay"}"#, proofs.replay.get().to_string()),
                (r#"{result="full"}"#, proofs.full.get().to_string()),
                (r#"{result="malformed"}"#, proofs.malformed.get().to_string()),
                (r#"{result="wrong"}"#, proofs.wrong.get().to_string()),
            ],
        );
        family(
            "xferd_crc_errors_total",
            "counter",
            "Chunks received with a bad CRC32 and asked for again.",
            &one(self.crc_errors.get().to_string()),
        );
        family(
            "xferd_connections_open",
            "gauge",
            "Client connections open.",
            &one(self.connections_open.get().to_string()),
        );
        family(
            "xferd_connections_accepted_total",
            "counter",
            "Client connections accepted.",
            &one(self.connections_accepted.get().to_string()),
        );
        family(
            "xferd_connections_waiting",
            "gauge",
            "Connections waiting for a stream slot (max_streams).",
            &one(self.connections_waiting.get().to_string()),
        );
        family(
            "xferd_streams_active",
            "gauge",
            "Connections holding a stream slot.",
            &one(self.streams_active.get().to_string()),
        );
        family(
            "xferd_streams_max",
            "gauge",
            "Stream slots: connections served at once.",
            &one(self.streams_max.get().to_string()),
        );
        let buffers = self.buffers.get();
        let budget =
            |f: fn(&xfer_core::MemoryBudget) -> usize| one(buffers.map_or(0, f).to_string());
        family(
            "xferd_buffer_bytes",
            "gauge",
            "Bytes of chunk and frame buffers in use now, reserved from the budget (not counting \
             the few freed ones kept, still reserved, for reuse).",
            &budget(xfer_core::MemoryBudget::in_use),
        );
        family(
            "xferd_buffer_budget_bytes",
            "gauge",
            "The budget for chunk and frame buffers (max_memory).",
            &budget(xfer_core::MemoryBudget::total),
        );
        family(
            "xferd_connections_waiting_for_buffers",
            "gauge",
            "Connections waiting for buffer bytes (not reading their socket meanwhile).",
            &budget(xfer_core::MemoryBudget::waiting),
        );
        family(
            "xferd_buffer_waits_total",
            "counter",
            "Times a connection had to wait for buffer bytes.",
            &one(buffers
                .map_or(0, xfer_core::MemoryBudget::waits)
                .to_string()),
        );
        family(
            "xferd_config_reloads_total",
            "counter",
            "Configuration reloads applied (SIGHUP).",
            &one(self.reloads.get().to_string()),
        );
        out
    }
}

/// Longest a scrape may take, from accept to the last byte written.
const SCRAPE_DEADLINE: Duration = Duration::from_secs(5);
/// Largest request head read.
const MAX_REQUEST: usize = 8 * 1024;
/// Scrapes served at once; more wait in the listen backlog.
const MAX_SCRAPES: usize = 4;

/// Serves `GET /metrics` on `listener` until `shutdown` fires. Each request gets one response
/// and the connection is closed (`Connection: close`).
pub async fn serve_http(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let limit = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => return,
            permit = Arc::clone(&limit).acquire_owned() => permit.expect("never closed"),
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((socket, peer)) => {
                let metrics = Arc::clone(&metrics);
                tokio::spawn(async move {
                    let served = tokio::time::timeout(SCRAPE_DEADLINE, respond(socket, &metrics));
                    match served.await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => debug!(%peer, error = %e, "metrics request failed"),
                        Err(_) => debug!(%peer, "metrics request timed out"),
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads one request head and answers it.
async fn respond(mut socket: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= MAX_REQUEST {
            return reply(
                &mut socket,
                "431 Request Header Fields Too Large",
                "",
                false,
            )
            .await;
        }
        match socket.read(&mut buf).await? {
            0 => return Ok(()),
            n => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let head_only = method == "HEAD";
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = metrics.render();
            reply(&mut socket, "200 OK", &body, head_only).await
        }
        ("GET" | "HEAD", "/") => {
            reply(
                &mut socket,
                "200 OK",
                "xferd: metrics at /metrics\n",
                head_only,
            )
            .await
        }
        ("GET" | "HEAD", _) => {
            reply(
                &mut socket,
                "404 Not Found",
                "not found: try /metrics\n",
                head_only,
            )
            .await
        }
        _ => reply(&mut socket, "405 Method Not Allowed", "use GET\n", false).await,
    }
}

async fn reply(
    socket: &mut TcpStream,
    status: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status.starts_with("405") {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(body);
    }
    socket.write_all(out.as_bytes()).await?;
    socket.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_help_type_and_labelled_samples() {
        let m = Metrics::default();
        m.bytes_received.add(42);
        m.uploads.completed.inc();
        m.downloads.active.inc();
        let text = m.render();
        assert!(text.contains(
            "# TYPE xferd_bytes_received_total counter\nxferd_bytes_received_total 42\n"
        ));
        assert!(text.contains("xferd_transfers_completed_total{direction=\"upload\"} 1\n"));
        assert!(text.contains("xferd_transfers_active{direction=\"download\"} 1\n"));
        // Every sample line is `name[{labels}] value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("xferd_"), "{line}");
            value.parse::<i64>().unwrap();
        }
    }

    #[tokio::test]
    async fn scrape_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        metrics.crc_errors.add(3);
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_http(listener, Arc::clone(&metrics), shutdown.clone()));
        let get = |req: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("xferd_crc_errors_total 3\n"), "{ok}");
        let missing = get("GET /nope HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = get("POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        shutdown.cancel();
        server.await.unwrap();
    }
}
