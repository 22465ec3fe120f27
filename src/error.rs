//! Every error pg_emit raises, with its SQLSTATE.
//!
//! Callers match on SQLSTATE, so each variant maps to the class PostgreSQL
//! itself uses for the same kind of fault: bad arguments are 22023 like
//! any built-in function's, a trigger attached to the wrong event is
//! 39P01 like `tsvector_update_trigger`'s, and delivery failures promoted
//! by `pg_emit.on_error = error` are class 08 (connection exception).

use crate::options::OptionError;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    /// A bad argument to an SQL function; `func` names it.
    #[error("{func}: {source}")]
    Argument {
        func: &'static str,
        source: OptionError,
    },
    /// A bad trigger argument; `trigger` is `row_to_socket trigger "x" on "s"."t"`.
    #[error("{trigger}: {source}")]
    TriggerArgument {
        trigger: String,
        func: &'static str,
        source: OptionError,
    },
    /// `delivery=sync` to a channel.
    #[error(
        "{context}: {channel} cannot take delivery=sync: channel events are stored when the \
         transaction commits and pushed to subscribers by the listener; use delivery=async \
         (commit means the same for a channel)"
    )]
    ChannelSync { context: String, channel: String },
    /// A destination that routes by table, given to something other than a
    /// row trigger (which has no table to fill it in with).
    #[error(
        "{context}: {dest} names its stream, subject or topic by {{schema}} and {{table}}: \
         only triggers, which know their table, can send to it"
    )]
    Routed { context: String, dest: String },
    /// A trigger function called as a plain function.
    #[error("{0}: must be called as a trigger")]
    NotTrigger(&'static str),
    /// Attached to an event it cannot handle.
    #[error("{trigger}: {problem}")]
    TriggerEvent { trigger: String, problem: String },
    /// `columns=` or `exclude=` names a column the table does not have.
    #[error("{trigger}: {option}=: column \"{column}\" does not exist")]
    UnknownColumn {
        trigger: String,
        option: &'static str,
        column: String,
    },
    /// A failed delivery: WARNING, or ERROR under `pg_emit.on_error = error`.
    #[error("{context}: {reason}")]
    Delivery {
        context: String,
        reason: String,
        /// No connection could be made (08001) rather than broke (08006).
        connect: bool,
    },
    /// `delivery=commit` events exceed `pg_emit.commit_buffer_size`.
    #[error("{context}: the events held for delivery=commit exceed {limit} bytes (pg_emit.commit_buffer_size)")]
    BufferFull { context: String, limit: usize },
    /// `PREPARE TRANSACTION` with `delivery=commit` events held.
    #[error("cannot prepare a transaction that holds {events} delivery=commit event(s)")]
    PrepareWithHeldEvents { events: usize },
    /// After commit: some held events could not be sent (a WARNING).
    #[error("{failed} of {total} delivery=commit event(s) for {dest} were not sent after commit; first failure: {first}")]
    CommitDeliveryIncomplete {
        dest: String,
        failed: usize,
        total: usize,
        first: String,
    },
    /// Refused by `pg_emit.allowed_destinations`.
    #[error("{context}: {why}")]
    NotAllowed { context: String, why: String },
    /// A message over `pg_emit.max_message_size`.
    #[error("{context}: message of {size} bytes exceeds pg_emit.max_message_size ({limit} bytes)")]
    TooLarge {
        context: String,
        size: usize,
        limit: usize,
    },
    /// `DROP EXTENSION pg_emit` with events not yet delivered (a WARNING).
    #[error("DROP EXTENSION pg_emit discards {queued} queued event(s) for {dests} destination(s) and {dead} dead-lettered event(s)")]
    DropDiscards { queued: i64, dests: i64, dead: i64 },
    /// A stored destination that does not exist.
    #[error("{func}: destination {name:?} does not exist (see emit.create_destination)")]
    NoSuchDestination { func: &'static str, name: String },
    /// `emit.create_destination` of a name already taken.
    #[error("emit.create_destination: destination {0:?} already exists (change it with emit.alter_destination)")]
    DestinationExists(String),
    /// `emit.create_ddl_trigger` of a name already taken.
    #[error("emit.create_ddl_trigger: DDL trigger {0:?} already exists")]
    DdlTriggerExists(String),
    #[error("emit.drop_ddl_trigger: DDL trigger {0:?} does not exist")]
    NoSuchDdlTrigger(String),
    /// A feature the installed (older) schema cannot hold.
    #[error("{0} needs pg_emit's current schema: run ALTER EXTENSION pg_emit UPDATE")]
    NeedsUpdate(String),
    /// `emit.outbox` is over `pg_emit.max_outbox_size`, and `dest` (or
    /// every destination, when `None`) over its share of it.
    #[error("emit.outbox holds {size} bytes, over pg_emit.max_outbox_size ({limit} bytes){}: {events} event(s) not queued",
        .dest.as_ref().map_or(String::from(", twice over"), |d| format!(", and {d} queues more than its share")))]
    OutboxFull {
        dest: Option<String>,
        size: i64,
        limit: i64,
        events: usize,
    },
}

