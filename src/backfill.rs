//! `emit.backfill(tbl, dest, options)`: the rows a table has now, as `READ`
//! events (`"op":"r"` in Debezium, `pg_emit.row.read` in CloudEvents), in
//! primary-key order (a partitioned table's under its own name, as
//! `publish_via_partition_root` publishes them), queued for async delivery to `dest` in the caller's
//! transaction; and capture's `snapshot` option, which backfills every
//! table of the publication when the capture starts.
//!
//! The rows are read as the caller (its privileges and row security
//! apply) through a cursor, and written to the outbox as they come, so
//! memory stays bounded however large the table. The table is locked
//! against writes (`SHARE`) until the caller's transaction ends: every
//! change of a row is then either in the row as read, or committed after
//! the backfill and so queued, by a trigger or a capture, after its events.
//! A backfill that fails leaves nothing queued: run it again.
//!
//! A large table can be backfilled in parts (`limit`, `resume`), each in a
//! transaction of its own, so that no transaction, nor the writers' wait
//! for its lock, grows with the table. Each part records in
//! `emit.backfill_progress` the primary key of the last row it queued; a
//! part with `resume` reads on from there. A change to a row of a later
//! part, committed between parts, is queued before that row's READ event,
//! which carries the row as it then is: receivers that apply events in
//! order still end with every row as it is.

use crate::delivery::outbox;
use crate::delivery::Destination;
use crate::encoding;
use crate::error::EmitError;
use crate::event::{self, Event, Kind, Op};
use crate::made::Made;
use crate::privileged::as_emit_owner;
use crate::shape::{self, Column, Which};
use crate::stored::{self, Resolved};
use pg_emit_core::options::{Delivery, Format, OptionError, Shape};
use pg_emit_core::schedule::Key;
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::ffi::CString;
use std::rc::Rc;

/// Rows fetched at a time.
const FETCH: i64 = 1000;

fn fail(code: PgSqlErrorCode, message: String) -> ! {
    pgrx::pg_sys::panic::ErrorReport::new(code, message, "pg_emit").report(pgrx::PgLogLevel::ERROR);
    unreachable!("ERROR returned")
}

/// Which rows of the table a backfill queues.
#[derive(Clone, Copy, Default)]
pub struct Part {
    /// At most this many, in primary-key order.
    pub limit: Option<i64>,
    /// Those after the last row the previous part queued (of a backfill
    /// of the same table to the same destination, as recorded in
    /// `emit.backfill_progress`); without it, a part starts from the
    /// first row.
    pub resume: bool,
}

