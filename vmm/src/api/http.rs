//! The little HTTP/1.1 the API needs: parse one request from bytes, write one response.
//!
//! Only what a control socket needs: a request line, headers, and a `Content-Length` body,
//! with hard limits on each. No chunked encoding, no keep-alive, no `100 Continue`. The
//! parser works on a byte buffer the caller keeps filling, so it is tested without sockets
//! and the caller owns the timeouts.

use std::io::{self, Write};

use serde_json::Value;

/// The request line and headers together may not exceed this.
pub const MAX_HEAD_BYTES: usize = 8 << 10;
/// A request body may not exceed this.
pub const MAX_BODY_BYTES: usize = 64 << 10;

/// A request that could not be read; [`HttpError::status`] is the status to answer with.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The peer sent nothing before closing; there is no one to answer.
    #[error("the client closed the connection without sending a request")]
    Closed,
    /// The peer closed in the middle of a request.
    #[error("the request ended after {got} bytes, before {wanted}")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// What was still expected.
        wanted: &'static str,
    },
    /// The request was not complete in time.
    #[error("no complete request within {secs} s")]
    Timeout {
        /// The limit, in seconds.
        secs: u64,
    },
    /// Reading the connection failed.
    #[error("reading the request failed: {0}")]
    Io(#[source] io::Error),
    /// The request line and headers are too long.
    #[error("the request line and headers exceed {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    /// The declared body is too long.
    #[error("the body is {length} bytes; the limit is {MAX_BODY_BYTES}")]
    BodyTooLarge {
        /// The declared `Content-Length`.
        length: u64,
    },
    /// The request line is not `METHOD TARGET HTTP/1.x`.
    #[error("malformed request line {0:?}: expected `METHOD /path HTTP/1.1`")]
    BadRequestLine(String),
    /// An HTTP version other than 1.0 or 1.1.
    #[error("HTTP version {0:?} is not supported; use HTTP/1.1")]
    BadVersion(String),
    /// A header line is not `Name: value`.
    #[error("malformed header line {0:?}")]
    BadHeader(String),
    /// `Content-Length` is not a number, or two of them disagree.
    #[error("invalid Content-Length {0:?}")]
    BadContentLength(String),
    /// A `Transfer-Encoding` (chunked) body.
    #[error("Transfer-Encoding {0:?} is not supported; send the body with a Content-Length")]
    TransferEncoding(String),
}

impl HttpError {
    /// The status to answer this error with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Timeout { .. } => 408,
            HttpError::HeadTooLarge => 431,
            HttpError::BodyTooLarge { .. } => 413,
            HttpError::BadVersion(_) => 505,
            HttpError::TransferEncoding(_) => 501,
            HttpError::Io(_) => 500,
            HttpError::Closed
            | HttpError::Truncated { .. }
            | HttpError::BadRequestLine(_)
            | HttpError::BadHeader(_)
            | HttpError::BadContentLength(_) => 400,
        }
    }
}

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method, as sent (methods are case-sensitive).
    pub method: String,
    /// The path, without a query string or an absolute-form `http://host` prefix.
    pub path: String,
    /// Headers in order, names lowercased, values trimmed.
    pub headers: Vec<(String, String)>,
    /// The body (empty without a `Content-Length`).
    pub body: Vec<u8>,
}

