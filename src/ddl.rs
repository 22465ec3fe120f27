//! DDL events: `emit.create_ddl_trigger(name, dest, options)` names a
//! route that sends one event per DDL command of the database to `dest`.
//!
//! Event trigger functions take no arguments and cannot tell which event
//! trigger called them, so one pair of event triggers, part of the
//! extension (`pg_emit_ddl` on `ddl_command_end`, `pg_emit_ddl_drop` on
//! `sql_drop`, see `sql/ddl.sql`), serves every route in
//! `emit.ddl_triggers`. Being members of the extension, they come back with
//! `CREATE EXTENSION` after a dump and restore, where the routes come back
//! as dumped data, and go with `DROP EXTENSION`.
//!
//! An event names what changed and never carries the command's text: a
//! `CREATE FUNCTION` body or a `CREATE SERVER … OPTIONS (password …)` may
//! hold secrets that receivers must not get.

use crate::delivery::{commit, outbox, sync, Destination};
use crate::error::EmitError;
use crate::interrupts;
use crate::made::Made;
use crate::privileged::as_emit_owner;
use crate::stored;
use pg_emit_core::event::{write_ddl, Kind};
use pg_emit_core::options::{Delivery, Format};
use pg_emit_core::schedule::Key;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::CStr;

const FUNC: &str = "emit.ddl_event";

/// A route's options: `{"delivery": "sync" | "commit" | "async"}`
/// (default async).
fn delivery_of(func: &'static str, options: &serde_json::Value) -> Delivery {
    let bad = |why: String| -> ! { EmitError::bad_option(func, why) };
    let map = EmitError::options(func, options, &["delivery"]);
    match map.get("delivery").map(|d| d.as_str()) {
        None | Some(Some("async")) => Delivery::Async,
        Some(Some("sync")) => Delivery::Sync,
        Some(Some("commit")) => Delivery::Commit,
        Some(other) => bad(format!(
            "delivery {} is not sync, commit or async",
            other.map_or_else(|| map["delivery"].to_string(), |s| format!("{s:?}"))
        )),
    }
}

#[pgrx::pg_schema]
mod emit {
    use super::*;
    use pgrx::JsonB;

    /// Sends one event per DDL command of this database to `dest` (a URL
    /// or a stored destination), in `options.delivery` (default async).
    #[pg_extern(volatile, parallel_unsafe)]
    fn create_ddl_trigger(name: &str, dest: &str, options: default!(JsonB, "'{}'")) {
        const F: &str = "emit.create_ddl_trigger";
        if let Err(source) = pg_emit_core::destination::check_name(name) {
            EmitError::Argument { func: F, source }.raise()
        }
        let delivery = delivery_of(F, &options.0);
        // An unknown or refused destination fails here, not at every DDL.
        let resolved = stored::resolve(F, dest);
        crate::delivery::refuse_unless_allowed(&|| F.to_string(), &resolved.target);
        crate::delivery::for_target(&|| F.to_string(), &resolved.target, delivery);
        let options = serde_json::json!({"delivery": delivery.name()}).to_string();
        let inserted = as_emit_owner(|| {
            Spi::connect_mut(|c| {
                c.update(
                    "INSERT INTO emit.ddl_triggers (name, dest, options) \
                     VALUES ($1, $2, $3::pg_catalog.jsonb) ON CONFLICT (name) DO NOTHING",
                    None,
                    &[name.into(), dest.into(), options.as_str().into()],
                )
                .map(|t| t.len())
            })
        })
        .unwrap_or_else(|e| pgrx::error!("{F}: {e}"));
        if inserted == 0 {
            EmitError::DdlTriggerExists(name.to_string()).raise();
        }
    }

    /// Stops the route `name`.
    #[pg_extern(volatile, parallel_unsafe)]
    fn drop_ddl_trigger(name: &str) {
        let deleted = as_emit_owner(|| {
            Spi::get_one_with_args::<String>(
                "DELETE FROM emit.ddl_triggers WHERE name = $1 RETURNING name",
                &[name.into()],
            )
        });
        if !matches!(deleted, Ok(Some(_))) {
            EmitError::NoSuchDdlTrigger(name.to_string()).raise();
        }
    }
}

