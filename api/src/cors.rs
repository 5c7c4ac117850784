//! Cross-origin access for browser clients (a web UI on another origin): which origins may call
//! the API, checked once at start so that a bad value is refused before the model loads.
use std::time::Duration;

use axum::http::{HeaderValue, Method};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

/// The origins browsers may call the API from.
#[derive(Debug, Clone)]
pub struct Cors {
    origins: AllowOrigin,
}

impl Cors {
    /// `origins` as `--cors-origin` gives them: `*` for any, else each `scheme://host[:port]`.
    /// None allows no other origin (browsers then refuse to read the answers).
    pub fn parse(origins: &[String]) -> Result<Option<Cors>, String> {
        if origins.is_empty() {
            return Ok(None);
        }
        if origins.iter().any(|origin| origin == "*") {
            return Ok(Some(Cors { origins: AllowOrigin::any() }));
        }
        let values = origins.iter().map(|origin| parse_origin(origin)).collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Cors { origins: AllowOrigin::list(values) }))
    }

    /// The layer that answers preflight requests and marks answers readable by the allowed origins.
    /// Preflights carry no credentials, so it sits outside the API key check.
    pub fn layer(&self) -> CorsLayer {
        CorsLayer::new()
            .allow_origin(self.origins.clone())
            .allow_methods([Method::GET, Method::POST])
            // OpenAI's browser SDK sends headers of its own (x-stainless-*): whatever a preflight asks.
            .allow_headers(AllowHeaders::mirror_request())
            .max_age(Duration::from_secs(600))
    }
}

/// An origin as browsers send it: `http` or `https`, a host, maybe a port, nothing after.
fn parse_origin(origin: &str) -> Result<HeaderValue, String> {
    let refuse =
        |why: &str| format!("--cors-origin {origin:?}: {why} (an origin is scheme://host[:port], or * for any)");
    let rest = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .ok_or_else(|| refuse("the scheme must be http or https"))?;
    // An IPv6 address is bracketed: its colons are not the port's.
    let host_end = if rest.starts_with('[') { rest.find(']').map_or(rest.len(), |end| end + 1) } else { 0 };
    let (host, port) = match rest[host_end..].find(':') {
        Some(colon) => (&rest[..host_end + colon], Some(&rest[host_end + colon + 1..])),
        None => (rest, None),
    };
    let name = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '.' || c == '-' || (name != host && c == ':');
    if name.is_empty() || !name.chars().all(allowed) {
        return Err(refuse("it has no host, or a path, query or user part"));
    }
    if port.is_some_and(|port| port.parse::<u16>().is_err()) {
        return Err(refuse("the port is not a number from 0 to 65535"));
    }
    HeaderValue::from_str(origin).map_err(|_| refuse("it is not a valid header value"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked() {
        let check = |origin: &str, ok: bool| {
            let parsed = Cors::parse(&[origin.to_string()]);
            assert_eq!(parsed.is_ok(), ok, "{origin}: {parsed:?}");
            if let Err(message) = parsed {
                assert!(message.contains(&format!("--cors-origin {origin:?}")), "{message}");
            }
        };
        for good in ["*", "http://localhost:3000", "https://example.com", "http://127.0.0.1", "http://[::1]:8080"] {
            check(good, true);
        }
        for bad in
            ["", "localhost:3000", "ftp://x", "http://", "http://x/path", "http://x:port", "http://u@x", "http://x?q"]
        {
            check(bad, false);
        }
        assert!(Cors::parse(&[]).unwrap().is_none());
    }
}
