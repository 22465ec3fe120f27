//! Running SQL with rights the caller lacks.
//!
//! A writer whose row fires an async trigger has no rights on `emit.outbox`
//! (it holds other tables' rows), so the outbox write runs as the owner of
//! schema `emit` — the role that ran `CREATE EXTENSION`. Code that runs with
//! rights the caller lacks must not let the caller choose what it calls:
//! every name it uses is schema-qualified, and `search_path` is pinned to
//! `pg_catalog, pg_temp` while it runs, so that neither a function planted
//! in `public` (which wins over `pg_catalog` when its argument types match
//! better) nor a database-level `search_path` can be reached. Functions and
//! operators are never looked up in `pg_temp`.
//!
//! The same pin is applied for the life of the worker process
//! ([`pin_worker_settings`]), which otherwise inherits whatever
//! `ALTER DATABASE ... SET` the database owner chose.

use pgrx::pg_sys;
use std::ffi::CStr;

/// The only search path privileged SQL ever runs under.
pub const SEARCH_PATH: &CStr = c"pg_catalog, pg_temp";

thread_local! {
    /// (schema oid, owner) of the last `emit` found to belong to pg_emit.
    static OWNER: std::cell::Cell<Option<(pg_sys::Oid, pg_sys::Oid)>> =
        const { std::cell::Cell::new(None) };
}

/// The owner of schema `emit` — the role that ran `CREATE EXTENSION` —
/// when that schema belongs to the pg_emit extension; `None` otherwise. A
/// schema that merely has the name (any role with `CREATE` on a database
/// without pg_emit can make one) is never trusted.
pub fn emit_owner() -> Option<pg_sys::Oid> {
    // SAFETY: catalog lookups (syscache, pg_extension and pg_depend index
    // scans) inside a transaction, which every caller runs in; the tuple is
    // released before returning.
    unsafe {
        let nsp = pg_sys::get_namespace_oid(c"emit".as_ptr(), true);
        if nsp == pg_sys::InvalidOid {
            return None;
        }
        if let Some((cached, owner)) = OWNER.get() {
            if cached == nsp {
                return Some(owner);
            }
        }
        let ext = pg_sys::get_extension_oid(c"pg_emit".as_ptr(), true);
        if ext == pg_sys::InvalidOid
            || pg_sys::getExtensionOfObject(pg_sys::NamespaceRelationId, nsp) != ext
        {
            return None;
        }
        let tup = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::NAMESPACEOID as i32,
            pg_sys::Datum::from(nsp),
        );
        if tup.is_null() {
            return None;
        }
        let form = pg_sys::GETSTRUCT(tup) as *const pg_sys::FormData_pg_namespace;
        let owner = (*form).nspowner;
        pg_sys::ReleaseSysCache(tup);
        OWNER.set(Some((nsp, owner)));
        Some(owner)
    }
}

/// Runs `f` as the owner of `emit`, with `search_path` pinned, in a
/// security-restricted operation (no `SET ROLE`, no temporary objects), and
/// with a snapshot (at `PRE_COMMIT` no statement provides one).
///
/// If `f` raises, transaction (or subtransaction) abort restores user,
/// settings and snapshots, exactly as for a SECURITY DEFINER function.
pub fn as_emit_owner<R>(f: impl FnOnce() -> R) -> R {
    let owner = emit_owner().unwrap_or_else(|| {
        pgrx::error!("pg_emit: schema emit is missing; is the extension installed here?")
    });
    as_role(owner, true, || {
        // SAFETY: pushed and popped around `f`; an ERROR pops it by abort.
        unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
        let r = f();
        // SAFETY: as above.
        unsafe { pg_sys::PopActiveSnapshot() };
        r
    })
}