/// Where a backfill in parts stands.
struct Progress {
    /// What ordered the rows: the primary key's columns, their types and
    /// collations.
    signature: String,
    /// The last queued row's primary key: each value's text (see
    /// `resume_text`).
    after: Vec<Vec<u8>>,
    /// The last part reached the end of the table.
    done: bool,
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Queues a READ event per row of `relid` for `dest`, carrying and keyed
/// by what `shape` says; returns how many. `func` names the caller in
/// errors.
pub fn backfill(
    func: &'static str,
    relid: pg_sys::Oid,
    dest: &str,
    format: Option<Format>,
    shape: &Shape,
    part: Part,
) -> i64 {
    let resolved = stored::resolve(func, dest);
    crate::delivery::refuse_unless_allowed(&|| func.to_string(), &resolved.target);
    let (schema, table, kind) = Spi::connect(|c| {
        c.select(
            "SELECT n.nspname::pg_catalog.text, c.relname::pg_catalog.text, c.relkind::pg_catalog.text \
               FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
              WHERE c.oid = $1",
            None,
            &[relid.into()],
        )?
        .first()
        .get_three::<String, String, String>()
    })
    .unwrap_or_else(|e| pgrx::error!("{func}: {e}"));
    let (Some(schema), Some(table)) = (schema, table) else {
        fail(
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            format!("{func}: relation {} does not exist", relid.to_u32()),
        )
    };
    let refuse = |why: String| -> ! {
        EmitError::Argument {
            func,
            source: OptionError::Destination(format!("tbl: {schema}.{table} {why}")),
        }
        .raise()
    };
    // A partitioned table's rows come under its own name and keys, as a
    // publication with publish_via_partition_root sends their changes
    // (its partitions are backfilled under theirs, as their triggers and
    // other publications send them).
    let partitioned = match kind.as_deref() {
        Some("r") => false,
        Some("p") => true,
        _ => refuse("is not a table".into()),
    };
    if relid.to_u32() < pg_sys::FirstNormalObjectId
        || ["pg_catalog", "information_schema", "emit"].contains(&schema.as_str())
    {
        refuse("is a system table".into());
    }
    // Checked before the lock, which would otherwise let any caller hold
    // off the writers of a table it may not even read.
    // SAFETY: a catalog check of the caller's rights.
    let may_read =
        unsafe { pg_sys::pg_class_aclcheck(relid, pg_sys::GetUserId(), pg_sys::ACL_SELECT as _) }
            == pg_sys::AclResult::ACLCHECK_OK;
    if !may_read {
        fail(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("{func}: permission denied for table {schema}.{table}"),
        );
    }
    // SAFETY: reads the transaction's isolation level.
    if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
        fail(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!(
                "{func}: needs READ COMMITTED: it reads the table after locking it, so that \
                 every change is either in a row it reads or follows its events"
            ),
        );
    }
    let target = match resolved.target.routed(&schema, &table) {
        Ok(Some(t)) => Rc::new(Resolved::new(t, resolved.format)),
        Ok(None) => resolved.clone(),
        Err(source) => EmitError::Argument { func, source }.raise(),
    };
    let mode = crate::delivery::for_target(&|| func.to_string(), &target.target, Delivery::Async);
    debug_assert_eq!(mode, Delivery::Async);
    let http = matches!(target.target.endpoint(), Destination::Http { .. });
    let format = Format::combine(format, None, target.format, http)
        .unwrap_or_else(|source| EmitError::Argument { func, source }.raise());
    let shape::Checked { carried, key, .. } =
        shape::check(func, relid, &format!("{schema}.{table}"), shape, false);
    let mut keys = shape::columns(relid, Which::Primary);
    // The order rows are read in, and what a part resumes after.
    keys.sort_by_key(|k| k.place);
    // The events' ordering key is the replica identity's, as triggers and
    // capture give it (a row's later changes must share its key, or they
    // could overtake its READ event): none for FULL or NOTHING; or the
    // columns `key` names, as a trigger's `key=`.
    let identity = key.unwrap_or_else(|| shape::columns(relid, Which::Identity));
    if keys.is_empty() {
        EmitError::Argument {
            func,
            source: OptionError::Destination(format!(
                "tbl: {schema}.{table} has no primary key, which backfill reads in the order of"
            )),
        }
        .raise()
    }
    let in_parts = part.limit.is_some() || part.resume;
    // A part of a series locks out the table's writers as SHARE does, and
    // other parts too: a second one waits, then reads on after it.
    let mode = match in_parts {
        true => pg_sys::ShareRowExclusiveLock,
        false => pg_sys::ShareLock,
    } as pg_sys::LOCKMODE;
    // SAFETY: a lock on a table the caller names, held to the end of its
    // transaction; PostgreSQL checks nothing here, the SELECT below
    // checks the caller may read it.
    unsafe { pg_sys::LockRelationOid(relid, mode) };
    // What orders the rows: a series is refused to go on in another order.
    let signature = keys
        .iter()
        .map(|k| {
            format!(
                "{}:{}:{}",
                k.attnum,
                k.type_oid.to_u32(),
                k.collation.to_u32()
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    let after = match part.resume {
        true => progress(relid, dest),
        false => None,
    };
    if let Some(p) = &after {
        if p.done {
            return 0;
        }
        if p.signature != signature {
            fail(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "{func}: the primary key of {schema}.{table} changed since the last part \
                     of this backfill: start it again without resume"
                ),
            );
        }
    }
    if partitioned {
        // Every partition too, as LOCK TABLE would: a write straight into
        // one takes no lock on the partitioned table.
        let partitions = Spi::connect(|c| {
            c.select(
                "SELECT t.relid FROM pg_catalog.pg_partition_tree($1) t \
                  WHERE t.level OPERATOR(pg_catalog.>) 0",
                None,
                &[relid.into()],
            )?
            .map(|r| r.get::<pg_sys::Oid>(1))
            .collect::<Result<Vec<_>, _>>()
        })
        .unwrap_or_else(|e| pgrx::error!("{func}: {e}"));
        for p in partitions.into_iter().flatten() {
            // SAFETY: as above.
            unsafe { pg_sys::LockRelationOid(p, mode) };
        }
    }
    let columns: Vec<String> = identity
        .iter()
        .map(|k| format!("t.{}", quote(&k.name)))
        .collect();
    let order: Vec<String> = keys
        .iter()
        .map(|k| format!("t.{}", quote(&k.name)))
        .collect();
    let order = order.join(", ");
    // Kafka's `record_key: "columns"`: the key columns as JSON, made as a
    // trigger makes them (row_to_json of just them, with the same fixed
    // output settings), byte for byte, so that a row's later changes land
    // in the READ event's partition.
    let key_desc = (target.target.record_keys() && !identity.is_empty())
        // SAFETY: the table is locked; the row type is made in the
        // function's memory, which outlives the batches.
        .then(|| unsafe { key_type(relid, &identity) });
    // `columns`/`exclude`: just those, in the order a trigger's event has them.
    let row_sql = match &carried {
        None => "pg_catalog.row_to_json(t.*)".to_string(),
        Some(names) => format!(
            "(SELECT pg_catalog.row_to_json(c.*) FROM (SELECT {}) c)",
            names
                .iter()
                .map(|n| format!("t.{}", quote(n)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    // Read as bytes: the row as UTF-8, the key values in the database's
    // encoding, for their input functions (pgrx reads text only as UTF-8).
    let identity_sql: String = columns
        .iter()
        .map(|c| format!(", pg_catalog.textsend({c}::pg_catalog.text)"))
        .collect();
    // The primary key's values come last, as they are: a part records the
    // last row's (see `resume_text`).
    let key_sql: String = keys
        .iter()
        .map(|k| format!(", t.{}", quote(&k.name)))
        .collect();
    let after = after.map(|p| p.after).filter(|a| !a.is_empty());
    let from = match &after {
        None => String::new(),
        Some(_) => format!(" WHERE {}", after_condition(&keys)),
    };
    let limit = part
        .limit
        .map(|n| format!(" LIMIT {n}"))
        .unwrap_or_default();
    let sql = format!(
        "SELECT pg_catalog.convert_to({row_sql}::pg_catalog.text, 'UTF8'){identity_sql}{key_sql} \
           FROM {}.{} t{from} ORDER BY {order}{limit}",
        quote(&schema),
        quote(&table),
    );
    // The values a part resumes after, through their types' input
    // functions (as the caller: they are values of its table), with the
    // settings they were written with.
    let args: Vec<DatumWithOid> = match &after {
        None => Vec::new(),
        Some(after) => {
            let values: Vec<Option<&[u8]>> = after.iter().map(|v| Some(v.as_slice())).collect();
            crate::privileged::with_key_output(|| key_values(&keys, &values))
                .into_iter()
                .zip(&keys)
                // SAFETY: a value of the column's type, made by its input
                // function.
                .map(|(d, k)| match d {
                    Some(d) => unsafe { DatumWithOid::new(d, k.type_oid) },
                    None => DatumWithOid::null_oid(k.type_oid),
                })
                .collect()
        }
    };
    let mut last: Option<Vec<Vec<u8>>> = None;
    let made = Made::now(format, Delivery::Async);
    let ev = Event {
        op: Op::Read,
        schema: &schema,
        table: &table,
        when: "AFTER",
        level: "ROW",
        trigger_name: "backfill",
        relid: relid.to_u32(),
        args: &[],
        ctx: made.ctx(),
    };
    // The outbox limit refuses these with an ERROR, never a WARNING: a
    // backfill that says it queued N events did.
    outbox::refusal_is_error();
    let mut count = 0i64;
    let mut buf = Vec::new();
    // A snapshot taken now, after the lock: the statement's own predates
    // it and would miss what a writer committed while the lock waited.
    // SAFETY: pushed here, popped below on success; an ERROR in between
    // aborts the transaction, which pops it.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    Spi::connect(|c| {
        let mut cursor = c.open_cursor(sql.as_str(), &args);
        // Bounded memory: the rows, key values and JSON of a batch are
        // freed after it.
        crate::batches::each(&mut cursor, FETCH, |batch| {
            for i in 0..batch.len() {
                let row = batch.bytes(i, 1).unwrap_or(b"null");
                let values: Vec<Option<&[u8]>> = (0..identity.len())
                    .map(|k| batch.bytes(i, k as i32 + 2))
                    .collect();
                let (order, text) = if identity.is_empty() {
                    (None, None)
                } else {
                    let datums = key_values(&identity, &values);
                    let order = key_of(relid, &identity, &datums);
                    let text = key_desc.map(|desc| {
                        let (mut d, mut n): (Vec<_>, Vec<_>) = datums
                            .iter()
                            .map(|v| (v.unwrap_or(pg_sys::Datum::from(0)), v.is_none()))
                            .unzip();
                        // SAFETY: one value (or NULL) per key column, of
                        // the key row type's.
                        let json = crate::privileged::with_key_output(|| unsafe {
                            crate::trigger::values_json(desc, &mut d, &mut n)
                        });
                        let what = || format!("a key of {schema}.{table}");
                        String::from_utf8_lossy(&encoding::to_utf8(json, &what)).into_owned()
                    });
                    (Some(order), text)
                };
                buf.clear();
                event::write_event(&mut buf, format, &ev, Some(row), None, true);
                let text = text.as_deref();
                outbox::queue(
                    &target.target,
                    Kind::event(format),
                    &buf,
                    Key { order, text },
                );
                count += 1;
            }
            let end = batch.len() - 1;
            last = Some(
                (0..keys.len())
                    .map(|k| {
                        let col = (2 + identity.len() + k) as i32;
                        resume_text(&keys[k], batch.datum(end, col))
                    })
                    .collect(),
            );
            Ok::<_, pgrx::spi::Error>(())
        })
    })
    .unwrap_or_else(|e| pgrx::error!("{func}: {e}"));
    // SAFETY: the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
    if in_parts {
        let done = part.limit.is_none_or(|n| count < n);
        let after = last.or(after).unwrap_or_default();
        record(relid, dest, &signature, after, done);
    }
    count
}

/// Where the backfill of `relid` to `dest` in parts stands, if one was
/// recorded. Read after the table's lock, with snapshots taken then (a
/// read-write SPI takes one per statement): a part that held the lock
/// before has committed what it recorded.
fn progress(relid: pg_sys::Oid, dest: &str) -> Option<Progress> {
    as_emit_owner(|| {
        Spi::connect_mut(|c| {
            let row = c
                .update(
                    "SELECT p.done, p.signature FROM emit.backfill_progress p \
                      WHERE p.relid = $1 AND p.dest = $2",
                    None,
                    &[relid.into(), dest.into()],
                )?
                .first();
            if row.is_empty() {
                return Ok(None);
            }
            let (done, signature) = row.get_two::<bool, String>()?;
            let after = c
                .update(
                    "SELECT u.v FROM emit.backfill_progress p, \
                            pg_catalog.unnest(p.after) WITH ORDINALITY u(v, n) \
                      WHERE p.relid = $1 AND p.dest = $2 ORDER BY u.n",
                    None,
                    &[relid.into(), dest.into()],
                )?
                .map(|r| r.get::<Vec<u8>>(1).map(Option::unwrap_or_default))
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, pgrx::spi::Error>(Some(Progress {
                signature: signature.unwrap_or_default(),
                after,
                done: done.unwrap_or(false),
            }))
        })
    })
    .unwrap_or_else(|e| pgrx::error!("emit.backfill: {e}"))
}

/// Records where a part of the backfill of `relid` to `dest` stopped, in
/// its transaction: a part that rolls back leaves the record as it was.
fn record(relid: pg_sys::Oid, dest: &str, signature: &str, after: Vec<Vec<u8>>, done: bool) {
    as_emit_owner(|| {
        Spi::run_with_args(
            "INSERT INTO emit.backfill_progress (relid, dest, signature, after, done) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (relid, dest) DO UPDATE SET signature = EXCLUDED.signature, \
                 after = EXCLUDED.after, done = EXCLUDED.done, updated_at = pg_catalog.now()",
            &[
                relid.into(),
                dest.into(),
                signature.into(),
                after.into(),
                done.into(),
            ],
        )
    })
    .unwrap_or_else(|e| pgrx::error!("emit.backfill: {e}"))
}

/// `(key) > ($1, …)` as the key's types order it: their default btree
/// operator classes' operators, which `ORDER BY` uses, named with their
/// schemas. (`OPERATOR(pg_catalog.>)` would compare a `citext` key as text,
/// in another order, and find none for many extensions' types.) Spelled
/// out column by column, after a `>=` on the first that an index scan
/// starts from.
fn after_condition(keys: &[Column]) -> String {
    let ops: Vec<[String; 3]> = keys
        .iter()
        .map(|k| {
            // SAFETY: catalog lookups of the column type's operator class.
            let (family, input) = unsafe {
                let class = pg_sys::GetDefaultOpClass(k.type_oid, pg_sys::BTREE_AM_OID);
                (
                    pg_sys::get_opclass_family(class),
                    pg_sys::get_opclass_input_type(class),
                )
            };
            [
                pg_sys::BTGreaterEqualStrategyNumber,
                pg_sys::BTGreaterStrategyNumber,
                pg_sys::BTEqualStrategyNumber,
            ]
            .map(|strategy| {
                // SAFETY: as above.
                let op =
                    unsafe { pg_sys::get_opfamily_member(family, input, input, strategy as i16) };
                operator_sql(op)
            })
        })
        .collect();
    let col = |i: usize| format!("t.{}", quote(&keys[i].name));
    let alternatives: Vec<String> = (0..keys.len())
        .map(|i| {
            let mut terms: Vec<String> = (0..i)
                .map(|j| format!("{} {} ${}", col(j), ops[j][2], j + 1))
                .collect();
            terms.push(format!("{} {} ${}", col(i), ops[i][1], i + 1));
            format!("({})", terms.join(" AND "))
        })
        .collect();
    format!(
        "{} {} $1 AND ({})",
        col(0),
        ops[0][0],
        alternatives.join(" OR ")
    )
}

/// `OPERATOR(schema.name)` of operator `op`.
fn operator_sql(op: pg_sys::Oid) -> String {
    Spi::get_one_with_args::<String>(
        "SELECT pg_catalog.format('OPERATOR(%I.%s)', n.nspname, o.oprname) \
           FROM pg_catalog.pg_operator o \
           JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace WHERE o.oid = $1",
        &[op.into()],
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| pgrx::error!("emit.backfill: no btree operator {} found", op.to_u32()))
}

/// A primary key value's text, as a part records it to resume after: made
/// with fixed settings (`with_key_output`), with which it is read back, so
/// that a session with other settings (`DateStyle`, `extra_float_digits`,
/// `TimeZone`) reads back the same value.
fn resume_text(k: &Column, value: Option<pg_sys::Datum>) -> Vec<u8> {
    let Some(value) = value else {
        return Vec::new();
    };
    let (mut func, mut varlena) = (pg_sys::InvalidOid, false);
    // SAFETY: the output function of the value's own type; its text is
    // copied out before the batch's memory goes.
    unsafe {
        pg_sys::getTypeOutputInfo(k.type_oid, &mut func, &mut varlena);
        crate::privileged::with_key_output(|| {
            let text = pg_sys::OidOutputFunctionCall(func, value);
            std::ffi::CStr::from_ptr(text).to_bytes().to_vec()
        })
    }
}

/// A row's key values (`values`: their text in the database's encoding)
/// through their types' input functions.
fn key_values(keys: &[Column], values: &[Option<&[u8]>]) -> Vec<Option<pg_sys::Datum>> {
    keys.iter()
        .zip(values)
        .map(|(k, v)| {
            v.map(|text| {
                let s = CString::new(text).unwrap_or_default();
                // SAFETY: the type's own input function and the value's text.
                unsafe {
                    pg_sys::OidInputFunctionCall(
                        k.input.0,
                        s.as_ptr().cast_mut(),
                        k.input.1,
                        k.typmod,
                    )
                }
            })
        })
        .collect()
}

/// The ordering key a trigger would give the row: its key values hashed
/// with the table's oid.
fn key_of(relid: pg_sys::Oid, keys: &[Column], datums: &[Option<pg_sys::Datum>]) -> i64 {
    let mut parts: Vec<Option<Vec<u8>>> = vec![Some(relid.to_u32().to_le_bytes().to_vec())];
    for (k, v) in keys.iter().zip(datums) {
        // SAFETY: a value of the column's type.
        parts.push(
            v.map(|d| unsafe { crate::trigger::value_bytes(d, k.byval, k.len).into_owned() }),
        );
    }
    pg_emit_core::schedule::key_hash(parts.iter().map(|p| p.as_deref()))
}

/// A blessed row type of `keys`, columns of `relid`, in that order: what
/// a trigger's record key is made of (see `trigger::key_json`).
///
/// # Safety
/// In a transaction, with `relid` locked.
unsafe fn key_type(relid: pg_sys::Oid, keys: &[Column]) -> pg_sys::TupleDesc {
    let rel = pg_sys::relation_open(relid, pg_sys::NoLock as pg_sys::LOCKMODE);
    let d = pg_sys::CreateTemplateTupleDesc(keys.len() as std::ffi::c_int);
    for (i, k) in keys.iter().enumerate() {
        pg_sys::TupleDescCopyEntry(d, (i + 1) as pg_sys::AttrNumber, (*rel).rd_att, k.attnum);
    }
    pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    pg_sys::BlessTupleDesc(d)
}

#[pgrx::pg_schema]
mod emit {
    use super::*;
    use pgrx::JsonB;

    /// Declared in `sql/capture.sql`, where `tbl` is a `regclass`.
    #[pg_extern(sql = false, volatile, parallel_unsafe)]
    fn backfill(tbl: pg_sys::Oid, dest: &str, options: JsonB) -> i64 {
        const F: &str = "emit.backfill";
        let o = crate::capture::options_of(F, &options.0, false);
        super::backfill(F, tbl, dest, o.format, &o.shape, o.part)
    }
}
