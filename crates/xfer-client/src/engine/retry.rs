//! When to try again: [`Retry`] paces reconnects, [`connect_first`] opens a command's first
//! connection (failing at once when nothing answers), [`connect_retrying`] and [`reopen`] are
//! the one way the engine gets a new connection outside a worker once a transfer has started,
//! and [`COMMIT_ATTEMPTS`] bounds how often a transfer is completed again after a commit found
//! bytes missing.

use std::time::{Duration, Instant};

use rand::Rng;

use super::window::Direction;
use super::Options;
use crate::session::FirstFrames;
use crate::{ClientError, Session, Target};

/// Rounds of moving and committing one file before giving up: a commit finds bytes missing
/// only if the daemon lost acknowledged chunks (it restarted after a power loss), or if a
/// resumed local file held other bytes than the server's; each round moves what is missing.
pub(super) const COMMIT_ATTEMPTS: usize = 3;

/// First delay before reconnecting; doubled after each failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Reconnect pacing: exponential backoff with jitter, giving up once one outage (failures with
/// no successful reconnect between them) has lasted `deadline`. Time comes in as `now`.
#[derive(Debug)]
pub(super) struct Retry {
    deadline: Duration,
    since: Option<Instant>,
    backoff: Duration,
}

impl Retry {
    pub(super) fn new(deadline: Duration) -> Self {
        Self {
            deadline,
            since: None,
            backoff: FIRST_BACKOFF,
        }
    }

    /// A connection got through: the next failure starts a new outage.
    pub(super) fn succeeded(&mut self) {
        self.since = None;
        self.backoff = FIRST_BACKOFF;
    }

    /// After a failure at `now`: the delay before the next attempt, or the error to end with
    /// (a final one, or the last one once the outage has lasted past the deadline).
    pub(super) fn after(&mut self, e: ClientError, now: Instant) -> Result<Duration, ClientError> {
        if !e.is_transient() {
            return Err(e);
        }
        let since = *self.since.get_or_insert(now);
        let lasted = now.duration_since(since);
        if lasted >= self.deadline {
            return Err(ClientError::GaveUp {
                last: Box::new(e),
                seconds: lasted.as_secs_f64(),
            });
        }
        tracing::info!(error = %e, retry_in = ?self.backoff, "connection failed; reconnecting");
        let delay = self.backoff.mul_f64(rand::thread_rng().gen_range(0.5..1.5));
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Ok(delay)
    }
}

/// A command's first connection. Nothing listening, an unreachable host or a timeout fails at
/// once, as scp does: before any byte has moved, waiting rarely helps and a typo in a host or
/// port should not cost a minute. Only a daemon that answered it is busy or restarting
/// (`Busy`, `ShuttingDown`) is waited for, as [`Retry`] allows. The first TCP connect tells
/// `dialed` the round trip it measured, before the handshake's round trips.
///
/// `first`'s frames, when given, go as the connection's first (with `Auth` where the daemon
/// proves itself early), as [`Session::connect_sending`] says.
pub(super) async fn connect_first(
    target: &Target,
    opts: &Options,
    mut dialed: Option<DialedRtt>,
    first: Option<&FirstFrames>,
) -> Result<Session, ClientError> {
    let mut retry = Retry::new(opts.retry_deadline);
    loop {
        match Session::connect_sending(target, &opts.connector, 0, &mut dialed, first).await {
            Ok(session) => return Ok(session),
            Err(e) if is_busy(&e) => tokio::time::sleep(retry.after(e, Instant::now())?).await,
            Err(e) => return Err(e),
        }
    }
}

/// Where a first connection tells the round trip its TCP connect measured.
pub(super) type DialedRtt = tokio::sync::oneshot::Sender<Option<Duration>>;

/// The daemon answered, and asked to be tried again later.
fn is_busy(e: &ClientError) -> bool {
    matches!(e, ClientError::Remote(frame) if matches!(
        frame.error_code(),
        Some(xfer_proto::ErrorCode::Busy | xfer_proto::ErrorCode::ShuttingDown)
    ))
}