impl EmitError {
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            EmitError::Argument { .. }
            | EmitError::TriggerArgument { .. }
            | EmitError::ChannelSync { .. }
            | EmitError::Routed { .. } => ERRCODE_INVALID_PARAMETER_VALUE,
            EmitError::TriggerEvent { .. } | EmitError::NotTrigger(_) => {
                ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED
            }
            EmitError::UnknownColumn { .. } => ERRCODE_UNDEFINED_COLUMN,
            EmitError::Delivery { connect: true, .. } => {
                ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION
            }
            EmitError::Delivery { connect: false, .. } => ERRCODE_CONNECTION_FAILURE,
            EmitError::BufferFull { .. } | EmitError::TooLarge { .. } => {
                ERRCODE_PROGRAM_LIMIT_EXCEEDED
            }
            EmitError::NotAllowed { .. } => ERRCODE_INSUFFICIENT_PRIVILEGE,
            EmitError::OutboxFull { .. } => ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            EmitError::PrepareWithHeldEvents { .. } | EmitError::NeedsUpdate(_) => {
                ERRCODE_FEATURE_NOT_SUPPORTED
            }
            EmitError::CommitDeliveryIncomplete { .. } => ERRCODE_CONNECTION_FAILURE,
            EmitError::DropDiscards { .. } => ERRCODE_WARNING,
            EmitError::NoSuchDestination { .. } => ERRCODE_UNDEFINED_OBJECT,
            EmitError::DestinationExists(_) | EmitError::DdlTriggerExists(_) => {
                ERRCODE_DUPLICATE_OBJECT
            }
            EmitError::NoSuchDdlTrigger(_) => ERRCODE_UNDEFINED_OBJECT,
        }
    }

    fn hint(&self) -> Option<&'static str> {
        match self {
            EmitError::TriggerArgument {
                func: "row_to_http",
                ..
            } => return Some(
                "row_to_http takes (url [, 'key=value' ...]) with keys delivery=sync|commit|async, format=json|td|supabase|debezium|cloudevents, cloudevents=binary|structured, header=Name: value, key=col[,col...], columns=col[,col...] or exclude=col[,col...], unchanged=send|skip.",
            ),
            EmitError::TriggerArgument {
                func: "row_to_destination",
                ..
            } => return Some(
                "row_to_destination takes (destination [, 'key=value' ...]): a URL (tcp://host:port[?framing=ndjson], http(s)://...) or a stored destination's name, and keys delivery=sync|commit|async, format=json|td|supabase|debezium|cloudevents, cloudevents=binary|structured, key=col[,col...], columns=col[,col...] or exclude=col[,col...], unchanged=send|skip.",
            ),
            _ => {}
        }
        match self {
            EmitError::BufferFull { .. } => Some(
                "Use delivery=async for transactions this large: its events wait in a table, not in memory.",
            ),
            EmitError::PrepareWithHeldEvents { .. } => {
                Some("Use delivery=sync or delivery=async in two-phase transactions.")
            }
            EmitError::OutboxFull { .. } => Some(
                "The worker cannot keep up or a receiver is down: see emit.stats and emit.dead_letter.",
            ),
            EmitError::DropDiscards { .. } => Some(
                "To keep them, roll back and let the worker deliver them (see emit.stats), or pg_dump the database first: the dump includes them.",
            ),
            EmitError::TriggerArgument { .. } => Some(
                "row_to_socket takes (host, port [, 'key=value' ...]) with keys delivery=sync|commit|async, format=json|td|supabase|debezium|cloudevents, framing=close|ndjson, key=col[,col...], columns=col[,col...] or exclude=col[,col...], unchanged=send|skip.",
            ),
            _ => None,
        }
    }

    fn report(&self) -> ErrorReport {
        let r = ErrorReport::new(self.sqlstate(), self.to_string(), "pg_emit");
        match self.hint() {
            Some(h) => r.set_hint(h),
            None => r,
        }
    }

    /// Raises this as an ERROR; does not return.
    pub fn raise(self) -> ! {
        self.report().report(PgLogLevel::ERROR);
        unreachable!("ERROR returned")
    }

    /// The `options` object of an SQL function, checked: a JSON object
    /// whose keys are all `known`; anything else is an ERROR naming `func`.
    pub fn options<'a>(
        func: &'static str,
        options: &'a serde_json::Value,
        known: &[&str],
    ) -> &'a serde_json::Map<String, serde_json::Value> {
        let Some(map) = options.as_object() else {
            EmitError::bad_option(func, "must be a JSON object".into())
        };
        if let Some(k) = map.keys().find(|k| !known.contains(&k.as_str())) {
            EmitError::bad_option(
                func,
                format!("unknown option {k:?} (known: {})", known.join(", ")),
            )
        }
        map
    }

    /// An ERROR naming `func` for a bad value in its `options`.
    pub fn bad_option(func: &'static str, why: String) -> ! {
        EmitError::Argument {
            func,
            source: OptionError::Destination(format!("options: {why}")),
        }
        .raise()
    }

    /// [`EmitError::bad_option`] with a SQLSTATE of its own (an unknown
    /// column's, 42703).
    pub fn bad_option_code(func: &'static str, code: PgSqlErrorCode, why: String) -> ! {
        ErrorReport::new(code, format!("{func}: options: {why}"), "pg_emit")
            .report(PgLogLevel::ERROR);
        unreachable!("ERROR returned")
    }

    /// Logs this as a WARNING and carries on.
    pub fn warn(self) {
        self.report().report(PgLogLevel::WARNING);
    }
}
