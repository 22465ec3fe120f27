//! `pg_emit.*` settings.
//!
//! The network ones are per session (`SET` works) because a DBA tuning one
//! noisy trigger should not need a reload. Defaults keep the worst case of
//! a dead receiver to about three seconds per statement, and thanks to
//! `failure_cooldown` only once per five seconds.

use crate::options::Delivery;
use crate::transport::Timeouts;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::PostgresGucEnum;
use std::time::Duration;

pub static CONNECT_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static WRITE_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(2000);
pub static FAILURE_COOLDOWN: GucSetting<i32> = GucSetting::<i32>::new(5000);
pub static COMMIT_BUFFER_SIZE: GucSetting<i32> = GucSetting::<i32>::new(64 * 1024);
pub static RETRY_MIN: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static RETRY_MAX: GucSetting<i32> = GucSetting::<i32>::new(30_000);
pub static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(50);
pub static MAX_AGE: GucSetting<i32> = GucSetting::<i32>::new(86_400);
pub static ON_ERROR: GucSetting<OnError> = GucSetting::<OnError>::new(OnError::Warning);
pub static DEFAULT_DELIVERY: GucSetting<DefaultDelivery> =
    GucSetting::<DefaultDelivery>::new(DefaultDelivery::Sync);

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
    GucRegistry::define_int_guc(
        c"pg_emit.connect_timeout",
        c"Longest wait for name lookup plus TCP connect, per message.",
        c"Applies to send_socket and to every delivery mode.",
        &CONNECT_TIMEOUT,
        1,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_emit.write_timeout",
        c"Longest wait for writing one whole message.",
        c"A receiver that accepts but does not read fails after this long.",
        &WRITE_TIMEOUT,
        1,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_emit.failure_cooldown",
        c"After a destination fails, skip it without trying for this long.",
        c"Keeps a dead receiver from costing one timeout per row. 0 disables.",
        &FAILURE_COOLDOWN,
        0,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_emit.commit_buffer_size",
        c"Most event bytes one transaction may hold for delivery=commit.",
        c"Beyond it the statement fails; delivery=async has no such limit.",
        &COMMIT_BUFFER_SIZE,
        1,
        i32::MAX,
        GucContext::Userset,
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
        c"Failed delivery attempts after which async events go to emit.dead_letter.",
        c"",
        &MAX_ATTEMPTS,
        1,
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
    GucRegistry::define_enum_guc(
        c"pg_emit.on_error",
        c"What a failed delivery does: warning (default) or error.",
        c"error aborts the statement that fired the trigger or called send_socket.",
        &ON_ERROR,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"pg_emit.default_delivery",
        c"Delivery mode of triggers that do not say delivery=...",
        c"",
        &DEFAULT_DELIVERY,
        GucContext::Userset,
        GucFlags::default(),
    );
    // After defining every setting (SAFETY: PostgreSQL 15 API): now `SET pg_emit.typo = ...` is an
    // error instead of a silently ignored placeholder.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"pg_emit".as_ptr()) };
}

fn ms(setting: &GucSetting<i32>) -> Duration {
    Duration::from_millis(setting.get().max(0) as u64)
}

pub fn timeouts() -> Timeouts {
    Timeouts {
        connect: ms(&CONNECT_TIMEOUT),
        write: ms(&WRITE_TIMEOUT),
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
