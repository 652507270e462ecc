//! HTTP against the hub with nothing the server says trusted: redirects are
//! followed by hand (a `Location` is required, only `http`/`https`, at most
//! [`MAX_REDIRECTS`], and the token goes to the endpoint's own origin only),
//! every read has a timeout (a stalled server is a broken attempt), a body
//! is read up to the size the listing promised and no further (an endless or
//! longer body is refused), and the names a response gives (`ETag`,
//! `X-Repo-Commit`) must be hashes before they become cache paths.

use std::io::Read;

/// Redirects followed for one request.
pub(crate) const MAX_REDIRECTS: usize = 5;

/// An HTTP client for one endpoint and token.
pub(crate) struct Transfer {
    agent: ureq::Agent,
    endpoint_origin: String,
    token: Option<String>,
}

/// The answer to a GET after its redirects: the endpoint's own headers
/// (where the hub puts `ETag`, `X-Linked-Etag` and `X-Repo-Commit`) and the
/// final response.
pub(crate) struct Answer {
    /// The first response's `X-Linked-Etag` or `ETag`.
    pub etag: Option<String>,
    /// The first response's `X-Repo-Commit`.
    pub commit: Option<String>,
    /// The response that carries the body.
    pub response: ureq::Response,
}

/// What went wrong with a request, before the caller names the file.
pub(crate) enum Failure {
    /// The connection failed, timed out or closed early (worth a retry).
    Connection(String),
    /// An HTTP error status (the response, for its error headers).
    Status(Box<ureq::Response>),
    /// An answer that breaks the protocol (not worth a retry).
    Protocol(String),
    /// Writing what arrived failed (a full disk, say).
    Write(std::io::Error),
}

impl Transfer {
    /// A client for `endpoint` (`scheme://host[:port]`), sending `token` to
    /// that origin only.
    pub(crate) fn new(
        endpoint: &str,
        token: Option<String>,
        timeout: std::time::Duration,
    ) -> Transfer {
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout_connect(timeout)
            .timeout_read(timeout)
            .user_agent(&format!("mlx-zoo/{}", env!("CARGO_PKG_VERSION")))
            .build();
        Transfer {
            agent,
            endpoint_origin: origin(endpoint).unwrap_or_default(),
            token,
        }
    }

    /// GETs `url` (from `offset` on, when non-zero), following redirects.
    pub(crate) fn get(&self, url: &str, offset: u64) -> Result<Answer, Failure> {
        let mut url = url.to_string();
        let mut first: Option<(Option<String>, Option<String>)> = None;
        for _ in 0..=MAX_REDIRECTS {
            let url_origin = origin(&url)
                .ok_or_else(|| Failure::Protocol(format!("not an http(s) URL: {url:?}")))?;
            let mut request = self.agent.get(&url);
            if url_origin == self.endpoint_origin {
                if let Some(token) = &self.token {
                    request = request.set("Authorization", &format!("Bearer {token}"));
                }
            }
            if offset > 0 {
                request = request.set("Range", &format!("bytes={offset}-"));
            }
            let response = match request.call() {
                Ok(response) => response,
                Err(ureq::Error::Status(_, response)) => {
                    return Err(Failure::Status(Box::new(response)))
                }
                Err(ureq::Error::Transport(transport)) => {
                    return Err(Failure::Connection(transport.to_string()))
                }
            };
            if first.is_none() {
                let etag = response
                    .header("x-linked-etag")
                    .or_else(|| response.header("etag"))
                    .map(str::to_string);
                let commit = response.header("x-repo-commit").map(str::to_string);
                first = Some((etag, commit));
            }
            if !(300..400).contains(&response.status()) {
                let (etag, commit) = first.unwrap_or_default();
                return Ok(Answer {
                    etag,
                    commit,
                    response,
                });
            }
            let location = response.header("location").ok_or_else(|| {
                Failure::Protocol(format!(
                    "HTTP {} redirect from {url} without a Location header",
                    response.status()
                ))
            })?;
            url = resolve(&url, location)
                .ok_or_else(|| Failure::Protocol(format!("a redirect to {location:?}")))?;
        }
        Err(Failure::Protocol(format!(
            "more than {MAX_REDIRECTS} redirects (last to {url})"
        )))
    }
}

