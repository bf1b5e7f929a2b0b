//! The client side of the control API: one request, one response, over the Unix socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::Value;

use super::http::parse_head;
use super::{ApiError, ApiResponse};

/// Responses larger than this are refused; a status body is a few KiB.
const MAX_RESPONSE_BYTES: u64 = 16 << 20;

/// Sends `method path` with an optional JSON `body` to the API at `socket` and returns the
/// status and JSON body (`Null` when there is none). An HTTP error status is a response,
/// not an `Err`. Waits as long as the server takes: a snapshot takes seconds.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<ApiResponse, ApiError> {
    if method.is_empty() || method.bytes().any(|b| !b.is_ascii_uppercase()) {
        return Err(ApiError::BadRequest(format!("method {method:?}")));
    }
    if !path.starts_with('/')
        || path
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(ApiError::BadRequest(format!("path {path:?}")));
    }
    let exchange = |source| ApiError::Exchange {
        socket: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ApiError::Connect {
        socket: socket.to_owned(),
        source,
    })?;

    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut message = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Connection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        message.push_str("Content-Type: application/json\r\n");
    }
    message.push_str("\r\n");
    message.push_str(&body);
    stream.write_all(message.as_bytes()).map_err(exchange)?;

    // The server closes the connection after its response.
    let mut raw = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE_BYTES + 1)
        .read_to_end(&mut raw)
        .map_err(exchange)?;
    parse_response(&raw).map_err(|reason| ApiError::BadResponse {
        socket: socket.to_owned(),
        reason,
    })
}

/// Parses a complete response; the error says what is wrong with it.
fn parse_response(raw: &[u8]) -> Result<ApiResponse, String> {
    if raw.len() as u64 > MAX_RESPONSE_BYTES {
        return Err(format!("longer than {MAX_RESPONSE_BYTES} bytes"));
    }
    if raw.is_empty() {
        return Err("the server closed the connection without answering".into());
    }
    let head = parse_head(raw)
        .map_err(|e| e.to_string())?
        .ok_or("the response ends inside its headers")?;
    let mut parts = head.first_line.splitn(3, ' ');
    let status = match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code.parse::<u16>().ok(),
        _ => None,
    }
    .filter(|s| (100..600).contains(s))
    .ok_or_else(|| format!("malformed status line {:?}", head.first_line))?;
    let rest = &raw[head.len..];
    let body = match head.content_length().map_err(|e| e.to_string())? {
        Some(n) => rest.get(..n as usize).ok_or_else(|| {
            format!(
                "the body ended after {} of {n} bytes (Content-Length)",
                rest.len()
            )
        })?,
        None => rest,
    };
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(body).map_err(|e| {
            format!(
                "the body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            )
        })?
    };
    Ok(ApiResponse { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_responses() {
        let r = parse_response(
            b"HTTP/1.1 409 Conflict\r\nContent-Type: application/json\r\nContent-Length: 23\r\n\r\n{\"error\":\"not paused\"}\n",
        )
        .unwrap();
        assert_eq!(r.status, 409);
        assert_eq!(r.error_message(), Some("not paused"));
        let r = parse_response(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n").unwrap();
        assert_eq!(r, ApiResponse::no_content());
    }

    #[test]
    fn refuses_broken_responses() {
        for (raw, want) in [
            (&b""[..], "without answering"),
            (b"HTTP/1.1 200 OK\r\n", "inside its headers"),
            (b"SSH-2.0-OpenSSH\r\n\r\n", "malformed status line"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}",
                "after 2 of 9",
            ),
            (b"HTTP/1.1 200 OK\r\n\r\n<html>", "not JSON"),
        ] {
            let e = parse_response(raw).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn names_the_socket_it_cannot_reach() {
        let e = request(Path::new("/nonexistent/api.sock"), "GET", "/vm", None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot connect to /nonexistent/api.sock: "),
            "{e}"
        );
        let e = request(Path::new("/x"), "GET", "vm", None).unwrap_err();
        assert_eq!(e.to_string(), "invalid request: path \"vm\"");
    }
}
