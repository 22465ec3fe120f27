//! Capture from the WAL, the SQL side: `emit.create_capture(name, dest,
//! publication, options)` makes a logical replication slot (PostgreSQL's
//! built-in `pgoutput` plugin, so there is nothing else to install) and
//! records the capture in `emit.capture_definitions`; `emit.drop_capture`
//! removes both; `DROP EXTENSION` drops the slots of its database (see
//! [`drop_all_slots`]). The worker decodes and queues (`worker::capture`).
//!
//! Slots are not transactional: one is made before its row is written
//! (PostgreSQL refuses to make one in a transaction that has written), and
//! dropped after its row is deleted. A slot left without a capture by a
//! rolled-back `create_capture` is dropped by the worker (see
//! `worker::capture`), or taken over by the next `create_capture` of its
//! name; a capture whose slot is gone says so in a WARNING.

use crate::error::EmitError;
use crate::privileged::as_emit_owner;
use crate::stored;
use pg_emit_core::options::{Format, OptionError, Shape};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

/// Slot names start with this, then the database oid: a cluster's slots
/// are shared by its databases, and each database's pg_emit drops only
/// its own.
pub const SLOT_PREFIX: &str = "pg_emit_";

/// The slot of capture `name` in this database.
pub fn slot_name(name: &str) -> String {
    // SAFETY: the backend's database oid.
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    format!("{SLOT_PREFIX}{db}_{name}")
}

/// Tells the lock of [`lock_name`] apart from every advisory lock SQL can
/// take (`pg_advisory_lock` puts 1 or 2 in the tag's last field), so that
/// no role can hold it to keep a capture from being made.
const NAME_LOCK_KIND: u16 = 0x4363;

/// Makes `create_capture` of `name` wait for another one of the same name
/// in this database until that transaction ends: then it finds that
/// capture (committed), or its slot left over (rolled back), which it
/// takes the place of. The lock writes nothing, which a transaction that
/// creates a slot must not have done. The worker takes it (`wait` false:
/// false if another holds it) before it drops a slot left over, so as not
/// to drop one a `create_capture` of that name has just made again, and
/// before it reads or moves a capture's slot: `drop_capture` takes it
/// (waiting for the worker's pass to end) so that the worker cannot take
/// up the slot between `drop_capture` finding it unused and dropping it.
pub fn lock_name(name: &str, wait: bool) -> bool {
    // SAFETY: a transaction lock on a tag of our own, released when the
    // transaction ends; the hash only spreads names over tags.
    unsafe {
        let db = pg_sys::MyDatabaseId.to_u32();
        let hash = pg_emit_core::schedule::key_hash([Some(name.as_bytes())]) as u32;
        let tag = pg_sys::LOCKTAG {
            locktag_field1: db,
            locktag_field2: hash,
            locktag_field3: 0,
            locktag_field4: NAME_LOCK_KIND,
            locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
            locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
        };
        pg_sys::LockAcquire(
            &tag,
            pg_sys::ExclusiveLock as pg_sys::LOCKMODE,
            false,
            !wait,
        ) != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
    }
}

/// Drops slot `$1` if it is left without a capture and unused; a row when
/// it did. Run with [`lock_name`] held and a snapshot taken after it.
pub const DROP_LEFT_SLOT: &str = "
SELECT pg_catalog.pg_drop_replication_slot(s.slot_name) IS NULL
  FROM pg_catalog.pg_replication_slots s
 WHERE s.slot_name = $1 AND NOT s.active
   AND NOT EXISTS (SELECT FROM emit.capture_definitions c WHERE c.slot = s.slot_name)";

/// Runs `f` with a snapshot taken now, which sees what a transaction that
/// held [`lock_name`] committed (the statement's own snapshot, or under
/// REPEATABLE READ the transaction's, predates the wait for it).
fn now_visible<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: pushed and popped around `f`; an ERROR pops it by abort.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot()) };
    let r = f();
    // SAFETY: as above.
    unsafe { pg_sys::PopActiveSnapshot() };
    r
}

