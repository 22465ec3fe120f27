//! `send_socket` and `send_http`: the ad-hoc senders.

use crate::delivery::{sync, Target};
use crate::error::EmitError;
use crate::interrupts;
use crate::options::{self, Framing, OptionError};
use crate::settings;
use crate::transport::http::{self, UrlError};
use pgrx::prelude::*;

fn bad(func: &'static str, source: OptionError) -> ! {
    EmitError::Argument { func, source }.raise()
}

fn check_size(func: &str, len: usize) {
    let limit = settings::max_message_bytes();
    if len > limit {
        EmitError::TooLarge {
            context: func.to_string(),
            size: len,
            limit,
        }
        .raise();
    }
}

/// `send_socket(msg, host, port)`: connect, write `msg`, close.
///
/// Returns 1 when every byte was written and 0 when delivery failed (with a
/// WARNING saying why). STRICT: any NULL argument gives NULL.
#[pg_extern(volatile, parallel_unsafe)]
fn send_socket(msg: &str, host: &str, port: i32) -> i32 {
    options::check_host(host).unwrap_or_else(|e| bad("send_socket", e));
    let port = options::check_port(port).unwrap_or_else(|e| bad("send_socket", e));
    check_size("send_socket", msg.len());
    let target = Target::Tcp {
        host: host.to_string(),
        port,
        framing: Framing::Close,
    };
    match sync::try_send(&target, msg.as_bytes(), &interrupts::Statement) {
        Ok(()) => 1,
        Err(f) => {
            sync::report(f, &|| "send_socket".to_string(), &target.name());
            0
        }
    }
}

/// `send_http(url, body [, method, content_type, headers])`: one request.
///
/// Returns the response status, whatever it is (a 500 is an answer), and
/// 0 with a WARNING when no response came (refused, timeout, DNS, TLS).
/// Redirects are not followed. NULL `url` or `body` gives NULL.
#[pg_extern(volatile, parallel_unsafe)]
fn send_http(
    url: Option<&str>,
    body: Option<&str>,
    method: default!(&str, "'POST'"),
    content_type: default!(&str, "'application/json'"),
    headers: default!(Option<pgrx::JsonB>, "NULL"),
) -> Option<i32> {
    let (url, body) = (url?, body?);
    let url_err = |e: UrlError| -> ! { bad("send_http", OptionError::Url(e)) };
    let parsed = http::parse_url(url).unwrap_or_else(|e| url_err(e));
    http::check_method(method).unwrap_or_else(|e| url_err(e));
    if content_type.chars().any(char::is_control) {
        url_err(UrlError::ContentType(content_type.to_string()));
    }
    let headers = header_pairs(headers).unwrap_or_else(|e| url_err(e));
    check_size("send_http", body.len());
    match sync::http_request(
        &parsed.url,
        method,
        content_type,
        &headers,
        body.as_bytes(),
        &interrupts::Statement,
    ) {
        Ok(resp) => Some(i32::from(resp.status)),
        Err(f) => {
            sync::report(f, &|| "send_http".to_string(), url);
            Some(0)
        }
    }
}

/// `{"Name": "value", ...}` → header pairs, each validated.
fn header_pairs(headers: Option<pgrx::JsonB>) -> Result<Vec<(String, String)>, UrlError> {
    let Some(pgrx::JsonB(value)) = headers else {
        return Ok(Vec::new());
    };
    let obj = value
        .as_object()
        .ok_or_else(|| UrlError::Header(value.to_string()))?;
    obj.iter()
        .map(|(k, v)| {
            let v = v
                .as_str()
                .ok_or_else(|| UrlError::Header(format!("{k}: {v}")))?;
            http::check_header(k, v)?;
            Ok((k.clone(), v.to_string()))
        })
        .collect()
}
