//! `send_socket(msg, host, port)`: the ad-hoc sender.

use crate::delivery::sync;
use crate::error::EmitError;
use crate::options::{self, Framing, OptionError};
use crate::settings;
use pgrx::prelude::*;

/// `send_socket(msg, host, port)`: connect, write `msg`, close.
///
/// Returns 1 when every byte was written and 0 when delivery failed (with a
/// WARNING saying why). STRICT: any NULL argument gives NULL.
#[pg_extern(volatile, parallel_unsafe)]
fn send_socket(msg: &str, host: &str, port: i32) -> i32 {
    let bad = |source: OptionError| -> ! {
        EmitError::Argument {
            func: "send_socket",
            source,
        }
        .raise()
    };
    options::check_host(host).unwrap_or_else(|e| bad(e));
    let port = options::check_port(port).unwrap_or_else(|e| bad(e));
    let limit = settings::max_message_bytes();
    if msg.len() > limit {
        EmitError::TooLarge {
            context: "send_socket".into(),
            size: msg.len(),
            limit,
        }
        .raise();
    }
    i32::from(sync::deliver(
        &|| "send_socket".to_string(),
        host,
        port,
        msg.as_bytes(),
        Framing::Close,
    ))
}