/// The prefix of this database's capture slots (for LIKE, `_` escaped).
pub fn slot_pattern() -> String {
    // SAFETY: as above.
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    format!("pg\\_emit\\_{db}\\_%")
}

fn fail(code: PgSqlErrorCode, message: String) -> ! {
    pgrx::pg_sys::panic::ErrorReport::new(code, message, "pg_emit").report(pgrx::PgLogLevel::ERROR);
    unreachable!("ERROR returned")
}

/// Capture's or backfill's options, parsed (not yet checked against the
/// tables they name).
pub struct Parsed {
    /// Without it, the destination's own (or json).
    pub format: Option<Format>,
    /// Capture: backfill the published tables first.
    pub snapshot: bool,
    /// Capture: a failover slot (PostgreSQL 17 on), which standbys with
    /// `sync_replication_slots` keep a copy of.
    pub failover: bool,
    /// Backfill: what its events carry and what keys them.
    pub shape: Shape,
    /// Capture: the same per table, by the name given (resolved through
    /// the caller's search_path when the capture is made).
    pub tables: Vec<(String, Shape)>,
    /// Backfill: which part of the table.
    pub part: crate::backfill::Part,
}

/// A capture's options (`capture`): `{"format": "json" | "td" |
/// "supabase" | "debezium" | "cloudevents", "snapshot": true | false,
/// "failover": true | false, "tables": {"<table>": {"key": …,
/// "columns": … | "exclude": …}}}`; a
/// backfill's: `format`, `key`, `columns`, `exclude`, `limit` (a positive
/// integer), `resume` (true or false). Unknown keys are refused.
pub fn options_of(func: &'static str, options: &serde_json::Value, capture: bool) -> Parsed {
    let bad = |why: String| -> ! { EmitError::bad_option(func, why) };
    let known: &[&str] = if capture {
        &["format", "snapshot", "failover", "tables"]
    } else {
        &["format", "key", "columns", "exclude", "limit", "resume"]
    };
    let map = EmitError::options(func, options, known);
    let format = match map.get("format") {
        None => None,
        Some(serde_json::Value::String(s)) => Some(Format::from_name(s).unwrap_or_else(|| {
            bad(format!(
                "format {s:?} is not json, td, supabase, debezium or cloudevents"
            ))
        })),
        Some(other) => bad(format!("format {other} is not a string")),
    };
    let flag = |name: &str| match map.get(name) {
        None => false,
        Some(serde_json::Value::Bool(b)) => *b,
        Some(other) => bad(format!("{name} {other} is not true or false")),
    };
    let (snapshot, failover) = (flag("snapshot"), flag("failover"));
    let limit = map.get("limit").map(|v| match v.as_i64() {
        Some(n) if n > 0 => n,
        _ => bad(format!("limit {v} is not a positive integer")),
    });
    let part = crate::backfill::Part {
        limit,
        resume: flag("resume"),
    };
    let tables = match map.get("tables") {
        None => Vec::new(),
        Some(serde_json::Value::Object(t)) => t
            .iter()
            .map(|(name, v)| {
                const KNOWN: [&str; 3] = ["key", "columns", "exclude"];
                let Some(o) = v.as_object() else {
                    bad(format!(
                        "tables: {name:?} is not an object of {}",
                        KNOWN.join(", ")
                    ))
                };
                if let Some(k) = o.keys().find(|k| !KNOWN.contains(&k.as_str())) {
                    bad(format!(
                        "tables: {name:?}: unknown option {k:?} (known: {})",
                        KNOWN.join(", ")
                    ))
                }
                let shape =
                    Shape::from_json(o).unwrap_or_else(|e| bad(format!("tables: {name:?}: {e}")));
                (name.clone(), shape)
            })
            .collect(),
        Some(other) => bad(format!("tables {other} is not an object of table names")),
    };
    let shape = match capture {
        true => Shape::default(),
        false => Shape::from_json(map).unwrap_or_else(|e| bad(e)),
    };
    Parsed {
        format,
        snapshot,
        failover,
        shape,
        tables,
        part,
    }
}