impl Request {
    /// The first header called `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A message head split into its first line and headers.
pub(crate) struct Head {
    /// The request or status line.
    pub first_line: String,
    /// Headers in order, names lowercased, values trimmed.
    pub headers: Vec<(String, String)>,
    /// Bytes the head took, including the blank line.
    pub len: usize,
}

impl Head {
    /// The message's `Content-Length`, if any; repeated equal values are allowed.
    pub fn content_length(&self) -> Result<Option<u64>, HttpError> {
        let mut length = None;
        for (_, v) in self.headers.iter().filter(|(n, _)| n == "content-length") {
            let n: u64 = v
                .parse()
                .map_err(|_| HttpError::BadContentLength(v.clone()))?;
            if length.is_some_and(|l| l != n) {
                return Err(HttpError::BadContentLength(v.clone()));
            }
            length = Some(n);
        }
        Ok(length)
    }
}

/// Splits the head off `buf`: `Ok(None)` until the blank line that ends it has arrived.
/// Lines end in CRLF; a bare LF is accepted too.
pub(crate) fn parse_head(buf: &[u8]) -> Result<Option<Head>, HttpError> {
    let mut lines = Vec::new();
    let mut start = 0;
    let mut len = None;
    for (i, _) in buf.iter().enumerate().filter(|(_, &b)| b == b'\n') {
        let line = &buf[start..i];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        start = i + 1;
        if line.is_empty() {
            // Leading blank lines before a request line are allowed (RFC 9112 2.2).
            if lines.is_empty() {
                continue;
            }
            len = Some(start);
            break;
        }
        lines.push(line);
    }
    let Some(len) = len else {
        return if buf.len() > MAX_HEAD_BYTES {
            Err(HttpError::HeadTooLarge)
        } else {
            Ok(None)
        };
    };
    if len > MAX_HEAD_BYTES {
        return Err(HttpError::HeadTooLarge);
    }
    let mut lines = lines.into_iter();
    let first = lines.next().unwrap_or_default();
    let first_line = String::from_utf8(first.to_vec())
        .map_err(|_| HttpError::BadRequestLine(String::from_utf8_lossy(first).into_owned()))?;
    let mut headers = Vec::new();
    for line in lines {
        let text = std::str::from_utf8(line)
            .map_err(|_| HttpError::BadHeader(String::from_utf8_lossy(line).into_owned()))?;
        let bad = || HttpError::BadHeader(text.to_owned());
        let (name, value) = text.split_once(':').ok_or_else(bad)?;
        // No space before the colon, no obsolete line folding (RFC 9112 5.1, 5.2).
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return Err(bad());
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    Ok(Some(Head {
        first_line,
        headers,
        len,
    }))
}

/// Parses a request from the bytes received so far: `Ok(None)` until it is complete.
/// Bytes after the body are ignored (one request per connection).
pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, HttpError> {
    let Some(head) = parse_head(buf)? else {
        return Ok(None);
    };
    let (method, path) = parse_request_line(&head.first_line)?;
    if let Some((_, te)) = head.headers.iter().find(|(n, _)| n == "transfer-encoding") {
        return Err(HttpError::TransferEncoding(te.clone()));
    }
    let length = head.content_length()?.unwrap_or(0);
    if length > MAX_BODY_BYTES as u64 {
        return Err(HttpError::BodyTooLarge { length });
    }
    // Bounded by MAX_BODY_BYTES above.
    let end = head.len + length as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some(Request {
        method,
        path,
        body: buf[head.len..end].to_vec(),
        headers: head.headers,
    }))
}

/// What is still missing from a partial request, for [`HttpError::Truncated`].
pub fn missing_part(buf: &[u8]) -> &'static str {
    match parse_head(buf) {
        Ok(Some(_)) => "the end of the body",
        _ => "the end of the headers",
    }
}

fn parse_request_line(line: &str) -> Result<(String, String), HttpError> {
    let bad = || HttpError::BadRequestLine(line.to_owned());
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(bad());
    }
    match version {
        "HTTP/1.1" | "HTTP/1.0" => {}
        v if v.starts_with("HTTP/") => return Err(HttpError::BadVersion(v.to_owned())),
        _ => return Err(bad()),
    }
    // Absolute form (`http://localhost/vm`) is what some clients send to a proxy-less URL.
    let target = match target.strip_prefix("http://") {
        Some(rest) => &rest[rest.find('/').ok_or_else(bad)?..],
        None => target,
    };
    if !target.starts_with('/') || target.bytes().any(|b| b.is_ascii_control()) {
        return Err(bad());
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Ok((method.to_owned(), path.to_owned()))
}

