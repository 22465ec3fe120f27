//! `pg_emit.*` settings.
//!
//! Every setting a backend reads is superuser-only (`SUSET`): triggers run
//! in the writer's session, so a writer who could `SET` one could change
//! how the DBA's trigger delivers — make a sync trigger async (which once
//! ran privileged code under the writer's search_path), make delivery fail
//! on purpose (a 1 ms timeout, a day-long cooldown), or turn an outbox
//! limit from an ERROR into a silent loss. A DBA who wants a role to tune
//! one grants it: `GRANT SET ON PARAMETER pg_emit.connect_timeout TO app`.
//! The worker's settings are `SIGHUP`. Defaults keep the worst case of a
//! dead receiver to about three seconds per statement, and thanks to
//! `failure_cooldown` only once per five seconds.

use crate::options::Delivery;
use crate::security::Allowlist;
use crate::transport::http::{ClientConfig, Trust};
use crate::transport::Timeouts;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use pgrx::PostgresGucEnum;
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::rc::Rc;
use std::time::Duration;

pub static CONNECT_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static WRITE_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(2000);
pub static FAILURE_COOLDOWN: GucSetting<i32> = GucSetting::<i32>::new(5000);
pub static COMMIT_BUFFER_SIZE: GucSetting<i32> = GucSetting::<i32>::new(64 * 1024);
pub static RETRY_MIN: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static RETRY_MAX: GucSetting<i32> = GucSetting::<i32>::new(30_000);
pub static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static MAX_AGE: GucSetting<i32> = GucSetting::<i32>::new(3 * 86_400);
pub static ALLOWED_DESTINATIONS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
pub static MAX_MESSAGE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(64 * 1024);
pub static MAX_OUTBOX_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);
pub static HTTP_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(5000);
pub static SIGNING_SECRET_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
pub static CA_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static STATEMENT_BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1024);
pub static LISTEN: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static LISTEN_DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
pub static CHANNEL_RETENTION: GucSetting<i32> = GucSetting::<i32>::new(3600);
pub static ON_ERROR: GucSetting<OnError> = GucSetting::<OnError>::new(OnError::Warning);
pub static DEFAULT_DELIVERY: GucSetting<DefaultDelivery> =
    GucSetting::<DefaultDelivery>::new(DefaultDelivery::Sync);
pub static RESPONSE_LOG: GucSetting<ResponseLog> = GucSetting::<ResponseLog>::new(ResponseLog::Off);
pub static RESPONSE_LOG_RETENTION: GucSetting<i32> = GucSetting::<i32>::new(86_400);

/// Which async HTTP responses the worker keeps in `emit.http_responses`.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum ResponseLog {
    #[name = c"off"]
    Off,
    #[name = c"errors"]
    Errors,
    #[name = c"all"]
    All,
}

/// As the worker's jobs take it.
pub fn response_log() -> pg_emit_core::job::LogLevel {
    use pg_emit_core::job::LogLevel;
    match RESPONSE_LOG.get() {
        ResponseLog::Off => LogLevel::Off,
        ResponseLog::Errors => LogLevel::Errors,
        ResponseLog::All => LogLevel::All,
    }
}

/// What a failed delivery does to the statement that caused it.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum OnError {
    #[name = c"warning"]
    Warning,
    #[name = c"error"]
    Error,
}

#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum DefaultDelivery {
    #[name = c"sync"]
    Sync,
    #[name = c"commit"]
    Commit,
    #[name = c"async"]
    Async,
}