/// Capture names become part of a slot's name, which PostgreSQL limits
/// to lower-case letters, digits and `_` (63 bytes with the prefix).
fn check_name(func: &'static str, name: &str) {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !ok {
        EmitError::Argument {
            func,
            source: OptionError::Destination(format!(
                "capture name {name:?} must be 1 to 40 lower-case letters, digits or _ \
                 (it names a replication slot)"
            )),
        }
        .raise()
    }
}

#[pgrx::pg_schema]
mod emit {
    use super::*;
    use pgrx::JsonB;

    /// Sends every change committed to a table of `publication` to `dest`
    /// (a URL or a stored destination), decoded from the WAL by the worker
    /// and delivered like async trigger events. Only tables the caller may
    /// SELECT are captured (checked by the worker as each table comes up,
    /// so a table added to the publication later is checked too): a
    /// publication someone else made is not a way to read their tables.
    #[pg_extern(volatile, parallel_unsafe)]
    fn create_capture(name: &str, dest: &str, publication: &str, options: default!(JsonB, "'{}'")) {
        const F: &str = "emit.create_capture";
        // Slots are not transactional: a capture made or dropped in a
        // transaction that then rolled back would lose its slot or keep
        // one. As CREATE SUBSCRIPTION does, each runs in a transaction of
        // its own.
        // SAFETY: raises an ERROR inside a transaction block.
        unsafe { pg_sys::PreventInTransactionBlock(true, c"emit.create_capture()".as_ptr()) };
        // SAFETY: reads the transaction's state.
        let wrote = unsafe { pg_sys::GetTopTransactionIdIfAny() } != pg_sys::InvalidTransactionId;
        check_name(F, name);
        let Parsed {
            format,
            snapshot,
            failover,
            tables,
            ..
        } = options_of(F, &options.0, true);
        if failover && pg_sys::PG_VERSION_NUM < 170_000 {
            fail(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("{F}: options: failover slots need PostgreSQL 17 or later"),
            );
        }
        // SAFETY: reading a setting PostgreSQL keeps in a global.
        let logical = unsafe { pg_sys::wal_level } >= pg_sys::WalLevel::WAL_LEVEL_LOGICAL as i32;
        if !logical {
            fail(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "{F}: capture needs wal_level = logical (set it in postgresql.conf \
                     or with ALTER SYSTEM, then restart the server)"
                ),
            );
        }
        let resolved = stored::resolve(F, dest);
        crate::delivery::refuse_unless_allowed(&|| F.to_string(), &resolved.target);
        if matches!(
            resolved.target.endpoint(),
            pg_emit_core::destination::Destination::Channel(_)
        ) {
            EmitError::Argument {
                func: F,
                source: OptionError::Destination(format!(
                    "{} is a live channel; capture sends to receivers, brokers and webhooks",
                    resolved.target.name()
                )),
            }
            .raise();
        }
        let http = matches!(
            resolved.target.endpoint(),
            pg_emit_core::destination::Destination::Http { .. }
        );
        Format::combine(format, None, resolved.format, http)
            .unwrap_or_else(|source| EmitError::Argument { func: F, source }.raise());
        // Each table's shape, checked now, its name read through the
        // caller's search_path, and kept by oid: a renamed table keeps it.
        let mut shapes: Vec<(pg_sys::Oid, String, Shape, crate::shape::Checked)> = Vec::new();
        for (given, shape) in &tables {
            let (relid, name) = table_named(F, given);
            if shapes.iter().any(|s| s.0 == relid) {
                fail(
                    PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
                    format!("{F}: options: tables: {name} is named twice"),
                );
            }
            let checked = crate::shape::check(F, relid, &name, shape, true);
            shapes.push((relid, name, shape.clone(), checked));
        }
        if wrote {
            fail(
                PgSqlErrorCode::ERRCODE_ACTIVE_SQL_TRANSACTION,
                format!(
                    "{F}: must run before the transaction writes anything: it creates a \
                     replication slot, which PostgreSQL refuses in a transaction that has written"
                ),
            );
        }
        let slot = slot_name(name);
        lock_name(name, true);
        let (publication_exists, capture_exists) = as_emit_owner(|| {
            now_visible(|| {
                Spi::connect(|c| {
                    c.select(
                        "SELECT EXISTS (SELECT FROM pg_catalog.pg_publication p WHERE p.pubname = $1), \
                                EXISTS (SELECT FROM emit.capture_definitions c WHERE c.name = $2)",
                        None,
                        &[publication.into(), name.into()],
                    )?
                    .first()
                    .get_two::<bool, bool>()
                })
            })
        })
        .unwrap_or_else(|e| pgrx::error!("{F}: {e}"));
        if publication_exists != Some(true) {
            fail(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                format!("{F}: publication {publication:?} does not exist (CREATE PUBLICATION … FOR TABLE …)"),
            );
        }
        if capture_exists == Some(true) {
            fail(
                PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
                format!("{F}: capture {name:?} already exists"),
            );
        }
        // SAFETY: the session's current user.
        let caller = unsafe { pg_sys::GetUserId() };
        let mut options = serde_json::Map::new();
        if let Some(f) = format {
            options.insert("format".into(), f.name().into());
        }
        if failover {
            options.insert("failover".into(), true.into());
        }
        if !shapes.is_empty() {
            // The columns' numbers too: a column renamed later is still
            // found (see worker::capture::shaped).
            let tables = shapes.iter().map(|(relid, name, shape, checked)| {
                let mut t = shape.to_json();
                t.insert("relid".into(), relid.to_u32().into());
                t.insert("table".into(), name.as_str().into());
                let attnums: serde_json::Map<_, _> = checked
                    .attnums
                    .iter()
                    .map(|(c, n)| (c.clone(), (*n).into()))
                    .collect();
                t.insert("attnums".into(), attnums.into());
                serde_json::Value::Object(t)
            });
            options.insert("tables".into(), tables.collect());
        }
        let options = serde_json::Value::Object(options).to_string();
        // pgrx's read-write SPI gives the transaction an xid at once: the
        // slot is made through a read-only one, before anything is written.
        as_emit_owner(|| {
            // (failover, PostgreSQL 17's fifth argument, only when asked:
            // older servers have four.)
            let create = match failover {
                false => {
                    "SELECT s.lsn::pg_catalog.text \
                            FROM pg_catalog.pg_create_logical_replication_slot($1, 'pgoutput') s"
                }
                true => {
                    "SELECT s.lsn::pg_catalog.text \
                           FROM pg_catalog.pg_create_logical_replication_slot($1, 'pgoutput', \
                                false, false, true) s"
                }
            };
            let lsn = Spi::connect(|c| {
                // A slot of this name without its capture was left by a
                // create_capture that rolled back (a slot is not undone
                // with its transaction): a retry takes its place rather
                // than failing until the worker has dropped it.
                now_visible(|| c.select(DROP_LEFT_SLOT, None, &[slot.as_str().into()]))?;
                c.select(create, None, &[slot.as_str().into()])?
                    .first()
                    .get_one::<String>()
            })?;
            Spi::connect_mut(|c| {
                c.update(
                    "INSERT INTO emit.capture_definitions \
                            (name, dest, publication, slot, options, queued_lsn, created_by) \
                     VALUES ($1, $2, $3, $4, $5::pg_catalog.jsonb, $6::pg_catalog.pg_lsn, $7)",
                    None,
                    &[
                        name.into(),
                        dest.into(),
                        publication.into(),
                        slot.as_str().into(),
                        options.as_str().into(),
                        lsn.into(),
                        caller.into(),
                    ],
                )
                .map(|_| ())
            })
        })
        .unwrap_or_else(|e| pgrx::error!("{F}: {e}"));
        if snapshot {
            // After the slot's start: a change committed between the two
            // is both in a READ event and captured after it, never lost.
            let none = Shape::default();
            for relid in published_tables(publication) {
                let shape = shapes.iter().find(|s| s.0 == relid).map_or(&none, |s| &s.2);
                crate::backfill::backfill(F, relid, dest, format, shape, Default::default());
            }
        }
        // Wakes the worker at commit (starting it if none runs).
        crate::delivery::outbox::note_written();
    }

    /// Stops capture `name` and drops its replication slot.
    #[pg_extern(volatile, parallel_unsafe)]
    fn drop_capture(name: &str) {
        const F: &str = "emit.drop_capture";
        // SAFETY: as in create_capture.
        unsafe { pg_sys::PreventInTransactionBlock(true, c"emit.drop_capture()".as_ptr()) };
        lock_name(name, true);
        let slot = as_emit_owner(|| {
            Spi::get_one_with_args::<String>(
                "DELETE FROM emit.capture_definitions WHERE name = $1 RETURNING slot",
                &[name.into()],
            )
        });
        let slot = match slot {
            Ok(Some(slot)) => slot,
            _ => fail(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                format!("{F}: capture {name:?} does not exist"),
            ),
        };
        as_emit_owner(|| drop_slot(F, &slot));
    }
}