#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_ddl_event() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// The event trigger function of `pg_emit_ddl` and `pg_emit_ddl_drop`.
///
/// # Safety
/// Called by PostgreSQL's function manager with a valid `fcinfo`.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn ddl_event(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let context = (*fcinfo).context;
    if context.is_null() || (*context).type_ != pg_sys::NodeTag::T_EventTriggerData {
        pgrx::error!("{FUNC}: not called as an event trigger");
    }
    let data = context as *mut pg_sys::EventTriggerData;
    // Attached by hand to another event (a login trigger, say), it does
    // nothing rather than fail what fired it.
    let dropping = match CStr::from_ptr((*data).event).to_bytes() {
        b"sql_drop" => true,
        b"ddl_command_end" => false,
        _ => return pg_sys::Datum::from(0),
    };
    let tag = CStr::from_ptr(pg_sys::GetCommandTagName((*data).tag))
        .to_string_lossy()
        .into_owned();
    // DROP EXTENSION pg_emit drops the routes before this runs for it.
    if !routes_table_exists() {
        return pg_sys::Datum::from(0);
    }
    let routes =
        as_emit_owner(|| {
            Spi::connect(|c| {
                c.select(
                "SELECT name, dest, options::pg_catalog.text FROM emit.ddl_triggers ORDER BY name",
                None,
                &[],
            )?
            .map(|r| Ok((r.get::<String>(1)?, r.get::<String>(2)?, r.get::<String>(3)?)))
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
            })
        })
        .unwrap_or_else(|e| pgrx::error!("{FUNC}: {e}"));
    if routes.is_empty() {
        return pg_sys::Datum::from(0);
    }
    let events = commands(dropping, &tag);
    if events.is_empty() {
        return pg_sys::Datum::from(0);
    }
    for (name, dest, options) in routes {
        let (Some(name), Some(dest)) = (name, dest) else {
            continue;
        };
        let options = options
            .and_then(|o| serde_json::from_str(&o).ok())
            .unwrap_or(serde_json::Value::Null);
        let mode = delivery_of(FUNC, &options);
        // A stored destination dropped since: the DDL goes on, with a
        // WARNING, rather than every DDL of the database failing.
        if !pg_emit_core::destination::is_url(&dest) && !stored::exists(&dest) {
            pgrx::warning!(
                "{FUNC}: DDL trigger {name:?}: destination {dest:?} does not exist; \
                 {} DDL event(s) not sent",
                events.len()
            );
            continue;
        }
        let resolved = stored::resolve(FUNC, &dest);
        // Allowed when the route was made; the allowlist or the stored
        // destination may have changed since.
        if let Some(why) = crate::delivery::not_allowed(&resolved.target) {
            pgrx::warning!(
                "{FUNC}: DDL trigger {name:?}: {why}; {} DDL event(s) not sent",
                events.len()
            );
            continue;
        }
        // A stored destination altered to route by table has no table to
        // fill in for DDL: a WARNING, never someone else's failed DDL.
        if let Destination::Routed { .. } = resolved.target.endpoint() {
            pgrx::warning!(
                "{FUNC}: DDL trigger {name:?}: {dest} names its stream, subject or topic by \
                 {{schema}} and {{table}}, which DDL events do not have; {} DDL event(s) not sent",
                events.len()
            );
            continue;
        }
        let mode = crate::delivery::for_target(
            &|| format!("{FUNC}: DDL trigger {name:?}"),
            &resolved.target,
            mode,
        );
        let format = resolved.format.unwrap_or_default();
        let limit = crate::settings::max_message_bytes();
        for (event, object) in &events {
            let mut buf = Vec::with_capacity(event.len() + 256);
            let made = Made::now(format, mode);
            write_ddl(&mut buf, format, &made.ctx(), event, object.as_deref());
            // Someone else's DDL must not fail for an event too large.
            if buf.len() > limit {
                pgrx::warning!(
                    "{FUNC}: DDL trigger {name:?}: an event of {} bytes exceeds \
                     pg_emit.max_message_size ({limit} bytes); not sent",
                    buf.len()
                );
                continue;
            }
            hand_over(&name, &resolved.target, format, mode, buf);
        }
    }
    pg_sys::Datum::from(0)
}