/// Runs `f` as `role` in a security-restricted operation with
/// `search_path` pinned, in a GUC nest level that ends with it: `keep`
/// lets a plain `SET` inside stay (as for a SECURITY DEFINER function),
/// otherwise every setting `f` changed is undone (capture runs table
/// owners' code this way, see `worker::capture`).
///
/// If `f` raises, transaction (or subtransaction) abort restores user
/// and settings.
pub fn as_role<R>(role: pg_sys::Oid, keep: bool, f: impl FnOnce() -> R) -> R {
    let mut user = pg_sys::InvalidOid;
    let mut sec = 0;
    // SAFETY: save, switch and restore the current user and a GUC nest
    // level, as fmgr_security_definer does for SECURITY DEFINER functions.
    let nest = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut sec);
        let nest = pg_sys::NewGUCNestLevel();
        pg_sys::SetUserIdAndSecContext(
            role,
            sec | (pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION)
                as i32,
        );
        pin_search_path(pg_sys::GucSource::PGC_S_SESSION, true);
        nest
    };
    let r = f();
    // SAFETY: undoes the above in reverse order.
    unsafe {
        pg_sys::AtEOXact_GUC(keep, nest);
        pg_sys::SetUserIdAndSecContext(user, sec);
    }
    r
}

/// Sets `search_path` to [`SEARCH_PATH`]; `save` makes it revert at the end
/// of the current GUC nest level.
///
/// # Safety
/// Must run in a backend, inside a transaction when `save` is set.
unsafe fn pin_search_path(source: pg_sys::GucSource::Type, save: bool) {
    let action = if save {
        pg_sys::GucAction::GUC_ACTION_SAVE
    } else {
        pg_sys::GucAction::GUC_ACTION_SET
    };
    pg_sys::set_config_option(
        c"search_path".as_ptr(),
        SEARCH_PATH.as_ptr(),
        pg_sys::GucContext::PGC_SUSET,
        source,
        action,
        true,
        pg_sys::PGERROR as i32,
        false,
    );
}

/// Settings a database owner could set with `ALTER DATABASE ... SET` to
/// stop the worker (a role it would act as, a timeout that cancels every
/// claim, a read-only or serializable default, string syntax its SQL does
/// not expect), with the
/// values the worker needs. Applied at the highest priority, so nothing
/// overrides them for the life of the process. `transaction_timeout` exists
/// from PostgreSQL 17 on; settings a version lacks are skipped.
const WORKER_SETTINGS: &[(&CStr, &CStr)] = &[
    // A database-level `SET role` would make the worker act as that role.
    (c"role", c"none"),
    (c"statement_timeout", c"0"),
    (c"lock_timeout", c"0"),
    // Shorter than any backend's (1 s by default, and only superusers may
    // change it): in a deadlock with a user's transaction, the process
    // whose timeout runs out first aborts, and that should be the worker,
    // which just starts again, not DROP EXTENSION or a writer.
    (c"deadlock_timeout", c"100ms"),
    (c"idle_in_transaction_session_timeout", c"0"),
    (c"transaction_timeout", c"0"),
    (c"default_transaction_read_only", c"off"),
    (c"default_transaction_isolation", c"read committed"),
    (c"default_transaction_deferrable", c"off"),
    (c"standard_conforming_strings", c"on"),
    // The worker's statements are planned once and kept (crate::plans),
    // against a queue whose statistics swing from empty to a backlog of
    // millions, mostly dead rows between two vacuums: ordered index scans
    // that stop at their LIMIT are right in every state, where a plan
    // chosen from one moment's statistics (a sequential or bitmap scan of
    // every entry, dead ones included) can cost a core at a steady load.
    (c"enable_seqscan", c"off"),
    (c"enable_bitmapscan", c"off"),
    // What else those plans depend on, which a database owner could turn
    // against them: the index scans themselves, the cost constants that
    // weigh them (a random_page_cost of 1e20 outweighs any disabled scan),
    // JIT compiling every small statement, and parallel plans.
    (c"enable_indexscan", c"on"),
    (c"enable_indexonlyscan", c"on"),
    (c"enable_sort", c"on"),
    (c"enable_incremental_sort", c"on"),
    (c"enable_nestloop", c"on"),
    (c"enable_hashjoin", c"on"),
    (c"enable_mergejoin", c"on"),
    (c"enable_hashagg", c"on"),
    (c"enable_material", c"on"),
    (c"enable_memoize", c"on"),
    (c"seq_page_cost", c"1"),
    (c"random_page_cost", c"4"),
    (c"cpu_tuple_cost", c"0.01"),
    (c"cpu_index_tuple_cost", c"0.005"),
    (c"cpu_operator_cost", c"0.0025"),
    (c"effective_cache_size", c"524288"),
    (c"plan_cache_mode", c"auto"),
    (c"jit", c"off"),
    (c"max_parallel_workers_per_gather", c"0"),
    // Capture reads values as their types' text output and turns them back
    // into values with the input functions: both ends must agree, and
    // floats must come out exact.
    (c"extra_float_digits", c"1"),
    // Capture moves its slot once the events it queued are committed: the
    // commit must be on disk by then, or a crash would lose them.
    (c"synchronous_commit", c"on"),
    (c"DateStyle", c"ISO, MDY"),
    (c"IntervalStyle", c"postgres"),
];