/// The table `given` names (through the caller's search_path), and its
/// schema-qualified name; an ERROR naming it when there is none, and when
/// it is not a table whose changes arrive under its own name. (A name
/// that does not parse is an ERROR of `to_regclass`'s own before
/// PostgreSQL 16, 42602.)
fn table_named(func: &'static str, given: &str) -> (pg_sys::Oid, String) {
    let found = Spi::connect(|c| {
        c.select(
            "SELECT c.oid, n.nspname::pg_catalog.text || '.' || c.relname::pg_catalog.text, \
                    c.relkind::pg_catalog.text \
               FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
              WHERE c.oid = pg_catalog.to_regclass($1)",
            None,
            &[given.into()],
        )?
        .first()
        .get_three::<pg_sys::Oid, String, String>()
    });
    let (relid, name, kind) = match found {
        Ok((Some(relid), Some(name), kind)) => (relid, name, kind),
        _ => fail(
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            format!("{func}: options: tables: relation {given:?} does not exist"),
        ),
    };
    match kind.as_deref() {
        Some("r") => (relid, name),
        // Without publish_via_partition_root its changes come under its
        // partitions' names, which the options would not be found by.
        Some("p") => EmitError::bad_option(
            func,
            format!("tables: {name} is partitioned: name each of its partitions"),
        ),
        _ => EmitError::bad_option(func, format!("tables: {name} is not a table")),
    }
}

