//! The HTTP responses an l7 service sends a client it does not forward:
//! an error status, `Connection: close` and a one-line plain-text body;
//! the switch sends it and closes the connection.

/// The reason phrase of the statuses layer 7 answers with.
pub fn status_text(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// The whole response for `status`, with `reason` as its body.
pub fn error_response(status: u16, reason: &str) -> Vec<u8> {
    let body = format!("{status} {}: {reason}\n", status_text(status));
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        status_text(status),
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_is_exact() {
        assert_eq!(
            String::from_utf8(error_response(503, "no backend available")).unwrap(),
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 46\r\nConnection: close\r\n\r\n503 Service Unavailable: no backend available\n"
        );
        let r = error_response(431, "request head too large");
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut resp = httparse::Response::new(&mut headers);
        let n = match resp.parse(&r).unwrap() {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial => panic!("partial"),
        };
        assert_eq!(resp.code, Some(431));
        assert_eq!(resp.reason, Some("Request Header Fields Too Large"));
        let body = &r[n..];
        assert_eq!(
            body,
            b"431 Request Header Fields Too Large: request head too large\n"
        );
        assert_eq!(resp.headers[1].value, body.len().to_string().as_bytes());
    }
}
