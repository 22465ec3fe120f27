//! With `shared_preload_libraries = 'pg_emit'`: at server start, start a
//! worker in every database that accepts connections. Each worker exits at
//! once (and for good) where the extension is not installed, so this needs
//! no list of databases, and a backlog left in `emit.outbox` by a crash is
//! delivered without waiting for the next write.

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::pg_sys;
use pgrx::prelude::*;

/// Called from `_PG_init` while shared libraries are being preloaded.
pub fn register() {
    BackgroundWorkerBuilder::new("pg_emit launcher")
        .set_type("pg_emit launcher")
        .set_library("pg_emit")
        .set_function("pg_emit_launcher_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_emit_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGTERM);
    // No database: only shared catalogs (pg_database) are readable.
    BackgroundWorker::connect_worker_to_spi(None, None);
    // SAFETY: a catalog scan in our own transaction, as autovacuum's
    // launcher does it.
    let dbs = unsafe { connectable_databases() };
    for db in dbs {
        if super::start(db).is_err() {
            pgrx::warning!(
                "pg_emit launcher: no background worker slot for database {}; \
                 raise max_worker_processes",
                db.to_u32()
            );
        }
    }
    // Exit 0: done for good; workers restart themselves.
}

unsafe fn connectable_databases() -> Vec<pg_sys::Oid> {
    let mut out = Vec::new();
    pg_sys::SetCurrentStatementStartTimestamp();
    pg_sys::StartTransactionCommand();
    let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
    let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, lock);
    let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
    loop {
        let tup = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
        if tup.is_null() {
            break;
        }
        let header = (*tup).t_data;
        let form = (header as *const u8).add((*header).t_hoff as usize)
            as *const pg_sys::FormData_pg_database;
        if (*form).datallowconn && !(*form).datistemplate {
            out.push((*form).oid);
        }
    }
    pg_sys::table_endscan(scan);
    pg_sys::table_close(rel, lock);
    pg_sys::CommitTransactionCommand();
    out
}
