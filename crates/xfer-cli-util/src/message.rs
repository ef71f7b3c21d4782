//! An error as the one line a command prints when it fails.

/// `error` and its causes joined by `: ` on one line, newlines flattened. A cause whose text
/// its effect already ends with is said once: many errors print their source in their own
/// message (`opening "a/f": Permission denied`) and hand it on as their cause as well.
pub fn one_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let text = e.to_string();
        if !line.ends_with(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        next = e.source();
    }
    line.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("opening {name:?}: {source}")]
    struct Opening {
        name: &'static str,
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("copying the tree")]
    struct Copying(#[source] Opening);

    #[test]
    fn a_cause_already_said_is_not_said_again() {
        let denied = || std::io::Error::from_raw_os_error(13);
        let opening = Opening {
            name: "a/f2",
            source: denied(),
        };
        let want = format!("opening \"a/f2\": {}", denied());
        assert_eq!(one_line(&opening), want);
        assert_eq!(
            one_line(&Copying(opening)),
            format!("copying the tree: {want}")
        );
    }

    #[test]
    fn a_message_over_several_lines_becomes_one() {
        let e = std::io::Error::other("first\nsecond");
        assert_eq!(one_line(&e), "first second");
    }
}
