//! Cross-origin access for browser clients (a web UI on another origin): which origins may call
//! the API, checked once at start so that a bad value is refused before the model loads.
use std::net::Ipv6Addr;
use std::time::Duration;

use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderValue, Method};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

/// The origins browsers may call the API from.
#[derive(Debug, Clone)]
pub struct Cors {
    origins: AllowOrigin,
    any: bool,
}

/// An origin that is not `*` or `scheme://host[:port]`.
#[derive(Debug, thiserror::Error)]
#[error("{origin:?} is not an origin: {reason} (scheme://host[:port], or * for any)")]
pub struct OriginError {
    origin: String,
    reason: &'static str,
}

impl Cors {
    /// `origins` as `--cors-origin` gives them: `*` for any, else each `scheme://host[:port]`,
    /// written as browsers send it (host in lower case, no default port). None allows no other
    /// origin (browsers then refuse to read the answers).
    pub fn parse(origins: &[String]) -> Result<Option<Cors>, OriginError> {
        if origins.is_empty() {
            return Ok(None);
        }
        if origins.iter().any(|origin| origin == "*") {
            return Ok(Some(Cors { origins: AllowOrigin::any(), any: true }));
        }
        let values = origins.iter().map(|origin| serialized_origin(origin)).collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Cors { origins: AllowOrigin::list(values), any: false }))
    }

    /// Whether any origin may call.
    pub fn allows_any(&self) -> bool {
        self.any
    }

    /// The layer that answers preflight requests and marks answers readable by the allowed origins.
    /// Preflights carry no credentials, so it sits outside the API key check.
    pub fn layer(&self) -> CorsLayer {
        CorsLayer::new()
            .allow_origin(self.origins.clone())
            .allow_methods([Method::GET, Method::POST])
            // OpenAI's browser SDK sends headers of its own (x-stainless-*): whatever a preflight asks.
            .allow_headers(AllowHeaders::mirror_request())
            // A 429's advice, which browsers hide from scripts unless exposed.
            .expose_headers([RETRY_AFTER])
            .max_age(Duration::from_secs(600))
    }
}

/// `origin` as a browser's `Origin` header has it (the layer compares bytes): `http` or `https`,
/// the host in lower case (an IPv6 address compressed), the port only where it is not the
/// scheme's default; a trailing `/` is dropped.
fn serialized_origin(origin: &str) -> Result<HeaderValue, OriginError> {
    let refuse = |reason| OriginError { origin: origin.to_string(), reason };
    let lower = origin.to_ascii_lowercase();
    let lower = lower.strip_suffix('/').unwrap_or(&lower);
    let (scheme, rest, default_port) = if let Some(rest) = lower.strip_prefix("http://") {
        ("http", rest, "80")
    } else if let Some(rest) = lower.strip_prefix("https://") {
        ("https", rest, "443")
    } else {
        return Err(refuse("the scheme must be http or https"));
    };
    // An IPv6 address is bracketed: its colons are not the port's.
    let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        let (address, after) = bracketed.split_once(']').ok_or_else(|| refuse("an IPv6 address lacks its ']'"))?;
        let address: Ipv6Addr = address.parse().map_err(|_| refuse("the IPv6 address does not parse"))?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or_else(|| refuse("it has a path, query or user part"))?),
        };
        (format!("[{address}]"), port)
    } else {
        let (host, port) = match rest.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        };
        let name_like = |c: char| c.is_ascii_alphanumeric() || c == '.' || c == '-';
        if host.is_empty() || !host.chars().all(name_like) {
            return Err(refuse("it has no host, or a path, query or user part"));
        }
        (host.to_string(), port)
    };
    let port = match port {
        None => None,
        Some(port) => {
            let digits = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
            let number =
                port.parse::<u16>().ok().filter(|_| digits).ok_or_else(|| refuse("the port is not 0-65535"))?;
            Some(number.to_string()).filter(|port| port != default_port)
        }
    };
    let serialized = match port {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    };
    HeaderValue::from_str(&serialized).map_err(|_| refuse("it is not a valid header value"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_written_as_browsers_send_them() {
        let serialized = |origin: &str| serialized_origin(origin).map(|v| v.to_str().unwrap().to_string());
        for (given, sent) in [
            ("http://localhost:3000", "http://localhost:3000"),
            ("https://UI.Example.com/", "https://ui.example.com"),
            ("http://127.0.0.1:80", "http://127.0.0.1"),
            ("https://x:443", "https://x"),
            ("http://x:0081", "http://x:81"),
            ("http://x:8080", "http://x:8080"),
            ("http://[0:0:0:0:0:0:0:1]:8080", "http://[::1]:8080"),
            ("HTTP://[::1]", "http://[::1]"),
        ] {
            assert_eq!(serialized(given).unwrap(), sent, "{given}");
        }
        for bad in [
            "",
            "localhost:3000",
            "ftp://x",
            "http://",
            "http://x/path",
            "http://x:port",
            "http://x:+80",
            "http://u@x",
            "http://x?q",
            "http://[::1",
            "http://[::g]",
            "http://[::1]x",
            "http://x:70000",
        ] {
            let error = serialized(bad).unwrap_err().to_string();
            assert!(error.starts_with(&format!("{bad:?} is not an origin")), "{error}");
        }
        assert!(Cors::parse(&[]).unwrap().is_none());
        assert!(Cors::parse(&["http://x".into(), "*".into()]).unwrap().unwrap().allows_any());
    }
}