/// Hands one DDL event to its delivery mode, as `send_message` does, except
/// that a delivery problem (a failed sync send, a full commit buffer) is a
/// WARNING whatever `pg_emit.on_error` says: the DDL is someone else's, and
/// must not fail for it.
fn hand_over(route: &str, target: &Destination, format: Format, mode: Delivery, mut buf: Vec<u8>) {
    let context = || format!("{FUNC}: DDL trigger {route:?}");
    let kind = Kind::event(format);
    if target.coalesces() && mode != Delivery::Async {
        buf.push(b'\n');
    }
    let failed = match mode {
        Delivery::Sync => {
            // Events this statement's triggers hold for the same kept-open
            // connection go first.
            sync::flush_all();
            sync::try_send(target, kind, &buf, Key::default(), &interrupts::Statement)
                .err()
                .map(|f| f.into_error(context(), &target.name()))
        }
        Delivery::Commit => commit::try_hold(&context, target, kind, &buf, Key::default()).err(),
        Delivery::Async => {
            outbox::queue(target, kind, &buf, Key::default());
            None
        }
    };
    if let Some(e) = failed {
        e.warn();
        // A cancel that interrupted the send still cancels the command.
        pgrx::check_for_interrupts!();
    }
}

fn routes_table_exists() -> bool {
    // SAFETY: syscache lookups inside a transaction.
    unsafe {
        let nsp = pg_sys::get_namespace_oid(c"emit".as_ptr(), true);
        nsp != pg_sys::InvalidOid
            && pg_sys::get_relname_relid(c"ddl_triggers".as_ptr(), nsp) != pg_sys::InvalidOid
    }
}

/// The events of the command that fired: one per created or altered object
/// (`ddl_command_end`), or one per object it dropped by name or by CASCADE
/// (`sql_drop`; objects that went along internally, such as a table's
/// row type or indexes, or a view's `_RETURN` rule, which is the view
/// itself, are left out). Each is pg_emit's JSON with the object's
/// identity (a CloudEvent's subject; none for `GRANT`).
///
/// Temporary objects are left out too: they live and die with a session,
/// and any role may make them (`TEMP` is granted to PUBLIC), so a loop of
/// temporary tables would otherwise let it fill the outbox every writer of
/// the database shares.
///
/// Read as the extension's owner with `search_path` pinned: this runs as
/// whoever did the DDL, under a search path they may have chosen. Text
/// comes as bytes (`textsend`) and is converted to UTF-8 here, so a name in
/// a LATIN1 database is an event, not an error in someone's DDL.
fn commands(dropping: bool, tag: &str) -> Vec<(Vec<u8>, Option<String>)> {
    let query = if dropping {
        "SELECT NULL::pg_catalog.bytea, pg_catalog.textsend(object_type), \
                pg_catalog.textsend(schema_name), pg_catalog.textsend(object_identity), false \
           FROM pg_catalog.pg_event_trigger_dropped_objects() \
          WHERE (original OR normal) AND NOT is_temporary \
            AND address_names[1] IS DISTINCT FROM 'pg_temp'"
    } else {
        "SELECT pg_catalog.textsend(command_tag), pg_catalog.textsend(object_type), \
                pg_catalog.textsend(schema_name), pg_catalog.textsend(object_identity), \
                in_extension \
           FROM pg_catalog.pg_event_trigger_ddl_commands() \
          WHERE schema_name IS DISTINCT FROM 'pg_temp'"
    };
    let text = |b: Option<Vec<u8>>| {
        b.map(|b| {
            let what = || format!("{FUNC}: an object name");
            String::from_utf8_lossy(&crate::encoding::to_utf8(&b, &what)).into_owned()
        })
    };
    as_emit_owner(|| {
        Spi::connect(|c| {
            let mut out = Vec::new();
            for r in c.select(query, None, &[])? {
                let object_type = text(r.get::<Vec<u8>>(2)?);
                let object = text(r.get::<Vec<u8>>(4)?);
                if object_type.as_deref() == Some("rule")
                    && object
                        .as_deref()
                        .is_some_and(|o| o.starts_with("\"_RETURN\" on "))
                {
                    continue;
                }
                let event = serde_json::json!({
                    "op": "DDL",
                    "command_tag": text(r.get::<Vec<u8>>(1)?).unwrap_or_else(|| tag.to_string()),
                    "object_type": object_type,
                    "schema": text(r.get::<Vec<u8>>(3)?),
                    "object_identity": object,
                    "dropped": dropping,
                    "in_extension": r.get::<bool>(5)?.unwrap_or(false),
                });
                out.push((event.to_string().into_bytes(), object));
            }
            Ok::<_, pgrx::spi::Error>(out)
        })
    })
    .unwrap_or_else(|e| pgrx::error!("{FUNC}: {e}"))
}