/// RFC 9110 5.6.2 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The reason phrase for the statuses the API uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// Writes a complete response and flushes it. The body is JSON followed by a newline;
/// a 204 has neither body nor body headers. The connection is closed afterwards.
pub fn write_response(
    w: &mut impl Write,
    status: u16,
    body: &Value,
    extra_headers: &[(&str, &str)],
) -> io::Result<()> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    let body = if status == 204 {
        String::new()
    } else {
        let body = format!("{body}\n");
        out.push_str("Content-Type: application/json\r\n");
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
        body
    };
    out.push_str("Connection: close\r\n");
    for (name, value) in extra_headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(&body);
    w.write_all(out.as_bytes())?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Option<Request>, HttpError> {
        parse_request(s.as_bytes())
    }

    #[test]
    fn parses_a_get() {
        let r = parse("GET /vm HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/vm");
        assert_eq!(r.header("host"), Some("localhost"));
        assert!(r.body.is_empty());
    }

    #[test]
    fn parses_a_body_with_bare_lf_and_strips_query_and_absolute_form() {
        let r =
            parse("PUT http://localhost/snapshot?x=1 HTTP/1.0\nContent-Length: 4\n\n{}\r\nextra")
                .unwrap()
                .unwrap();
        assert_eq!(r.path, "/snapshot");
        assert_eq!(r.body, b"{}\r\n");
    }

    #[test]
    fn waits_for_the_head_and_the_body() {
        assert!(parse("GET /vm HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        assert!(
            parse("PUT /snapshot HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"dir\"")
                .unwrap()
                .is_none()
        );
        assert_eq!(
            missing_part(b"PUT / HTTP/1.1\r\n"),
            "the end of the headers"
        );
        assert_eq!(
            missing_part(b"PUT / HTTP/1.1\r\nContent-Length: 3\r\n\r\n"),
            "the end of the body"
        );
    }

    #[test]
    fn refuses_malformed_request_lines() {
        for line in [
            "GET /vm",
            "GET  /vm HTTP/1.1",
            "GET /vm HTTP/1.1 x",
            "G(T /vm HTTP/1.1",
            "GET vm HTTP/1.1",
            "GET /vm FTP/1.0",
            "GET http://localhost HTTP/1.1",
        ] {
            let e = parse(&format!("{line}\r\n\r\n")).unwrap_err();
            assert!(matches!(e, HttpError::BadRequestLine(_)), "{line}: {e}");
            assert_eq!(e.status(), 400);
            assert!(e.to_string().contains(line), "{e}");
        }
        let e = parse("GET /vm HTTP/2.0\r\n\r\n").unwrap_err();
        assert_eq!(e.status(), 505);
        let e = parse_request(b"GET /\xff HTTP/1.1\r\n\r\n").unwrap_err();
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn refuses_malformed_headers() {
        for header in ["NoColon", "Bad Name: x", " folded: x", ": empty"] {
            let e = parse(&format!("GET /vm HTTP/1.1\r\n{header}\r\n\r\n")).unwrap_err();
            assert!(matches!(e, HttpError::BadHeader(_)), "{header:?}: {e}");
            assert!(e.to_string().contains(header.trim()), "{e}");
        }
    }

    #[test]
    fn checks_content_length() {
        let e = parse("PUT /vm/pause HTTP/1.1\r\nContent-Length: -1\r\n\r\n").unwrap_err();
        assert_eq!(e.to_string(), "invalid Content-Length \"-1\"");
        let e = parse("PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab")
            .unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(
            parse("PUT / HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\nab")
                .unwrap()
                .is_some()
        );
        let e = parse(&format!(
            "PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        ))
        .unwrap_err();
        assert_eq!(e.status(), 413);
        assert!(e.to_string().contains("65537"), "{e}");
        let e = parse("PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap_err();
        assert_eq!(e.status(), 501);
    }

    #[test]
    fn limits_the_head() {
        let long = format!("GET /vm HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(parse(&long).unwrap_err().status(), 431);
        assert_eq!(
            parse(&format!("{long}\r\n")).unwrap_err().status(),
            431,
            "a complete but oversized head"
        );
    }

    #[test]
    fn writes_json_responses() {
        let mut out = Vec::new();
        write_response(
            &mut out,
            405,
            &serde_json::json!({"error": "x"}),
            &[("Allow", "PUT")],
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: application/json\r\n\
             Content-Length: 14\r\nConnection: close\r\nAllow: PUT\r\n\r\n{\"error\":\"x\"}\n"
        );
        let mut out = Vec::new();
        write_response(&mut out, 204, &Value::Null, &[]).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
        );
    }
}