/// Reads `response`'s body into `sink`, at most `limit` bytes: more is an
/// error (a body longer than promised, or one that never ends), and so is a
/// body that stops before its `Content-Length`. Calls `progress` with each
/// chunk's size; returns the bytes read.
pub(crate) fn read_body(
    response: ureq::Response,
    limit: u64,
    sink: &mut dyn std::io::Write,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, Failure> {
    let announced: Option<u64> = response
        .header("content-length")
        .and_then(|v| v.trim().parse().ok());
    if let Some(announced) = announced {
        if announced > limit {
            return Err(Failure::Protocol(format!(
                "the server announces {announced} bytes, more than the {limit} expected"
            )));
        }
    }
    // One byte past the limit tells "longer than promised" from "exactly".
    let mut reader = response.into_reader().take(limit.saturating_add(1));
    let mut buffer = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(error) => return Err(Failure::Connection(error.to_string())),
        };
        total += n as u64;
        if total > limit {
            return Err(Failure::Protocol(format!(
                "the body runs past the {limit} bytes expected"
            )));
        }
        sink.write_all(&buffer[..n]).map_err(Failure::Write)?;
        progress(n as u64);
    }
    if announced.is_some_and(|announced| total < announced) {
        return Err(Failure::Connection(
            "the connection closed before the whole file arrived".into(),
        ));
    }
    Ok(total)
}

/// `scheme://host[:port]` of an http(s) URL, lower-cased.
fn origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    // Credentials in the URL are not part of the origin.
    let host = authority.rsplit('@').next().unwrap_or_default();
    if host.is_empty() {
        return None;
    }
    Some(format!("{scheme}://{}", host.to_ascii_lowercase()))
}

/// `location` relative to `base` (absolute, scheme-relative or absolute
/// path; other relative forms are resolved against the base's folder).
fn resolve(base: &str, location: &str) -> Option<String> {
    let location = location.trim();
    if location.contains("://") {
        return origin(location).map(|_| location.to_string());
    }
    let base_origin = origin(base)?;
    if let Some(rest) = location.strip_prefix("//") {
        let scheme = base_origin.split("://").next()?;
        return Some(format!("{scheme}://{rest}"));
    }
    if location.starts_with('/') {
        return Some(format!("{base_origin}{location}"));
    }
    let path_start = base_origin.len();
    let path = base.get(path_start..).unwrap_or("/");
    let folder = match path.rfind('/') {
        Some(index) => &path[..=index],
        None => "/",
    };
    Some(format!("{base_origin}{folder}{location}"))
}

/// The hash an `ETag` names: quotes and a weak `W/` prefix removed; `None`
/// unless it is a git blob id (40 hex digits) or a SHA-256 (64), the only
/// names the cache gives blobs.
pub(crate) fn blob_name(etag: &str) -> Option<String> {
    let etag = etag.trim();
    let etag = etag.strip_prefix("W/").unwrap_or(etag).trim_matches('"');
    let hex = etag.bytes().all(|b| b.is_ascii_hexdigit());
    (hex && (etag.len() == 40 || etag.len() == 64)).then(|| etag.to_ascii_lowercase())
}

/// Whether `file` (a name from the listing) stays inside the folder it is
/// joined to: relative, `/`-separated, no empty, `.` or `..` component, no
/// backslash or NUL.
pub(crate) fn is_safe_relative_path(file: &str) -> bool {
    !file.is_empty()
        && !file.starts_with('/')
        && !file.contains(['\\', '\0'])
        && file
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_and_redirect_targets() {
        assert_eq!(
            origin("https://HF.co:443/a/b?x").as_deref(),
            Some("https://hf.co:443")
        );
        assert_eq!(
            origin("http://user:pw@h:1/x").as_deref(),
            Some("http://h:1")
        );
        assert_eq!(origin("file:///etc/passwd"), None);
        assert_eq!(origin("http:///x"), None);
        let base = "http://127.0.0.1:8/org/m/resolve/abc/w.safetensors";
        assert_eq!(
            resolve(base, "/cdn/blob").as_deref(),
            Some("http://127.0.0.1:8/cdn/blob")
        );
        assert_eq!(
            resolve(base, "other").as_deref(),
            Some("http://127.0.0.1:8/org/m/resolve/abc/other")
        );
        assert_eq!(
            resolve(base, "//cdn.example/x").as_deref(),
            Some("http://cdn.example/x")
        );
        assert_eq!(resolve(base, "ftp://x/y"), None);
    }

    #[test]
    fn only_hashes_name_blobs() {
        let sha = "a".repeat(64);
        assert_eq!(blob_name(&format!("\"{sha}\"")), Some(sha.clone()));
        assert_eq!(
            blob_name(&format!("W/\"{}\"", "B".repeat(40))),
            Some("b".repeat(40))
        );
        for bad in ["../../etc/x", "\"abc\"", "", &"g".repeat(64), "aa/bb"] {
            assert_eq!(blob_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn listed_names_stay_inside() {
        for good in ["config.json", "onnx/model.onnx", "a.b/c..d"] {
            assert!(is_safe_relative_path(good), "{good}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a\\b",
            "a\0b",
        ] {
            assert!(!is_safe_relative_path(bad), "{bad:?}");
        }
    }
}
