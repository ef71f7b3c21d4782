//! `HOST[:PORT]` parsing: `h`, `h:p`, `1.2.3.4:p`, `[::1]:p`, `[::1]`, `::1`.

use xfer_proto::DEFAULT_PORT;

use crate::ClientError;

/// A server to talk to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host name or address, without brackets.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for Target {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self, ClientError> {
        let bad = || ClientError::Target(format!("bad host {s:?}: expected HOST[:PORT]"));
        let port = |p: &str| p.parse::<u16>().map_err(|_| bad());
        if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(bad)?;
            let port = match after {
                "" => DEFAULT_PORT,
                p => port(p.strip_prefix(':').ok_or_else(bad)?)?,
            };
            return Ok(Self {
                host: host.to_string(),
                port,
            });
        }
        match s.matches(':').count() {
            0 if !s.is_empty() => Ok(Self {
                host: s.to_string(),
                port: DEFAULT_PORT,
            }),
            1 => {
                let (host, p) = s.split_once(':').ok_or_else(bad)?;
                if host.is_empty() {
                    return Err(bad());
                }
                Ok(Self {
                    host: host.to_string(),
                    port: port(p)?,
                })
            }
            // A bare IPv6 address.
            n if n > 1 => Ok(Self {
                host: s.to_string(),
                port: DEFAULT_PORT,
            }),
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Target {
        s.parse().unwrap()
    }

    #[test]
    fn targets_parse() {
        assert_eq!(
            t("host"),
            Target {
                host: "host".into(),
                port: 8888
            }
        );
        assert_eq!(
            t("10.0.0.1:9"),
            Target {
                host: "10.0.0.1".into(),
                port: 9
            }
        );
        assert_eq!(
            t("[::1]:7"),
            Target {
                host: "::1".into(),
                port: 7
            }
        );
        assert_eq!(
            t("[::1]"),
            Target {
                host: "::1".into(),
                port: 8888
            }
        );
        assert_eq!(
            t("::1"),
            Target {
                host: "::1".into(),
                port: 8888
            }
        );
        assert_eq!(t("[::1]:7").to_string(), "[::1]:7");
        for bad in ["", ":9", "h:x", "h:70000", "[::1", "[::1]x"] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }
}
