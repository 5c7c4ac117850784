//! Cross-origin access for browser clients (a web UI on another origin): which origins may call
//! the API, checked once at start so that a bad value is refused before the model loads.
use std::time::Duration;

use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderValue, Method};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};
use url::Url;

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

/// `origin` as a browser's `Origin` header has it (the layer compares bytes): parsed by the URL
/// standard browsers follow (host in lower case, IDN in punycode, IP addresses in their canonical
/// form, no default port), and refused where it names more than an origin.
fn serialized_origin(origin: &str) -> Result<HeaderValue, OriginError> {
    let refuse = |reason| OriginError { origin: origin.to_string(), reason };
    let url = Url::parse(origin).map_err(|_| refuse("it does not parse as a URL"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(refuse("the scheme must be http or https"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(refuse("it has a user part"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(refuse("it has a path, query or fragment"));
    }
    HeaderValue::from_str(&url.origin().ascii_serialization()).map_err(|_| refuse("it is not a valid header value"))
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
            ("http://127.1:8080", "http://127.0.0.1:8080"),
            ("https://x:443", "https://x"),
            ("http://x:0081", "http://x:81"),
            ("http://my_host:8080", "http://my_host:8080"),
            ("http://[0:0:0:0:0:0:0:1]:8080", "http://[::1]:8080"),
            ("http://[::ffff:127.0.0.1]", "http://[::ffff:7f00:1]"),
            ("HTTP://bücher.example", "http://xn--bcher-kva.example"),
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
            "http://x#f",
            "http://[::1",
            "http://[::g]",
            "http://x:70000",
        ] {
            let error = serialized(bad).unwrap_err().to_string();
            assert!(error.starts_with(&format!("{bad:?} is not an origin")), "{error}");
        }
        assert!(Cors::parse(&[]).unwrap().is_none());
        assert!(Cors::parse(&["http://x".into(), "*".into()]).unwrap().unwrap().allows_any());
    }
}