/// Connects once a transfer has started, retrying transient failures (a dropped link, a busy
/// or restarting daemon) as [`Retry`] allows; the progress display says it is reconnecting.
pub(super) async fn connect_retrying(
    target: &Target,
    opts: &Options,
) -> Result<Session, ClientError> {
    let mut retry = Retry::new(opts.retry_deadline);
    let mut reconnecting = false;
    loop {
        match Session::connect(target, &opts.connector).await {
            Ok(session) => {
                if reconnecting {
                    opts.progress.set_message(String::new());
                }
                return Ok(session);
            }
            Err(e) if !e.is_transient_connect() => return Err(e),
            Err(e) => {
                let delay = retry.after(e, Instant::now())?;
                reconnecting = true;
                opts.progress.set_message(RECONNECTING.into());
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// What the progress display shows while connections are being made again.
pub(super) const RECONNECTING: &str = "reconnecting…";

/// A new connection with the transfer open on it, for the engine's own use between rounds
/// (the first connection of a round, the one that commits or asks for the digest).
pub(super) async fn reopen<D: Direction>(
    target: &Target,
    dir: &D,
    opts: &Options,
) -> Result<(Session, u64), ClientError> {
    let mut session = connect_retrying(target, opts).await?;
    let id = dir.open(&mut session).await?;
    Ok((session, id))
}

#[cfg(test)]
mod tests {
    use xfer_proto::{ErrorCode, ErrorFrame};

    use super::*;

    fn refused() -> ClientError {
        ClientError::Connect {
            addr: "127.0.0.1:1".into(),
            reason: "connection refused".into(),
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_its_cap() {
        let mut retry = Retry::new(Duration::from_secs(3600));
        let t0 = Instant::now();
        let mut expected = FIRST_BACKOFF;
        for i in 0..10 {
            let delay = retry.after(refused(), t0 + Duration::from_secs(i)).unwrap();
            assert!(
                delay >= expected / 2 && delay <= expected * 3 / 2,
                "{delay:?}"
            );
            expected = (expected * 2).min(MAX_BACKOFF);
        }
        assert_eq!(expected, MAX_BACKOFF);
    }

    #[test]
    fn an_outage_longer_than_the_deadline_gives_up_with_the_last_error() {
        let mut retry = Retry::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(retry.after(refused(), t0).is_ok());
        assert!(retry.after(refused(), t0 + Duration::from_secs(9)).is_ok());
        match retry.after(ClientError::Closed, t0 + Duration::from_secs(10)) {
            Err(ClientError::GaveUp { last, seconds }) => {
                assert!(matches!(*last, ClientError::Closed));
                assert_eq!(seconds, 10.0);
            }
            other => panic!("expected GaveUp, got {other:?}"),
        }
    }

    #[test]
    fn a_success_starts_a_new_outage_and_resets_the_backoff() {
        let mut retry = Retry::new(Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..5 {
            retry.after(refused(), t0).unwrap();
        }
        retry.succeeded();
        let later = t0 + Duration::from_secs(60);
        let delay = retry.after(refused(), later).unwrap();
        assert!(delay <= FIRST_BACKOFF * 3 / 2, "{delay:?}");
        assert!(retry
            .after(refused(), later + Duration::from_secs(9))
            .is_ok());
    }

    #[test]
    fn final_errors_are_not_retried() {
        let mut retry = Retry::new(Duration::from_secs(10));
        let denied = ClientError::Remote(ErrorFrame::new(ErrorCode::NotFound, "no such file"));
        assert!(matches!(
            retry.after(denied, Instant::now()),
            Err(ClientError::Remote(_))
        ));
        let busy = ClientError::Remote(ErrorFrame::new(ErrorCode::Busy, "busy"));
        assert!(retry.after(busy, Instant::now()).is_ok());
    }
}