pub fn init() {
    // SAFETY: the hook is a plain function with the signature PostgreSQL
    // expects; it only parses the proposed value.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"pg_emit.allowed_destinations",
            c"Where pg_emit may connect: host, host:port, CIDR[:port], URL prefixes, or *.",
            c"Empty allows everything except link-local and cloud metadata addresses. Superuser only.",
            &ALLOWED_DESTINATIONS,
            GucContext::Suset,
            GucFlags::default(),
            Some(check_allowed_destinations),
            None,
            None,
        );
    }
    GucRegistry::define_int_guc(
        c"pg_emit.http_timeout",
        c"Longest wait for a whole HTTP request, connect to last response byte.",
        c"",
        &HTTP_TIMEOUT,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_string_guc(
        c"pg_emit.listen",
        c"host:port on which the worker of pg_emit.listen_database serves live channels \
          (WebSocket and Server-Sent Events at /channels/<name>); empty: off.",
        c"Plain HTTP: put TLS in front of it (a reverse proxy) when it leaves the host.",
        &LISTEN,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_emit.listen_database",
        c"The database whose channels and tokens the listener serves.",
        c"",
        &LISTEN_DATABASE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_emit.channel_retention",
        c"How long channel events are kept for subscribers that reconnect.",
        c"A subscriber that comes back with its last event id gets every event after it \
          still kept; older ones are deleted by the worker.",
        &CHANNEL_RETENTION,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_string_guc(
        c"pg_emit.signing_secret_file",
        c"File holding the HMAC-SHA256 key that signs row_to_http events (not send_http); empty: unsigned.",
        c"A file, like ssl_key_file: a setting's value can be read by other roles in sessions \
          that have not loaded pg_emit yet, a file readable only by the server's OS user cannot.",
        &SIGNING_SECRET_FILE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_emit.ca_file",
        c"PEM file of CA certificates trusted for HTTPS instead of the system store.",
        c"Empty: the operating system's trust store.",
        &CA_FILE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_emit.max_message_size",
        c"Largest message pg_emit sends; bigger ones are an error.",
        c"",
        &MAX_MESSAGE_SIZE,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"pg_emit.max_outbox_size",
        c"Size of emit.outbox past which delivery=async refuses the new events of destinations over their share of it. 0 disables.",
        c"Past twice the size, every destination's. What happens then follows pg_emit.on_error: an ERROR, or a WARNING and the events are not queued.",
        &MAX_OUTBOX_SIZE,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"pg_emit.connect_timeout",
        c"Longest wait for name lookup plus TCP connect, per message.",
        c"Applies to send_socket and to every delivery mode.",
        &CONNECT_TIMEOUT,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_emit.write_timeout",
        c"Longest wait for writing one whole message.",
        c"A receiver that accepts but does not read fails after this long.",
        &WRITE_TIMEOUT,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_emit.failure_cooldown",
        c"After a destination fails, skip it without trying for this long.",
        c"Keeps a dead receiver from costing one timeout per row. 0 disables.",
        &FAILURE_COOLDOWN,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_emit.commit_buffer_size",
        c"Most event bytes one transaction may hold for delivery=commit.",
        c"Beyond it the statement fails; delivery=async has no such limit.",
        &COMMIT_BUFFER_SIZE,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"pg_emit.retry_backoff_min",
        c"First retry delay of the async worker after a failed delivery.",
        c"Doubles with each failed attempt up to pg_emit.retry_backoff_max, with jitter.",
        &RETRY_MIN,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_emit.retry_backoff_max",
        c"Longest retry delay of the async worker.",
        c"",
        &RETRY_MAX,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_emit.max_attempts",
        c"Failed delivery attempts after which async events go to emit.dead_letter. 0: no limit.",
        c"By default only pg_emit.max_age ends retries, so a receiver down for hours loses nothing.",
        &MAX_ATTEMPTS,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_emit.max_age",
        c"Age after which undeliverable async events go to emit.dead_letter. 0 disables.",
        c"Checked when an attempt fails, so healthy destinations never lose events to it.",
        &MAX_AGE,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_emit.statement_batch_size",
        c"Largest message of a statement-level trigger; more rows go in further messages.",
        c"",
        &STATEMENT_BATCH_SIZE,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_enum_guc(
        c"pg_emit.on_error",
        c"What a failed delivery does: warning (default) or error.",
        c"error aborts the statement that fired the trigger or called send_socket.",
        &ON_ERROR,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"pg_emit.response_log",
        c"Which async HTTP responses the worker keeps in emit.http_responses: off, errors or all.",
        c"Each with its status, time and the start of its body; kept for pg_emit.response_log_retention.",
        &RESPONSE_LOG,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_emit.response_log_retention",
        c"How long emit.http_responses keeps a response.",
        c"",
        &RESPONSE_LOG_RETENTION,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_enum_guc(
        c"pg_emit.default_delivery",
        c"Delivery mode of triggers that do not say delivery=...",
        c"",
        &DEFAULT_DELIVERY,
        GucContext::Suset,
        GucFlags::default(),
    );
    reserve_prefix();
}

/// After defining every setting: from PostgreSQL 15 on, `SET pg_emit.typo
/// = ...` is an error instead of a silently ignored placeholder; 14 has
/// only a WARNING for placeholders that already exist.
fn reserve_prefix() {
    // SAFETY: called from _PG_init, after the prefix's settings are defined.
    #[cfg(not(feature = "pg14"))]
    unsafe {
        pgrx::pg_sys::MarkGUCPrefixReserved(c"pg_emit".as_ptr())
    };
    #[cfg(feature = "pg14")]
    unsafe {
        pgrx::pg_sys::EmitWarningsOnPlaceholders(c"pg_emit".as_ptr())
    };
}

fn ms(setting: &GucSetting<i32>) -> Duration {
    Duration::from_millis(setting.get().max(0) as u64)
}

/// A backend's timeouts: `write_timeout` bounds a whole write, since no
/// writer may wait longer than it.
pub fn timeouts() -> Timeouts {
    Timeouts {
        connect: ms(&CONNECT_TIMEOUT),
        write: ms(&WRITE_TIMEOUT),
        stall: false,
    }
}

pub fn failure_cooldown() -> Duration {
    ms(&FAILURE_COOLDOWN)
}

pub fn default_delivery() -> Delivery {
    match DEFAULT_DELIVERY.get() {
        DefaultDelivery::Sync => Delivery::Sync,
        DefaultDelivery::Commit => Delivery::Commit,
        DefaultDelivery::Async => Delivery::Async,
    }
}

pub fn commit_buffer_bytes() -> usize {
    COMMIT_BUFFER_SIZE.get().max(0) as usize * 1024
}

/// Rejects a malformed allowlist at `SET`/reload time, naming the entry.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_allowed_destinations(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    let value = if newval.is_null() || (*newval).is_null() {
        ""
    } else {
        CStr::from_ptr(*newval).to_str().unwrap_or("\u{fffd}")
    };
    match Allowlist::parse(value) {
        Ok(_) => true,
        Err(detail) => {
            let detail = CString::new(detail).unwrap_or_default();
            pg_sys::GUC_check_errcode(pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE as i32);
            pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(detail.as_ptr());
            false
        }
    }
}

thread_local! {
    /// The parsed allowlist and the text it was parsed from.
    static ALLOWLIST: RefCell<(CString, Rc<Allowlist>)> = RefCell::default();
}

/// The allowlist in force, parsed again only when the setting's text
/// changes: the per-message cost is one string comparison.
pub fn allowlist() -> Rc<Allowlist> {
    // SAFETY: the GUC machinery keeps this pointer valid (or NULL) between
    // statements; we only read it.
    let raw = unsafe { *ALLOWED_DESTINATIONS.as_ptr() };
    let text: &CStr = if raw.is_null() {
        c""
    } else {
        unsafe { CStr::from_ptr(raw) }
    };
    ALLOWLIST.with_borrow_mut(|(cached, list)| {
        if cached.as_c_str() != text {
            // The check hook validated the text; should parsing fail
            // anyway, refuse everything rather than allow everything.
            let parsed = Allowlist::parse(&text.to_string_lossy())
                .unwrap_or_else(|_| Allowlist::parse("0.0.0.0/32").expect("valid"));
            *list = Rc::new(parsed);
            *cached = text.to_owned();
        }
        list.clone()
    })
}

pub fn max_message_bytes() -> usize {
    MAX_MESSAGE_SIZE.get().max(0) as usize * 1024
}

/// 0 means no limit.
pub fn max_outbox_bytes() -> i64 {
    i64::from(MAX_OUTBOX_SIZE.get().max(0)) * 1024
}

/// A file named by a setting, kept in memory and read again when its
/// path or modification time changes (a rotated key or CA bundle is picked
/// up without a reload).
type FileCache = RefCell<Option<(CString, std::time::SystemTime, Vec<u8>)>>;

thread_local! {
    static CA_PEM: FileCache = const { RefCell::new(None) };
    static SECRET: FileCache = const { RefCell::new(None) };
}

/// The contents of the file `setting` names, or None when it is empty.
fn setting_file(
    setting: &GucSetting<Option<CString>>,
    name: &str,
    cache: &'static std::thread::LocalKey<FileCache>,
) -> Result<Option<Vec<u8>>, String> {
    let Some(path) = setting.get().filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let p = std::path::PathBuf::from(std::ffi::OsStr::from_bytes(path.as_bytes()));
    let mtime = std::fs::metadata(&p)
        .and_then(|m| m.modified())
        .map_err(|e| format!("{name} {}: {e}", p.display()))?;
    cache.with_borrow_mut(|slot| {
        if let Some((cp, ct, data)) = slot {
            if *cp == path && *ct == mtime {
                return Ok(Some(data.clone()));
            }
        }
        let data = std::fs::read(&p).map_err(|e| format!("{name} {}: {e}", p.display()))?;
        *slot = Some((path, mtime, data.clone()));
        Ok(Some(data))
    })
}

fn trust() -> Result<Trust, String> {
    Ok(setting_file(&CA_FILE, "pg_emit.ca_file", &CA_PEM)?.map_or(Trust::System, Trust::Pem))
}

/// The signing key, trailing line break removed, when one is configured.
pub fn signing_secret() -> Result<Option<Vec<u8>>, String> {
    Ok(
        setting_file(&SIGNING_SECRET_FILE, "pg_emit.signing_secret_file", &SECRET)?.and_then(
            |mut k| {
                while k.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    k.pop();
                }
                (!k.is_empty()).then_some(k)
            },
        ),
    )
}

/// Everything the HTTP client depends on, from the current settings.
pub fn http_client_config() -> Result<ClientConfig, String> {
    Ok(ClientConfig {
        connect_timeout: ms(&CONNECT_TIMEOUT),
        request_timeout: ms(&HTTP_TIMEOUT),
        trust: trust()?,
        allow: (*allowlist()).clone(),
        tls: Default::default(),
    })
}

pub fn statement_batch_bytes() -> usize {
    STATEMENT_BATCH_SIZE.get().max(1) as usize * 1024
}

/// `pg_emit.listen`, when set.
pub fn listen() -> Option<String> {
    LISTEN
        .get()
        .map(|s| s.to_string_lossy().trim().to_string())
        .filter(|s| !s.is_empty())
}

pub fn listen_database() -> String {
    LISTEN_DATABASE
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}