/// The settings that change how `row_to_json` writes a value of a key
/// column, or how a value's text reads back, at fixed values: a record
/// key (Kafka's `record_key: "columns"`) must be the same bytes for a row
/// whichever session, worker or backfill made it, or the row's events
/// would be keyed apart; and a backfill in parts resumes after a key
/// written by one session and read by another.
const KEY_OUTPUT: &[(&CStr, &CStr)] = &[
    (c"TimeZone", c"UTC"),
    (c"DateStyle", c"ISO, MDY"),
    (c"IntervalStyle", c"postgres"),
    (c"bytea_output", c"hex"),
    (c"extra_float_digits", c"1"),
    (c"lc_monetary", c"C"),
];

/// Runs `f` with [`KEY_OUTPUT`], then restores the settings (an ERROR in
/// `f` restores them with the (sub)transaction's abort).
pub fn with_key_output<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: a GUC nest level around `f`, as as_role keeps one.
    let nest = unsafe {
        let nest = pg_sys::NewGUCNestLevel();
        for (name, value) in KEY_OUTPUT {
            pg_sys::set_config_option(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                pg_sys::PGERROR as i32,
                false,
            );
        }
        nest
    };
    let r = f();
    // SAFETY: ends the level made above.
    unsafe { pg_sys::AtEOXact_GUC(false, nest) };
    r
}

/// Pins the worker's `search_path` and [`WORKER_SETTINGS`] after it has
/// connected to its database (which applied the database's own settings).
pub fn pin_worker_settings() {
    // SAFETY: a bgworker after BackgroundWorkerInitializeConnection, outside
    // any transaction: SET-like calls at override priority, as
    // postmaster-level options are applied.
    unsafe {
        pin_search_path(pg_sys::GucSource::PGC_S_OVERRIDE, false);
        for (name, value) in WORKER_SETTINGS {
            if pg_sys::GetConfigOption(name.as_ptr(), true, false).is_null() {
                continue;
            }
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_OVERRIDE,
            );
        }
        // Decoded text comes in the client encoding: the database's own,
        // whatever `ALTER DATABASE … SET client_encoding` says.
        pg_sys::SetConfigOption(
            c"client_encoding".as_ptr(),
            pg_sys::GetDatabaseEncodingName(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_OVERRIDE,
        );
    }
}

/// Whose SQL objects the extension has: between installing a new library
/// and `ALTER EXTENSION pg_emit UPDATE`, writers keep queueing in the old
/// layout and the worker waits, so nothing is lost or refused while the
/// DBA upgrades.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Schema {
    /// 0.1.0's: an outbox in id order, with no format.
    V0_1,
    /// 0.2.0's: the outbox as now, but none of the columns the worker
    /// writes for `emit.metrics()`.
    V0_2,
    /// This library's.
    Current,
}

pub fn schema() -> Schema {
    // SAFETY: syscache lookups inside a transaction.
    unsafe {
        let nsp = pg_sys::get_namespace_oid(c"emit".as_ptr(), true);
        if nsp == pg_sys::InvalidOid
            || pg_sys::get_relname_relid(c"tx_seq".as_ptr(), nsp) == pg_sys::InvalidOid
        {
            return Schema::V0_1;
        }
        let stats = pg_sys::get_relname_relid(c"destinations".as_ptr(), nsp);
        match pg_sys::get_attnum(stats, c"latency_p50_ms".as_ptr()) {
            n if n > 0 => Schema::Current,
            _ => Schema::V0_2,
        }
    }
}