/// The tables of `publication` a snapshot reads: those the caller may
/// SELECT from and that no row security applies to for it, which are
/// those the capture sends the changes of. One that row security applies
/// to is left out with a WARNING (its rows as the policies show them would
/// be a snapshot of rows whose changes are not sent).
fn published_tables(publication: &str) -> Vec<pg_sys::Oid> {
    let tables = Spi::connect(|c| {
        c.select(
            "SELECT c.oid, pg_catalog.row_security_active(c.oid), \
                    n.nspname::pg_catalog.text || '.' || c.relname::pg_catalog.text \
               FROM pg_catalog.pg_publication_tables p \
               JOIN pg_catalog.pg_namespace n ON n.nspname = p.schemaname \
               JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename \
              WHERE p.pubname = $1 \
                AND pg_catalog.has_table_privilege(c.oid, 'SELECT') \
                AND n.nspname <> 'emit' \
              ORDER BY n.nspname, c.relname",
            None,
            &[publication.into()],
        )?
        .map(|r| {
            Ok((
                r.get::<pg_sys::Oid>(1)?.unwrap_or_default(),
                r.get::<bool>(2)?.unwrap_or(false),
                r.get::<String>(3)?.unwrap_or_default(),
            ))
        })
        .collect::<Result<Vec<_>, pgrx::spi::Error>>()
    })
    .unwrap_or_else(|e| pgrx::error!("emit.create_capture: {e}"));
    tables
        .into_iter()
        .filter_map(|(relid, rls, name)| {
            if rls {
                pgrx::warning!(
                    "emit.create_capture: the snapshot leaves out {name}: row security applies to \
                     you there, and the capture leaves out its changes"
                );
            }
            (!rls).then_some(relid)
        })
        .collect()
}

