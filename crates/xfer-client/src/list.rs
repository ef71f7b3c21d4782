//! `xfer ls`: a directory listing from the server.

use std::sync::Arc;

use xfer_proto::{Frame, List, ListEntry};

use crate::session::{unexpected, FirstFrames};
use crate::{ClientError, Connector, Session, Target};

/// Lists `dir` (empty for the root) on `target`.
///
/// # Errors
/// Connection failures or the server's refusal (no such directory, bad path).
pub async fn list(
    target: &Target,
    dir: &str,
    connector: &Connector,
) -> Result<Vec<ListEntry>, ClientError> {
    let request = Frame::List(List {
        dir: dir.to_string(),
    });
    // The request goes with the `Auth` where the daemon proves itself early: a round trip
    // sooner than after the `Welcome`.
    let first: FirstFrames = {
        let request = request.clone();
        Arc::new(move |_: &xfer_proto::Welcome| vec![request.clone()])
    };
    let mut session =
        Session::connect_sending(target, connector, 0, &mut None, Some(&first)).await?;
    if !std::mem::take(&mut session.first_sent) {
        session.send(&request).await?;
    }
    let mut entries = Vec::new();
    loop {
        match session.next().await? {
            Frame::Listing(page) => {
                entries.extend(page.entries);
                if !page.more {
                    break;
                }
            }
            other => return Err(unexpected(other)),
        }
    }
    session.close().await;
    Ok(entries)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for nanoseconds since the Unix epoch (UTC, proleptic Gregorian).
pub fn format_utc(mtime_ns: i64) -> String {
    let secs = mtime_ns.div_euclid(1_000_000_000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            format_utc(951_782_400 * 1_000_000_000),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            format_utc(1_795_000_000 * 1_000_000_000 + 5),
            "2026-11-18T11:06:40Z"
        );
        assert_eq!(format_utc(-1_000_000_000), "1969-12-31T23:59:59Z");
    }
}
