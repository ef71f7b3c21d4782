//! The daemon's Prometheus endpoint from the outside: where it listens ([`metrics_port`]), one
//! scrape over plain HTTP ([`http_get`]) and one sample of an exposition ([`sample`]).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::Daemon;

/// The port of a daemon started with `--metrics 127.0.0.1:0`, from the line it logs.
///
/// # Panics
/// If the daemon logged no metrics address.
pub fn metrics_port(daemon: &Daemon) -> u16 {
    let log = daemon.stderr();
    log.lines()
        .find_map(|l| l.split("metrics served at /metrics addr=127.0.0.1:").nth(1))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"))
}

/// `GET path` on `127.0.0.1:port`; returns the status line, the headers and the body.
pub fn http_get(port: u16, path: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read the response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {response:?}"));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_owned(), headers.to_owned(), body.to_owned())
}

/// The value of the sample `series` (name with its labels, as printed) in an exposition.
pub fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Scrapes `/metrics` on `port` and returns the samples of `series`, in order, panicking on a
/// missing one.
pub fn scrape(port: u16, series: &[&str]) -> Vec<f64> {
    let body = http_get(port, "/metrics").2;
    series
        .iter()
        .map(|s| sample(&body, s).unwrap_or_else(|| panic!("no sample {s} in:\n{body}")))
        .collect()
}