/// Drops `slot` if it exists, as the current user, waiting for the
/// worker to let go of it (it holds a slot only while decoding, for a
/// moment).
fn drop_slot(func: &str, slot: &str) {
    for _ in 0..100 {
        let active = Spi::get_one_with_args::<bool>(
            "SELECT s.active FROM pg_catalog.pg_replication_slots s WHERE s.slot_name = $1",
            &[slot.into()],
        )
        .unwrap_or_else(|e| pgrx::error!("{func}: {e}"));
        match active {
            None => return,
            Some(false) => {
                Spi::run_with_args(
                    "SELECT pg_catalog.pg_drop_replication_slot($1)",
                    &[slot.into()],
                )
                .unwrap_or_else(|e| pgrx::error!("{func}: {e}"));
                return;
            }
            Some(true) => {
                std::thread::sleep(std::time::Duration::from_millis(50));
                // SAFETY: lets a cancel or terminate in.
                unsafe { pg_sys::ProcessInterrupts() };
            }
        }
    }
    pgrx::error!("{func}: replication slot {slot:?} stayed in use for 5 s; try again");
}

/// After `DROP EXTENSION pg_emit` (by its owner or a superuser, who may
/// drop slots): drops this database's capture slots, which would otherwise
/// keep WAL for ever. Slots in use at that moment (the worker leaving) are
/// waited for a little, then left with a WARNING: the DROP has happened and
/// must not fail now.
pub fn drop_all_slots() {
    // SAFETY: reads the transaction's state.
    if unsafe { pg_sys::IsTransactionBlock() } {
        // A rollback would bring the extension back without its slots.
        pgrx::warning!(
            "DROP EXTENSION pg_emit in a transaction block keeps its capture slots \
             (pg_emit_{}_…); once it has committed, drop them with pg_drop_replication_slot \
             so they keep no WAL",
            // SAFETY: the backend's database oid.
            unsafe {
                {
                    pg_sys::MyDatabaseId
                }
            }
            .to_u32()
        );
        return;
    }
    let sql = "SELECT s.slot_name::pg_catalog.text AS slot_name, s.active \
                 FROM pg_catalog.pg_replication_slots s \
                WHERE s.database = pg_catalog.current_database() AND s.slot_name LIKE $1";
    let drop_sql = format!(
        "SELECT pg_catalog.pg_drop_replication_slot(q.slot_name) FROM ({sql}) q WHERE NOT q.active"
    );
    let pattern = slot_pattern();
    let mut left = Vec::new();
    for _ in 0..50 {
        let round = Spi::run_with_args(&drop_sql, &[pattern.as_str().into()]).and_then(|()| {
            Spi::connect(|c| {
                c.select(sql, None, &[pattern.as_str().into()])?
                    .map(|r| r.get::<String>(1))
                    .collect::<Result<Vec<_>, _>>()
            })
        });
        match round {
            Ok(l) if l.is_empty() => return,
            Ok(l) => left = l.into_iter().flatten().collect(),
            Err(e) => {
                pgrx::warning!("DROP EXTENSION pg_emit: could not drop its replication slots: {e}");
                return;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    pgrx::warning!(
        "DROP EXTENSION pg_emit: replication slot(s) {left:?} stayed in use; \
         drop them with pg_drop_replication_slot so they keep no WAL"
    );
}
